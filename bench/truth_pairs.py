"""Issue 13's yardstick: measurement errors on GalSim truth pairs (``simulate.truthpair``), where every number is known.

For each seed, PSF regime (wide: science FWHM 4.0, template 3.4; sharp: 3.0 against 4.0) and PSF source (the true
models given, or measured from the stars), the suitable flavors are run and compared with the truth:

- ``ksum``: kernel sum / true flux ratio - 1 (percent);
- ``fwhm``, ``nea``: the science model's against GalSim's effective PSF at three columns (worst, percent); ``cut``:
  the NEA against the true PSF cut to the model's stamp and normalised alike (the shape alone);
- ``ratio3``: median psfFlux / true light within the 3-FWHM aperture, transients of S/N > 10;
- ``pull3``: median and robust std of (psfFlux - that truth) / psfFluxErr;
- ``forced``: the same two, measured at every transient's true position (no detection, so no selection: a faint
  transient is in it whether its noise went up or down), the ratio over those of true S/N > 10;
- ``sky``: median and robust std of the sky sources' flux / error;
- ``false``: unmatched diaSources per 4 Mpix after the flag cut plus the cosmic-ray flag.

With 60 transients per Mpix (the default) a median's own error is about 0.16 in pull and 0.5% in ratio: ``--transients``
puts more in each pair (but 400 per 1024^2 crowd the kernel fit: its noise ratio rose to 1.04-1.09), and with
several seeds the forced pulls are also printed pooled over them, by S/N and by distance to the nearest source.

Run: python bench/truth_pairs.py [--size 1024] [--seeds 1 2 3] [--psfs given measured] [--kernel-basis delta]
[--transients N] [--spatial-order auto] (default: one 768^2 seed, the Alard-Lupton basis, 60 transients per Mpix)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from functools import cache

os.environ.setdefault("OMP_NUM_THREADS", "1")

import galsim  # noqa: E402
import numpy as np  # noqa: E402

from dialab.analysis.residuals import robust_std  # noqa: E402
from dialab.detection import DetectConfig  # noqa: E402
from dialab.measurement import BAD_FLAGS, detect_and_measure  # noqa: E402
from dialab.photometry import APCORR_RADIUS_FWHM, forced_psf_flux  # noqa: E402
from dialab.psf import ImagePsf, stamp_fwhm  # noqa: E402
from dialab.simulate.truthpair import TruthPairSpec, light_within, psf_profile, simulate_truth_pair  # noqa: E402
from dialab.subtraction import SubtractConfig, subtract  # noqa: E402

REGIMES = {"wide": (4.0, 3.4, ("convolveTemplate", "preconvolution")),
           "sharp": (3.0, 4.0, ("convolveTemplate", "auto", "preconvolution"))}
CUT = [*BAD_FLAGS, "pixelFlags_cr"]


def robust(z: np.ndarray) -> tuple[float, float]:
    """Median and robust std of the finite values."""
    z = np.asarray(z, float)
    return float(np.nanmedian(z)) if np.isfinite(z).any() else float("nan"), robust_std(z)


@cache
def true_sizes(spec: TruthPairSpec, fwhm: float, x: float, size: int) -> tuple[float, float, float]:
    """FWHM and NEA of the pixel-integrated PSF at column ``x``, normalised to its total flux, and the NEA of its
    central ``size`` x ``size`` pixels normalised to their own sum, as a model stamp of that size is (drawn once
    per pair and size, not per flavor)."""
    img = psf_profile(spec, fwhm, x).drawImage(nx=201, ny=201, scale=1.0).array
    h = size // 2
    cut = img[100 - h : 101 + h, 100 - h : 101 + h]
    return (stamp_fwhm(img[100 - 30 : 131, 100 - 30 : 131]), float(1.0 / np.sum((img / img.sum()) ** 2)),
            float(1.0 / np.sum((cut / cut.sum()) ** 2)))


def psf_errors(spec: TruthPairSpec, psf) -> tuple[float, float, float]:
    """Worst FWHM and NEA errors (percent) of a science model at three columns across the CCD, and the NEA's
    against the true PSF cut to the model's stamp (its shape alone: a stamp normalised to its own sum misses the
    light beyond it, which the aperture correction restores, so its NEA is smaller than the total-light one)."""
    ny, nx = spec.shape
    worst = [0.0, 0.0, 0.0]
    for x in (0.2 * nx, 0.5 * nx, 0.8 * nx):
        stamp = psf.stamp(x=x, y=ny / 2)
        model = ImagePsf(stamp / stamp.sum())
        tf, tn, tc = true_sizes(spec, spec.science_fwhm, x, min(stamp.shape[0], 201))
        for i, err in enumerate((model.fwhm / tf - 1, model.nea / tn - 1, model.nea / tc - 1)):
            worst[i] = err if abs(err) > abs(worst[i]) else worst[i]
    return 100 * worst[0], 100 * worst[1], 100 * worst[2]


def one_case(spec: TruthPairSpec, psfs: str, flavor: str, pair, basis: str = "alard-lupton",
             spatial_order="1") -> dict:
    science, template, transients, static = pair
    if psfs == "measured":
        science, template = (dataclasses.replace(e, psf=None) for e in (science, template))
    order = spatial_order if spatial_order == "auto" else int(spatial_order)
    res = subtract(science, template, SubtractConfig(flavor=flavor, kernel_basis=basis, spatial_order=order))
    d = res.diagnostics
    truth_sum = spec.flux_ratio if d.convolved == "template" else 1 / spec.flux_ratio
    cat, det, sky = detect_and_measure(res, science, res.matched_image, DetectConfig(n_sky_sources=300))
    good = cat[~cat[CUT].any(axis=1)]
    dist = np.hypot(good.x.to_numpy()[:, None] - transients.x.to_numpy()[None],
                    good.y.to_numpy()[:, None] - transients.y.to_numpy()[None])
    matched = dist.min(axis=1) < 2.0 if len(good) else np.zeros(0, bool)
    found = good[matched]
    t = transients.iloc[dist[matched].argmin(axis=1)] if len(found) else transients.iloc[:0]
    radius = APCORR_RADIUS_FWHM * res.science_psf.fwhm
    true3 = t.flux.to_numpy() * light_within(spec, t.x.to_numpy(), t.y.to_numpy(), radius)
    flux, err = found.psfFlux.to_numpy(), found.psfFluxErr.to_numpy()
    bright = flux / err > 10
    fwhm_err, nea_err, cut_nea_err = psf_errors(spec, res.science_psf)
    # forced at the true positions, as the sky sources are measured: on the difference less detection's background
    tx, ty = transients.x.to_numpy(), transients.y.to_numpy()
    forced = forced_psf_flux(dataclasses.replace(res.difference, image=res.difference.image - det.background), tx, ty)
    f_flux, f_err = forced.psfFlux.to_numpy(), forced.psfFluxErr.to_numpy() * det.noise_scale
    f_true = transients.flux.to_numpy() * light_within(spec, tx, ty, radius)
    f_bright = f_true / f_err > 10
    others = np.r_[static[["x", "y"]].to_numpy(), np.column_stack([tx, ty])]
    nearest = np.sort(np.hypot(tx[:, None] - others[None, :, 0], ty[:, None] - others[None, :, 1]), axis=1)[:, 1]
    return {"forced": ((f_flux - f_true) / f_err, f_true / f_err, nearest / spec.science_fwhm),
            "ksum": 100 * (d.kernel_sum / truth_sum - 1), "fwhm": fwhm_err, "nea": nea_err, "nea_cut": cut_nea_err,
            "forced_ratio3": float(np.median(f_flux[f_bright] / f_true[f_bright])) if f_bright.any() else float("nan"),
            "forced_pull3": robust((f_flux - f_true) / f_err),
            "ratio3": float(np.median(flux[bright] / true3[bright])) if bright.any() else float("nan"),
            "pull3": robust((flux - true3) / err), "sky_z": (sky.psfFlux / sky.psfFluxErr).to_numpy(),
            "false": 4e6 * int((~matched).sum()) / (spec.shape[0] * spec.shape[1]),
            "noise": d.noise_ratio}


def print_pooled(pooled: dict) -> None:
    """Forced pulls of each (regime, PSFs, flavor) pooled over the seeds: median / robust std, by true S/N, and
    apart from (> 4 FWHM) or next to (< 2 FWHM) another source, whose residual the errors do not carry; then the
    sky sources' flux / error pooled (a robust std's own error is about 1.1 / sqrt(n))."""
    print("forced pulls pooled over the seeds (median/std, n): all; S/N < 20, 20-60, > 60; isolated; near; "
          "sky sources")
    for (regime, psfs, flavor), parts in pooled.items():
        pull, snr, near, sky = (np.concatenate(p) for p in zip(*parts))
        cells = [np.ones(len(pull), bool), snr < 20, (snr >= 20) & (snr < 60), snr >= 60, near > 4, near < 2]
        print(f"{regime:6} {psfs:9} {flavor:17}" + "".join(
            f" {robust(pull[c])[0]:+5.2f}/{robust(pull[c])[1]:4.2f} ({c.sum()})" for c in cells)
            + f" {robust(sky)[0]:+5.2f}/{robust(sky)[1]:4.2f} ({len(sky)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--transients", type=int, default=60, help="transients per Mpix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--psfs", nargs="+", default=["given", "measured"], choices=["given", "measured"])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--kernel-basis", default="alard-lupton", choices=["alard-lupton", "delta", "psf-models"])
    parser.add_argument("--spatial-order", default="1", choices=["0", "1", "2", "auto"],
                        help="the kernel's spatial order (SubtractConfig.spatial_order)")
    args = parser.parse_args()
    scale = args.size / 1024
    print(f"truth pairs {args.size}^2, seeds {args.seeds}, {args.kernel_basis} basis, spatial order {args.spatial_order}, "
          f"{args.transients} transients "
          "per 1024^2, one core")
    print(f"{'regime':6} {'seed':>4} {'psfs':9} {'flavor':17} {'ksum%':>6} {'fwhm%':>6} {'nea%':>6} {'ratio3':>6} "
          f"{'pull3 med/std':>13} {'forced ratio, pull':>20} {'sky med/std':>12} {'false':>5} {'noise':>6} {'s':>5}")
    pooled = {}
    for regime in args.regimes:
        sci_fwhm, tpl_fwhm, flavors = REGIMES[regime]
        spec = TruthPairSpec(shape=(args.size, args.size), science_fwhm=sci_fwhm, template_fwhm=tpl_fwhm,
                             n_stars=round(120 * scale**2), n_galaxies=round(400 * scale**2),
                             n_transients=round(args.transients * scale**2))
        for seed in args.seeds:
            pair = simulate_truth_pair(spec, seed=seed)
            for psfs in args.psfs:
                for flavor in flavors:
                    t0 = time.perf_counter()
                    r = one_case(spec, psfs, flavor, pair, args.kernel_basis, args.spatial_order)
                    r["sky"] = robust(r["sky_z"])
                    pooled.setdefault((regime, psfs, flavor), []).append((*r["forced"], r["sky_z"]))
                    print(f"{regime:6} {seed:4d} {psfs:9} {flavor:17} {r['ksum']:+6.2f} {r['fwhm']:+6.1f} "
                          f"{r['nea']:+6.1f} {r['nea_cut']:+6.1f} {r['ratio3']:6.3f} "
                          f"{r['pull3'][0]:+6.2f}/{r['pull3'][1]:5.2f} "
                          f"{r['forced_ratio3']:7.3f} {r['forced_pull3'][0]:+6.2f}/{r['forced_pull3'][1]:5.2f} "
                          f"{r['sky'][0]:+5.2f}/{r['sky'][1]:5.2f} {r['false']:5.1f} {r['noise']:6.3f} "
                          f"{time.perf_counter() - t0:5.1f}", flush=True)
    if len(args.seeds) > 1:
        print_pooled(pooled)


if __name__ == "__main__":
    galsim.GSParams()  # galsim imported first: its import-time cost is not any case's
    main()
