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


def _cmd_subtract(args: argparse.Namespace) -> int:
    from .pipeline.config import RepairConfig
    from .pipeline.prepare import prepare_science, prepare_template
    from .pipeline.repository import write_difference
    from .subtraction import SubtractConfig, subtract

    science = prepare_science(args.science, args.science_psf, args.science_noise,
                              repair=RepairConfig(cosmic_rays=not args.keep_cosmic_rays))
    template = prepare_template(science, args.template, args.template_psf, args.template_noise)
    config = SubtractConfig(flavor=args.flavor, decorrelate=not args.no_decorrelate)
    result = subtract(science, template, config)
    write_difference(result, args.output)
    d = result.diagnostics
    print(f"{args.output}: flavor {d.flavor} (convolved {d.convolved}), kernel sum {d.kernel_sum:.4f}, "
          f"candidates {d.n_used}/{d.n_candidates}, noise ratio {d.noise_ratio:.3f}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from .detection import DetectConfig
    from .exposure import read_exposure
    from .measurement import BAD_FLAGS, detect_and_measure

    diff = read_exposure(args.difference)
    if diff.psf is None:
        from .errors import BadInputError

        raise BadInputError("the difference has no PSF HDU (write it with dialab subtract)", args.difference)
    cat, _, _ = detect_and_measure(diff, detect_config=DetectConfig(threshold=args.threshold))
    cat.to_parquet(args.output)
    flagged = int(cat[list(BAD_FLAGS)].any(axis=1).sum()) if len(cat) else 0
    pos = int((~cat.isNegative & ~cat.isDipole).sum()) if len(cat) else 0
    neg = int((cat.isNegative & ~cat.isDipole).sum()) if len(cat) else 0
    dipoles = int(cat.isDipole.sum()) if len(cat) else 0
    print(f"{args.output}: {len(cat)} diaSources ({pos} positive, {neg} negative, {dipoles} dipoles, {flagged} flagged)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    index = run_demo(args.output, seed=args.seed, workers=args.workers)
    print(f"report: {index.resolve()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import build_report

    index = build_report(args.runs, args.output)
    print(f"report: {index.resolve()}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import time

    from .errors import BadInputError
    from .simulate.specs import get_spec
    from .simulate.survey import simulate_dataset

    spec = get_spec(args.spec)
    if args.size is not None:
        nx, ny = args.size
        if nx < 128 or ny < 128:
            raise BadInputError(f"--size {nx} {ny}: the CCD must be at least 128 x 128 pixels")
        spec = spec.scaled((ny, nx))
    if args.workers is not None and args.workers < 1:
        raise BadInputError(f"--workers {args.workers}: need at least one worker")
    t0 = time.perf_counter()
    manifest = simulate_dataset(spec, args.output, seed=args.seed, workers=args.workers)
    print(f"{manifest}: {spec.name}, seed {args.seed}, {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_apdb(args: argparse.Namespace) -> int:
    from .apdb import create_apdb, open_apdb

    if args.apdb_command == "create":
        path = create_apdb(args.url, args.config, namespace=args.namespace)
        print(f"{path}: APDB created")
        return 0
    counts = open_apdb(args.config).counts()
    width = max(len(t) for t in counts.table)
    print(f"{'table':<{width}}  {'band':>4}  {'rows':>9}")
    for row in counts.itertuples():
        print(f"{row.table:<{width}}  {row.band:>4}  {row.rows:>9}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline.config import load_pipeline
    from .pipeline.runner import run_pipeline

    overrides: dict = {"execution": {}}
    if args.executor:
        overrides["execution"]["executor"] = args.executor
    if args.workers is not None:
        overrides["execution"]["workers"] = args.workers
    if args.scheduler:
        overrides["execution"]["scheduler"] = args.scheduler
    if args.fakes:
        overrides["inject"] = {"enabled": True}
    config = load_pipeline(args.pipeline, overrides)
    result = run_pipeline(args.manifest, config, args.output, flavors=args.flavor, resume=args.resume,
                          apdb_url=args.apdb)
    stored = ", ".join(f"{f} {n}" for f, n in result.stored.items())
    print(f"{args.output}: {result.done} units done, {result.skipped} skipped (done before), "
          f"{len(result.failures)} failed; (visit, detector)s stored in the APDB: {stored}; {result.seconds:.0f} s")
    for label, reason in result.failures:
        print(f"  failed {label}: {reason}")
    if result.association_stopped:
        print("  association waits for: " + ", ".join(f"{f} visit {v}" for f, v in result.association_stopped.items()))
    return 0 if result.ok else 1


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

    from .subtraction import FLAVORS

    sub_p = sub.add_parser("subtract", help="PSF-matched difference of a science image and a template")
    sub_p.add_argument("science", help="science FITS")
    sub_p.add_argument("template", help="template FITS (warped onto the science grid when the WCSs differ)")
    sub_p.add_argument("-o", "--output", required=True, help="difference FITS to write")
    sub_p.add_argument("--flavor", choices=FLAVORS, default="convolveTemplate")
    sub_p.add_argument("--science-psf", help="science PSF stamp FITS (else measured)")
    sub_p.add_argument("--template-psf", help="template PSF stamp FITS (else measured)")
    sub_p.add_argument("--science-noise", help="science 1-sigma noise map FITS")
    sub_p.add_argument("--template-noise", help="template 1-sigma noise map FITS")
    sub_p.add_argument("--no-decorrelate", action="store_true", help="keep the convolved noise correlations")
    sub_p.add_argument("--keep-cosmic-rays", action="store_true",
                       help="do not find and interpolate over cosmic rays in the science image first")
    sub_p.set_defaults(func=_cmd_subtract)

    det = sub.add_parser("detect", help="detect and measure diaSources on a difference image")
    det.add_argument("difference", help="difference FITS written by dialab subtract")
    det.add_argument("-o", "--output", required=True, help="diaSources Parquet file")
    det.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma")
    det.set_defaults(func=_cmd_detect)

    from .simulate.specs import SPECS

    sim = sub.add_parser("simulate", help="write a simulated dataset with its manifest and truth tables")
    sim.add_argument("spec", help=f"dataset spec: {', '.join(SPECS)}")
    sim.add_argument("-o", "--output", required=True, help="folder to write the dataset into")
    sim.add_argument("--seed", type=int, default=1, help="same spec and seed give identical files")
    sim.add_argument("--workers", type=int, help="processes rendering in parallel (default: the core count)")
    sim.add_argument("--size", type=int, nargs=2, metavar=("NX", "NY"), help="CCD size instead of the spec's")
    sim.set_defaults(func=_cmd_simulate)

    apdb = sub.add_parser("apdb", help="create an APDB or summarise one")
    apdb_sub = apdb.add_subparsers(dest="apdb_command", required=True)
    create = apdb_sub.add_parser("create", help="make the APDB tables and write the config file")
    create.add_argument("url", help="SQLite file path, or a database URL (postgresql://user@host:port/db)")
    create.add_argument("-c", "--config", default="apdb.yaml", help="APDB config file to write")
    create.add_argument("--namespace", help="PostgreSQL schema to hold the tables (one per run)")
    summary = apdb_sub.add_parser("summary", help="rows per table and band")
    summary.add_argument("config", help="APDB config file (apdb.yaml)")
    apdb.set_defaults(func=_cmd_apdb)

    run = sub.add_parser("run", help="run a pipeline over a dataset manifest (every unit, then the APDB)")
    run.add_argument("manifest", help="dataset.yaml")
    run.add_argument("-p", "--pipeline", action="append", default=[],
                     help="pipeline YAML (repeat to layer, e.g. pipelines/default.yaml pipelines/with_fakes.yaml)")
    run.add_argument("-o", "--output", required=True, help="output repository folder")
    run.add_argument("--flavor", action="append", choices=FLAVORS, help="flavor(s) to run (default: the config's)")
    run.add_argument("--executor", choices=("local", "dask"))
    run.add_argument("--workers", type=int, help="parallel units (default: the core count)")
    run.add_argument("--scheduler", help="Dask scheduler address (default: a LocalCluster)")
    run.add_argument("--apdb", help="APDB database URL (default: a SQLite file per flavor in the output)")
    run.add_argument("--fakes", action="store_true", help="inject fakes (same as inject.enabled: true)")
    run.add_argument("--resume", action="store_true", help="continue a run: skip done units, store nothing twice")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="compare the flavors of one or more runs: tables, figures, index.html")
    rep.add_argument("runs", nargs="+", help="run folders written by dialab run")
    rep.add_argument("-o", "--output", required=True, help="report folder")
    rep.set_defaults(func=_cmd_report)

    demo = sub.add_parser("demo", help="simulate hsc-sprint-mini, run every flavor with fakes, write the report")
    demo.add_argument("-o", "--output", default="demo-output", help="folder for the demo's files")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--workers", type=int, help="parallel units (default: the core count)")
    demo.set_defaults(func=_cmd_demo)
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
