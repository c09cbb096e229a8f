"""The ``dialab`` command line: one subcommand per job, errors as one line with exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import numpy as np

from . import __version__
from .errors import DialabError

EXIT_BAD_INPUT = 2


def _cmd_info(args: argparse.Namespace) -> int:
    from .exposure import read_exposure
    from .psf import measure_psf

    exp = read_exposure(args.file, psf=args.psf, noise=args.noise, mask=args.mask)
    if exp.psf is not None:
        psf, origin = exp.psf, "given"
    else:
        psf, origin = measure_psf(exp), "measured"
    usable = ~exp.plane("NO_DATA")
    print(f"file      {args.file}")
    print(f"shape     {exp.shape[1]} x {exp.shape[0]} (x by y)")
    print(f"band      {exp.band or '-'}   visit {exp.visit}   detector {exp.detector}   mjd {exp.mjd:.5f}")
    print(f"wcs       {'present' if exp.wcs is not None else 'absent'}")
    print(f"psf       FWHM {psf.fwhm:.3f} px ({origin}), sigma {psf.sigma:.3f} px, NEA {psf.nea:.1f} px^2")
    print(f"noise     median {float(np.median(np.sqrt(exp.variance[usable]))):.6g} (sqrt variance)")
    counts = "  ".join(f"{name} {int(np.count_nonzero(exp.plane(name)))}"
                       for name in sorted(exp.mask_planes.bits, key=exp.mask_planes.bits.get))
    print(f"mask      {counts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dialab", description="Difference image analysis and its evaluation.")
    parser.add_argument("--version", action="version", version=f"dialab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="describe an image: shape, band, WCS, PSF, noise, mask planes")
    info.add_argument("file", help="FITS image (dialab layout or plain)")
    info.add_argument("--psf", help="PSF stamp FITS (odd size); measured from stars when absent")
    info.add_argument("--noise", help="1-sigma noise map FITS")
    info.add_argument("--mask", help="mask FITS (non-zero = BAD)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.simplefilter("ignore")
    try:
        return int(args.func(args) or 0)
    except DialabError as exc:
        print(f"dialab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
