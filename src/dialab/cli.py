"""The ``dialab`` command line: one subcommand per job; bad input is a one-line error with exit status 2, a bug
one line with exit status 1 (its traceback with -v)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from ._version import __version__
from .allocator import keep_freed_memory
from .errors import BadInputError, DialabError, RunInterrupted
from .lazy import lazy_module

# loaded on first use: `dialab --version` and `dialab --help` import neither
np = lazy_module("numpy")
pydantic = lazy_module("pydantic")

EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 1


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


def _method(name: str) -> str:
    """``--flavor`` of a run: a flavor, or flavor.basis."""
    from .subtraction.methods import parse_method

    try:
        parse_method(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _subtract_settings(args: argparse.Namespace):
    """The subtraction and repair configuration: a YAML file (a pipeline file or bare subtract keys), then the
    command-line options over it."""
    from .pipeline.config import PipelineConfig, load_pipeline, subtract_section
    from .subtraction import SubtractConfig

    config = load_pipeline([args.config], wrap=subtract_section) if args.config else PipelineConfig()
    overrides = {"flavor": args.flavor, "workers": args.workers, "kernel_basis": args.kernel_basis,
                 "decorrelate": False if args.no_decorrelate else None}
    subtract = config.subtract.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    repair = config.repair.model_copy(update={"cosmic_rays": False}) if args.keep_cosmic_rays else config.repair
    return SubtractConfig.model_validate(subtract.model_dump()), repair


def _cmd_subtract(args: argparse.Namespace) -> int:
    from .pipeline.prepare import prepare_science, prepare_template, release_sky
    from .pipeline.repository import write_difference
    from .subtraction import subtract
    from .timing import timed

    check_output_path(args.output, (".fits", ".fit", ".fits.gz", ".fits.fz"))
    config, repair = _subtract_settings(args)
    config = config.model_copy(update={"keep_matched": False})  # only the difference is written
    science = release_sky(prepare_science(args.science, args.science_psf, args.science_noise, repair=repair,
                                          aperture_correction=config.aperture_correction))
    template = release_sky(prepare_template(science, args.template, args.template_psf, args.template_noise,
                                            config.aperture_correction))
    result = subtract(science, template, config)
    with timed("write"):
        write_difference(result, args.output, args.compress)
    d = result.diagnostics
    # a kernel that deconvolves is a fit, not a match: said where the user looks (auto convolves the sharper image)
    deconvolving = ", deconvolving: --flavor auto convolves the sharper image" if d.deconvolving else ""
    print(f"{args.output}: flavor {d.flavor} (convolved {d.convolved}{deconvolving}), kernel sum {d.kernel_sum:.4f}, "
          f"candidates {d.n_used}/{d.n_candidates}, noise ratio {d.noise_ratio:.3f}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from .detection import DetectConfig
    from .exposure import read_exposure
    from .measurement import BAD_FLAGS, MeasureConfig, detect_and_measure
    from .pipeline.prepare import prepare_science, prepare_template

    fmt = check_output_path(args.output, (".parquet", ".pq", ".csv"))
    diff = read_exposure(args.difference, psf=args.psf)
    if diff.psf is None:
        raise BadInputError("the difference has no PSF HDU: give --psf (a PSF stamp FITS)", args.difference)
    science = prepare_science(args.science, args.science_psf) if args.science else None
    if science is not None and diff.psf.aperture_correction is None:  # another tool's difference: new sources
        diff.psf = diff.psf.with_aperture_correction(science.psf.aperture_correction)  # have the science's PSF
    template = None
    if args.template:
        grid = science or diff
        template = prepare_template(grid, args.template, args.template_psf)
    measure = {} if args.peak_prominence is None else {"peak_prominence": args.peak_prominence}
    cat, _, _ = detect_and_measure(diff, science=science, matched_template=template,
                                   detect_config=DetectConfig(threshold=args.threshold),
                                   measure_config=MeasureConfig(**measure))
    if science is not None and template is not None:  # the model looks at all three images
        from .reliability import load_model, score

        cat = score(cat, template, science, diff, load_model(args.reliability_model))
    if fmt == ".csv":
        cat.to_csv(args.output, index=False)
    else:
        cat.to_parquet(args.output)
    flagged = int(cat[list(BAD_FLAGS)].any(axis=1).sum()) if len(cat) else 0
    pos = int((~cat.isNegative & ~cat.isDipole).sum()) if len(cat) else 0
    neg = int((cat.isNegative & ~cat.isDipole).sum()) if len(cat) else 0
    dipoles = int(cat.isDipole.sum()) if len(cat) else 0
    print(f"{args.output}: {len(cat)} diaSources ({pos} positive, {neg} negative, {dipoles} dipoles, {flagged} flagged)")
    return 0


def check_output_path(path: str, suffixes: tuple[str, ...]) -> str:
    """The output's format (its suffix) when the path can be written: a known suffix, an existing folder."""
    target = Path(path)
    if target.is_dir():
        raise BadInputError("is a folder: give a file name", path)
    if not target.parent.is_dir():
        raise BadInputError(f"folder {target.parent} does not exist", path)
    suffix = next((x for x in suffixes if target.name.lower().endswith(x)), None)
    if suffix is None:
        raise BadInputError(f"unknown output type: name it {' or '.join('*' + x for x in suffixes)}", path)
    return suffix


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
    if args.reliability_model:
        from .reliability import load_model

        load_model(args.reliability_model)  # a bad file fails here, before any unit
        overrides["reliability"] = {"model": str(Path(args.reliability_model).resolve())}
    config = load_pipeline(args.pipeline, overrides)
    try:
        result = run_pipeline(args.manifest, config, args.output, flavors=args.flavor, resume=args.resume,
                              apdb_url=args.apdb, skip_failed=args.skip_failed, progress=not args.quiet)
    except RunInterrupted as exc:
        print(f"dialab run: {exc}: finished units are kept; continue with --resume", file=sys.stderr)
        return exc.exit_status
    stored = ", ".join(f"{f} {n}" for f, n in result.stored.items())
    print(f"{args.output}: {result.done} units done, {result.skipped} skipped (done before), "
          f"{len(result.failures)} failed; (visit, detector)s stored in the APDB: {stored}; {result.seconds:.0f} s")
    for label, reason in result.failures:
        print(f"  failed {label}: {reason}")
    if result.association_stopped:
        print("  association waits for: " + ", ".join(f"{f} visit {v}" for f, v in result.association_stopped.items()))
    return 0 if result.ok else 1


def _cmd_train_reliability(args) -> int:
    from .analysis.reliability_training import evaluate_runs, evaluation_text, train, training_table

    target = Path(args.output)
    if target.is_dir() or not target.parent.is_dir():
        raise BadInputError("give a file name in an existing folder", target)
    table = training_table(args.runs)
    model, evaluation = train(table, seed=args.seed, sources=[str(r) for r in args.runs])
    for run in args.test:
        for scope, result in evaluate_runs(model, [run]).items():
            evaluation[f"held-out run {run}: {scope}"] = result
    target.write_text(model.to_json())
    print(f"{target}: {model.version}, {len(model.trees)} trees on {len(model.feature_names)} features; "
          f"{len(table)} detections ({int(table.label.sum())} real)")
    print(evaluation_text(evaluation))
    return 0


def _cmd_vet(args) -> int:
    from .vet.labels import LabelStore

    if args.export_labels:
        if not (Path(args.run) / "run.yaml").is_file():
            raise BadInputError("not a dialab run folder (no run.yaml)", args.run)
        n = LabelStore(args.run).export_csv(args.export_labels)
        print(f"{args.export_labels}: {n} labels")
        return 0
    from .vet.server import serve

    try:
        serve(args.run, args.host, args.port, announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # port taken, address not ours
        raise BadInputError(f"cannot serve on {args.host}:{args.port} ({exc.strerror or exc})") from None
    return 0


def _verbosity(default) -> argparse.ArgumentParser:
    """-v and -q, accepted before and after the subcommand (after it, they do not reset what came before)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=default,
                        help="log progress and decisions (-vv: also third-party warnings and debug detail)")
    common.add_argument("-q", "--quiet", action="store_true", default=default if default is argparse.SUPPRESS
                        else False, help="print errors only")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dialab", description="Difference image analysis and its evaluation.",
                                     parents=[_verbosity(0)])
    parser.add_argument("--version", action="version", version=f"dialab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _verbosity(argparse.SUPPRESS)
    add = sub.add_parser

    def subcommand(name, **kwargs):
        return add(name, parents=[common], **kwargs)

    sub.add_parser = subcommand

    _add_image_commands(sub)
    _add_dataset_commands(sub)
    return parser


def _add_image_commands(sub) -> None:
    """info, subtract and detect: one image, one pair, one difference."""
    info = sub.add_parser("info", help="describe an image: shape, band, WCS, PSF, noise, mask planes")
    info.add_argument("file", help="FITS image (dialab layout or plain)")
    info.add_argument("--psf", help="PSF stamp FITS (odd size); measured from stars when absent")
    info.add_argument("--noise", help="1-sigma noise map FITS")
    info.add_argument("--mask", help="mask FITS (non-zero = BAD)")
    info.set_defaults(func=_cmd_info)

    from .subtraction.methods import BASES, FLAVORS

    sub_p = sub.add_parser("subtract", help="PSF-matched difference of a science image and a template")
    sub_p.add_argument("science", help="science FITS")
    sub_p.add_argument("template", help="template FITS (warped onto the science grid when the WCSs differ)")
    sub_p.add_argument("-o", "--output", required=True, help="difference FITS to write (*.fits)")
    sub_p.add_argument("--flavor", choices=FLAVORS,
                       help="which image is convolved: convolveTemplate (default; D = N - K*R), convolveScience "
                            "(D = K*N - R), auto (convolve the sharper image), preconvolution (the science image "
                            "filtered by its PSF first; writes the score image)")
    sub_p.add_argument("--kernel-basis", choices=BASES,
                       help="matching kernel basis: alard-lupton (default; Gaussians times polynomials), delta (a "
                            "free value per kernel pixel, regularized; PSFs with spikes or sharp cores), psf-models "
                            "(the kernel the two PSF models imply; only its sum is fitted)")
    sub_p.add_argument("-c", "--config", help="YAML with subtraction settings: a pipeline file (its subtract and "
                       "repair sections) or bare SubtractConfig keys such as 'spatial_order: 2'")
    sub_p.add_argument("--workers", type=int, help="FFT threads (default: the core count)")
    sub_p.add_argument("--science-psf", help="science PSF stamp FITS (else measured)")
    sub_p.add_argument("--template-psf", help="template PSF stamp FITS (else measured)")
    sub_p.add_argument("--science-noise", help="science 1-sigma noise map FITS")
    sub_p.add_argument("--template-noise", help="template 1-sigma noise map FITS")
    sub_p.add_argument("--no-decorrelate", action="store_true", help="keep the convolved noise correlations")
    sub_p.add_argument("--keep-cosmic-rays", action="store_true",
                       help="do not find and interpolate over cosmic rays in the science image first")
    sub_p.add_argument("--compress", choices=("none", "lossless", "quantized"), default="none",
                       help="FITS tile compression of the difference: none (default), lossless, or quantized "
                            "(floats to 1/128 of their noise, ~4x smaller; the mask always lossless)")
    sub_p.set_defaults(func=_cmd_subtract)

    det = sub.add_parser("detect", help="detect and measure diaSources on a difference image")
    det.add_argument("difference", help="difference FITS (written by dialab subtract, or by another tool with --psf)")
    det.add_argument("-o", "--output", required=True, help="diaSources table: *.parquet or *.csv")
    det.add_argument("--psf", help="PSF stamp FITS of the difference (when the file has no PSF HDU)")
    det.add_argument("--science", help="science FITS: forced PSF flux at each diaSource (scienceFlux)")
    det.add_argument("--science-psf", help="science PSF stamp FITS (else measured)")
    det.add_argument("--template", help="template FITS (PSF-matched or not): forced PSF flux (templateFlux)")
    det.add_argument("--template-psf", help="template PSF stamp FITS (else measured)")
    det.add_argument("--threshold", type=float, default=5.0, help="detection threshold in sigma")
    det.add_argument("--peak-prominence", type=float,
                     help="a footprint's weaker peak is its own diaSource when its filtered S/N rises this much above "
                          "the col to a stronger one (default: measure.peak_prominence's; inf: one per footprint and "
                          "sign, as LSST)")
    det.add_argument("--reliability-model", help="real/bogus model (dialab train-reliability; default: the shipped "
                     "one); reliability is scored when --science and --template are given")
    det.set_defaults(func=_cmd_detect)


def _add_dataset_commands(sub) -> None:
    """simulate, apdb, run, report and demo: datasets, databases and runs."""
    sim = sub.add_parser("simulate", help="write a simulated dataset with its manifest and truth tables")
    sim.add_argument("spec", help="dataset spec name, e.g. hsc-sprint-mini (an unknown name lists them all)")
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
    run.add_argument("--flavor", action="append", type=_method,
                     help="flavor(s) to run, each optionally with its kernel basis as flavor.basis (e.g. "
                          "convolveTemplate.delta; default: the config's flavors)")
    run.add_argument("--executor", choices=("local", "dask"), help="local processes (default) or a Dask cluster")
    run.add_argument("--workers", type=int, help="parallel units (default: the core count)")
    run.add_argument("--scheduler", help="Dask scheduler address (default: a LocalCluster)")
    run.add_argument("--apdb", help="APDB database URL (default: a SQLite file per flavor in the output)")
    run.add_argument("--fakes", action="store_true", help="inject fakes (same as inject.enabled: true)")
    run.add_argument("--reliability-model", help="real/bogus model for every diaSource (reliability.model; default: "
                     "the one shipped with dialab)")
    run.add_argument("--resume", action="store_true", help="continue a run: skip done units, store nothing twice")
    run.add_argument("--skip-failed", action="store_true",
                     help="units that fail are final: listed in failures.csv and run.yaml, and the APDB is filled "
                          "past them (without it, association waits at the first failed visit)")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="compare the flavors of one or more runs: tables, figures, index.html")
    rep.add_argument("runs", nargs="+", help="run folders written by dialab run")
    rep.add_argument("-o", "--output", required=True, help="report folder")
    rep.set_defaults(func=_cmd_report)

    train = sub.add_parser("train-reliability", help="train the real/bogus reliability model on runs with fakes "
                           "(and vetting labels)")
    train.add_argument("runs", nargs="+", help="run folders written by dialab run (with fakes)")
    train.add_argument("-o", "--output", required=True, help="model file to write (JSON)")
    train.add_argument("--test", action="append", default=[], metavar="RUN",
                       help="a run held out entirely (another seed, regime or field): evaluated, never trained on")
    train.add_argument("--seed", type=int, default=0, help="seed of the unit split and the trees")
    train.set_defaults(func=_cmd_train_reliability)

    vet = sub.add_parser("vet", help="a local web page of a run's candidates (cutouts) to label real or bogus")
    vet.add_argument("run", help="run folder written by dialab run (labels are stored in it: labels.sqlite)")
    vet.add_argument("--host", default="127.0.0.1", help="address to serve on (default: loopback only)")
    vet.add_argument("--port", type=int, default=8765, help="port (0: any free one; the address is printed)")
    vet.add_argument("--export-labels", metavar="CSV", help="write the run's labels as CSV and exit")
    vet.set_defaults(func=_cmd_vet)

    demo = sub.add_parser("demo", help="simulate hsc-sprint-mini, run every flavor with fakes, write the report")
    demo.add_argument("-o", "--output", default="demo-output", help="folder for the demo's files")
    demo.add_argument("--seed", type=int, default=1, help="the simulation's and the fakes' seed")
    demo.add_argument("--workers", type=int, help="parallel units (default: the core count)")
    demo.set_defaults(func=_cmd_demo)


def _configure_output(verbosity: int, quiet: bool) -> None:
    """dialab's warnings always show (unless -q); -v adds its progress and decisions, -vv third-party warnings."""
    level = logging.ERROR if quiet else logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity else \
        logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)
    if verbosity < 2:
        warnings.simplefilter("ignore")  # third-party chatter (FITS header fixes, deprecations)
        if not quiet:
            warnings.filterwarnings("default", module=r"dialab(\.|$)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_output(args.verbose, args.quiet)
    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except DialabError as exc:
        print(f"dialab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except pydantic.ValidationError as exc:  # a setting out of range (e.g. --threshold 0)
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
        print(f"dialab {args.command}: error: {problems}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader (e.g. head) has gone: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug, not the input: one line, and the traceback with -v
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else "; -v shows where"
        print(f"dialab {args.command}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              f"(a bug; please report it{hint})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
