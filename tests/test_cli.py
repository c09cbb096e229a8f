"""The command line as a user meets it: config files, options after the subcommand, another tool's difference,
the output formats, one-line errors and pipes."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from dialab.cli import main
from dialab.exposure import read_exposure, write_exposure
from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair


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
    positive = cat[~cat.isNegative & (cat.snr > 10)]
    assert len(positive) and np.isfinite(positive.scienceFlux).all() and np.isfinite(positive.templateFlux).all()
    # a transient sits in the science image only: its forced science flux is its difference flux (unless it
    # landed on a star or galaxy), and the template has next to nothing there
    near = positive.merge(transients, how="cross")
    near = near[np.hypot(near.x_x - near.x_y, near.y_x - near.y_y) < 1.5]
    assert len(near) >= 5
    assert np.median(near.scienceFlux / near.psfFlux) == pytest.approx(1.0, abs=0.05)
    assert np.median(np.abs(near.templateFlux) / near.psfFlux) < 0.05


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
