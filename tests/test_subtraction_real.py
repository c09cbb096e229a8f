"""Subtraction of real telescope pairs from ../shared (DECam, pyDIA, NIRCam) and the `subtract` CLI."""

import numpy as np
from astropy.io import fits

from dialab.cli import main
from dialab.exposure import Exposure, read_exposure, write_exposure
from dialab.subtraction import SubtractConfig, subtract
from dialab.warp import align_to


def _decam_reference(real):
    """Mean of the five DEC-OBS18 frames (already on one WCS grid): deeper, with its own PSF."""
    frames = [read_exposure(real / "decam" / f"DEC-OBS18{c}.mini.fits") for c in "abcde"]
    image = np.mean([f.image for f in frames], axis=0)
    variance = np.sum([f.variance for f in frames], axis=0) / len(frames) ** 2
    mask = np.bitwise_or.reduce([f.mask for f in frames])
    return Exposure(image=image, mask=mask, variance=variance, wcs=frames[0].wcs, path="DEC-OBS18 mean")


def _check(name, science, template, flavor="convolveTemplate"):
    res = subtract(science, align_to(template, science), SubtractConfig(flavor=flavor))
    d = res.diagnostics
    print(f"{name}: {d.summary()}")
    assert 0.8 <= d.noise_ratio <= 1.3
    return res


def test_decam_science_minus_coadded_reference(real_data):
    science = read_exposure(real_data / "decam" / "DEC-OBS04a.mini.fits")
    res = _check("DECam 04a - 18 mean", science, _decam_reference(real_data))
    assert res.diagnostics.convolved == "template"  # the science PSF is the wider one


def test_pydia_sharp_frame_auto_convolves_the_science(real_data):
    """I0100 has better seeing than any reference; the frames are not registered (no WCS)."""
    science = read_exposure(real_data / "pydia" / "AKB13475I0100.fits")
    template = read_exposure(real_data / "pydia" / "AKB13475I0028.fits")
    res = _check("pyDIA I0100 - I0028 (auto)", science, template, flavor="auto")
    assert res.diagnostics.convolved == "science"


def test_nircam_pair_with_given_psfs_and_noise_maps(real_data):
    d = real_data / "nircam"
    def load(stem):
        return read_exposure(d / f"{stem}.fits", psf=d / f"{stem}.WebbPSF.fits", noise=d / f"{stem}.noise.fits")
    science = load("jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp")
    template = load("jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp")
    _check("NIRCam t003 - t001", science, template)


def test_subtract_cli_writes_difference_and_kernel(real_data, tmp_path, capsys):
    science = real_data / "decam" / "DEC-OBS04a.mini.fits"
    template = tmp_path / "ref.fits"
    write_exposure(_decam_reference(real_data), template)
    out = tmp_path / "diff.fits"
    assert main(["subtract", str(science), str(template), "-o", str(out), "--flavor", "preconvolution"]) == 0
    assert "kernel sum" in capsys.readouterr().out
    with fits.open(out) as hdul:
        assert {"IMAGE", "MASK", "VARIANCE", "PSF", "KERNEL", "SCORE"} <= {h.name for h in hdul}


def test_subtract_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    blank = tmp_path / "blank.fits"
    fits.PrimaryHDU(rng.normal(100, 1, (128, 128)).astype(np.float32)).writeto(blank)
    psf = tmp_path / "psf.fits"
    fits.PrimaryHDU(np.outer(np.hanning(9), np.hanning(9))).writeto(psf)
    code = main(["subtract", str(blank), str(blank), "-o", str(tmp_path / "d.fits"),
                 "--science-psf", str(psf), "--template-psf", str(psf)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "too few stars" in err or "kernel sources" in err
    assert main(["subtract", str(tmp_path / "missing.fits"), str(blank), "-o", str(tmp_path / "d.fits")]) == 2
    assert "missing.fits: file not found" in capsys.readouterr().err
