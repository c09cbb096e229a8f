"""The command line as a user meets it: config files, options after the subcommand, another tool's difference,
the output formats, one-line errors and pipes."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits

from dialab import __version__
from dialab.cli import main
from dialab.exposure import read_exposure, write_exposure
from dialab.pipeline.prepare import prepare_science
from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair
from dialab.timing import peak_rss_mb


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small science/template pair with transients, written as dialab FITS (PSFs included)."""
    folder = tmp_path_factory.mktemp("cli")
    science, template, transients, _ = simulate_truth_pair(
        TruthPairSpec(shape=(512, 512), n_stars=120, n_galaxies=60, n_transients=12), seed=5)
    write_exposure(science, folder / "science.fits")
    write_exposure(template, folder / "template.fits")
    return folder, transients


def test_subtract_takes_a_config_file_and_options_after_the_subcommand(pair, capsys):
    folder, _ = pair
    (folder / "sub.yaml").write_text("flavor: convolveTemplate\nspatial_order: 0\nbackground_order: 1\n")
    out = folder / "diff.fits"
    assert main(["subtract", str(folder / "science.fits"), str(folder / "template.fits"), "-o", str(out),
                 "-c", str(folder / "sub.yaml"), "--flavor", "auto", "-v"]) == 0
    printed = capsys.readouterr()
    assert "kernel sum" in printed.out
    assert "kernel fit:" in printed.err  # -v after the subcommand: the subtraction's decisions are logged
    header = fits.getheader(out, 0)
    assert header["DIAFLAV"] in ("convolveTemplate", "convolveScience") and header["DIACONV"] in ("template", "science")
    assert header["KERNBAS"] == "alard-lupton"
    assert header["KERNSUM"] == pytest.approx(0.8, rel=0.02)  # the pair's true flux ratio (auto: convolveTemplate)
    assert 0.8 < header["NOISERAT"] < 1.3
    assert header["DIALABV"]
    kernel = fits.getdata(out, "KERNEL")
    assert kernel.shape[0] % 2 == 1  # a spatially constant kernel (spatial_order 0 from the file) was used


def test_detect_another_tools_difference_with_science_and_template(pair, capsys):
    folder, transients = pair
    out = folder / "diff.fits"
    if not out.exists():
        assert main(["subtract", str(folder / "science.fits"), str(folder / "template.fits"), "-o", str(out)]) == 0
    # another tool's difference: image, mask and variance but no PSF HDU; its PSF in a separate stamp file
    diff = read_exposure(out)
    fits.PrimaryHDU(diff.psf.stamp().astype(np.float32)).writeto(folder / "diff_psf.fits", overwrite=True)
    diff.psf = None
    write_exposure(diff, folder / "other.fits")
    assert main(["detect", str(folder / "other.fits"), "-o", str(folder / "x.parquet")]) == 2
    assert "--psf" in capsys.readouterr().err
    table = folder / "sources.csv"
    assert main(["detect", str(folder / "other.fits"), "-o", str(table), "--psf", str(folder / "diff_psf.fits"),
                 "--science", str(folder / "science.fits"), "--template", str(folder / "template.fits")]) == 0
    cat = pd.read_csv(table)  # -o *.csv writes CSV
    assert len(cat) >= 6 and cat.diaSourceId.is_unique
    # the other tool's difference gets the science's aperture correction: its new sources have that PSF
    plain = folder / "plain.csv"
    assert main(["detect", str(folder / "other.fits"), "-o", str(plain), "--psf", str(folder / "diff_psf.fits")]) == 0
    uncorrected = pd.read_csv(plain)
    correction = prepare_science(folder / "science.fits").psf.aperture_correction
    assert abs(correction.value - 1) > 0.005  # the given 41-px stamps hold more than the 3-FWHM aperture
    np.testing.assert_allclose(cat.psfFlux / uncorrected.psfFlux, correction(cat.x, cat.y), rtol=1e-5)
    positive = cat[~cat.isNegative & (cat.snr > 10)]
    assert len(positive) and np.isfinite(positive.scienceFlux).all() and np.isfinite(positive.templateFlux).all()
    # a transient sits in the science image only: its forced science flux is its difference flux (unless it
    # landed on a star or galaxy), and the template has next to nothing there
    near = positive.merge(transients, how="cross")
    near = near[np.hypot(near.x_x - near.x_y, near.y_x - near.y_y) < 1.5]
    assert len(near) >= 5
    assert np.median(near.scienceFlux / near.psfFlux) == pytest.approx(1.0, abs=0.05)
    assert np.median(np.abs(near.templateFlux) / near.psfFlux) < 0.05
    # with all three images the shipped model scores every diaSource; the transients are real
    assert cat.reliability.between(0, 1).all() and cat.reliabilityVersion.str.match(r"^r[0-9a-f]{6}$").all()
    assert (near.reliability >= 0.5).mean() >= 0.8


@pytest.mark.parametrize("args,message", [
    (["detect", "{diff}", "-o", "{folder}/x.parquet", "--threshold", "0"], "threshold"),
    (["detect", "{diff}", "-o", "{folder}/x.parquet", "--threshold", "-5"], "threshold"),
    (["detect", "{diff}", "-o", "{folder}/x.parquet", "--threshold", "nan"], "threshold"),
    (["detect", "{diff}", "-o", "{folder}/nowhere/x.parquet"], "does not exist"),
    (["detect", "{diff}", "-o", "{folder}/x.txt"], "unknown output type"),
    (["subtract", "{folder}/science.fits", "{folder}/template.fits", "-o", "{folder}"], "is a folder"),
    (["subtract", "{folder}/science.fits", "{folder}/template.fits", "-o", "{folder}/d.fits", "-c",
      "{folder}/bad.yaml"], "kernel_degree"),
])
def test_bad_options_are_one_line_errors(pair, capsys, args, message):
    folder, _ = pair
    (folder / "bad.yaml").write_text("kernel_degree: [4, 2]\n")
    before = sorted(p.name for p in folder.iterdir())
    args = [a.format(folder=folder, diff=folder / "science.fits") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing half-written


def test_info_into_a_closed_pipe_ends_quietly(pair):
    folder, _ = pair
    run = subprocess.run(f"'{sys.executable}' -m dialab.cli info '{folder / 'science.fits'}' | head -1",
                         shell=True, capture_output=True, text=True)
    assert run.stdout.startswith("file") and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr


def test_a_bug_is_one_line_and_exit_1_with_its_traceback_under_v(pair, capsys, monkeypatch):
    import dialab.cli

    def broken(args):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(dialab.cli, "_cmd_info", broken)
    science = str(pair[0] / "science.fits")
    assert main(["info", science]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error: ZeroDivisionError" in err and "-v" in err
    assert main(["-v", "info", science]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_inputs(pair):
    """Broken files of every kind, beside the good pair."""
    folder, _ = pair
    bad = folder / "bad"
    bad.mkdir(exist_ok=True)
    good = (folder / "science.fits").read_bytes()
    (bad / "truncated.fits").write_bytes(good[: len(good) // 3])
    (bad / "text.fits").write_text("not a FITS file\n")
    fits.PrimaryHDU(np.zeros((3, 40, 40), np.float32)).writeto(bad / "cube.fits", overwrite=True)
    fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32)).writeto(bad / "nan.fits", overwrite=True)
    fits.PrimaryHDU(np.ones((10, 10), np.float32) / 100).writeto(bad / "even_psf.fits", overwrite=True)
    fits.PrimaryHDU(np.ones((7, 7), np.float32)).writeto(bad / "small_noise.fits", overwrite=True)
    (bad / "not_apdb.yaml").write_text("hello: world\n")
    (bad / "bad_key.yaml").write_text("subtract:\n  flavr: auto\n")
    science, template = folder / "science.fits", folder / "template.fits"
    entry = {"visit": 1, "detector": 1, "band": "r", "mjd": 60000.0, "science": str(science), "template": str(template)}
    for name, change in (("nan_mjd", {"mjd": float("nan")}), ("no_template", {"template": None}),
                         ("big_detector", {"detector": 5000})):
        e = {k: v for k, v in {**entry, **change}.items() if v is not None}
        (bad / f"{name}.yaml").write_text(yaml.safe_dump({"entries": [e]}))
    (bad / "unknown_key.yaml").write_text(yaml.safe_dump({"entries": [entry], "entrys": []}))
    (bad / "empty_run").mkdir(exist_ok=True)
    return folder, bad


BAD_INPUTS = [  # (command line with {f} = the pair's folder, {b} = the broken files, a word the message must hold)
    ("info {b}/missing.fits", "missing.fits"),
    ("info {b}", "directory"),
    ("info {b}/text.fits", "text.fits"),
    ("info {b}/truncated.fits", "truncated"),
    ("info {b}/cube.fits", "cube"),
    ("info {b}/nan.fits", "non-finite"),
    ("info {f}/science.fits --psf {b}/even_psf.fits", "even_psf.fits"),
    ("info {f}/science.fits --noise {b}/small_noise.fits", "small_noise.fits"),
    ("subtract {f}/science.fits {b}/missing.fits -o {f}/d.fits", "missing.fits"),
    ("subtract {f}/science.fits {b}/truncated.fits -o {f}/d.fits", "truncated"),
    ("subtract {f}/science.fits {f}/template.fits -o {f}", "is a folder"),
    ("subtract {f}/science.fits {f}/template.fits -o {f}/nowhere/d.fits", "does not exist"),
    ("subtract {f}/science.fits {f}/template.fits -o {f}/d.fits -c {b}/missing.yaml", "missing.yaml"),
    ("subtract {f}/science.fits {f}/template.fits -o {f}/d.fits -c {b}/bad_key.yaml", "flavr"),
    ("subtract {f}/science.fits {f}/template.fits -o {f}/d.fits --workers 0", "workers"),
    ("detect {f}/science.fits -o {f}/x.parquet --threshold 0", "threshold"),
    ("detect {f}/science.fits -o {f}/x.parquet --threshold -5", "threshold"),
    ("detect {f}/science.fits -o {f}/x.parquet --threshold nan", "threshold"),
    ("detect {f}/science.fits -o {f}/nowhere/x.parquet", "does not exist"),
    ("detect {f}/science.fits -o {f}/x.txt", "unknown output type"),
    ("detect {b}/nan.fits -o {f}/x.parquet", "nan.fits"),
    ("detect {f}/science.fits -o {f}/x.parquet --psf {b}/missing.fits", "missing.fits"),
    ("simulate hsc-sprint-mini -o {f}/sim --seed -1", "seed"),
    ("simulate hsc-sprint-mini -o {f}/sim --size 100000 100000", "GiB"),
    ("simulate hsc-sprint-mini -o {f}/sim --size 10 10", "at least 128"),
    ("simulate no-such-spec -o {f}/sim", "no-such-spec"),
    ("simulate hsc-sprint-mini -o {f}/sim --workers 0", "workers"),
    ("apdb create mysql://u@host/db -c {f}/a.yaml", "mysql"),
    ("apdb create postgresql://u:pw@host:notaport/db -c {f}/a.yaml", "not a database URL"),
    ("apdb create {f}/db.sqlite3 -c /proc/dialab-test/apdb.yaml", "/proc/dialab-test/apdb.yaml"),
    ("apdb create {f}/db.sqlite3 -c {b}", "is a folder"),
    ("apdb summary {b}/missing.yaml", "missing.yaml"),
    ("apdb summary {b}/not_apdb.yaml", "not an APDB config"),
    ("run {b}/missing.yaml -o {f}/run", "missing.yaml"),
    ("run {b}/nan_mjd.yaml -o {f}/run", "mjd"),
    ("run {b}/no_template.yaml -o {f}/run", "template"),
    ("run {b}/big_detector.yaml -o {f}/run", "detector"),
    ("run {b}/unknown_key.yaml -o {f}/run", "entrys"),
    ("run {b}/nan_mjd.yaml -o {f}/run -p {b}/bad_key.yaml", "flavr"),
    ("report {b}/missing -o {f}/rep", "missing"),
    ("report {b}/empty_run -o {f}/rep", "run.yaml"),
]


@pytest.mark.parametrize("command, word", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_every_bad_input_is_one_line_and_exit_2(bad_inputs, capsys, command, word):
    folder, bad = bad_inputs
    args = command.format(f=folder, b=bad).split()
    before = sorted(str(p) for p in folder.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"dialab {args[0]}: error:") and word in err, err
    assert sorted(str(p) for p in folder.rglob("*")) == before  # nothing half-written


def test_subtract_with_the_delta_basis_records_it_and_its_penalty(pair):
    folder, _ = pair
    out = folder / "diff_delta.fits"
    assert main(["subtract", str(folder / "science.fits"), str(folder / "template.fits"), "-o", str(out),
                 "--kernel-basis", "delta"]) == 0
    header = fits.getheader(out, 0)
    assert header["KERNBAS"] == "delta" and header["KERNREG"] > 0
    assert header["KERNSUM"] == pytest.approx(0.8, rel=0.02)


def test_subtract_runs_without_loading_the_table_and_statistics_libraries(pair):
    """`dialab subtract` measures PSFs and aperture corrections but writes no table: pandas (with pyarrow) and
    scipy.stats cost it 0.9 s of imports and 90 MB of resident memory when its F tests and star fluxes used them."""
    folder, _ = pair
    code = f"""
import sys
from dialab.cli import main
assert main(["-q", "subtract", "{folder / 'science.fits'}", "{folder / 'template.fits'}", "-o",
             "{folder / 'diff_imports.fits'}"]) == 0
print(sorted(m for m in ("pandas", "pyarrow", "scipy.stats") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    """bench/ times each subtraction in a fresh process started by one that simulated the pair: Linux's ru_maxrss
    carries the parent's peak across exec, which hid every peak below it (all methods read 738 MB)."""
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB touched here, before the child starts
    code = "from dialab.timing import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert ballast.sum() > 0 and peak_rss_mb() > 400
    assert child < 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings (Linux)")
def test_freed_large_arrays_are_reused_without_page_faults():
    """A full-size plane of a large image is above glibc's mmap threshold: each temporary came as fresh pages,
    one fault per page on first touch (a third of `dialab subtract`'s time was system time). With
    ``keep_freed_memory`` (the CLI and every pipeline worker) a freed plane is reused."""
    code = """
import resource, sys, numpy as np
from dialab.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(48 * 2**20 // 8); del a
before = faults()
for _ in range(5):
    a = np.ones(48 * 2**20 // 8); del a
print((faults() - before) / 5)
"""
    per_array = {mode: float(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                            check=True).stdout) for mode in ("keep", "default")}
    assert per_array["keep"] < 20, per_array  # of 12288 pages (96 with 2 MB huge pages)
    assert per_array["default"] > 5 * max(per_array["keep"], 1), per_array


def test_the_step_that_raised_the_peak_memory_is_named():
    """bench/ prints where a subtraction's peak memory is reached: the step whose block last raised it."""
    code = """
import numpy as np
from dialab.timing import peak_step, timed
with timed("large"):
    a = np.ones(300 * 2**20 // 8)
del a
with timed("small"):
    b = np.ones(1000)
print(peak_step())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "large"


def test_version_loads_no_numpy_and_subtract_loads_no_pandas():
    """Start-up: `dialab --version` (and --help) imports neither numpy nor pydantic, and what `dialab subtract`
    imports (its configs included) leaves pandas unloaded; lazily loaded modules count only once used."""
    code = """
import sys
from dialab.cli import main
try:
    main(["--version"])
except SystemExit:
    pass
print("numpy._core.multiarray" in sys.modules, "pydantic.main" in sys.modules)
import dialab.pipeline.config, dialab.pipeline.prepare, dialab.pipeline.repository, dialab.subtraction.flavors
print("pandas.core.frame" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["dialab", __version__, "False", "False", "False"], out

