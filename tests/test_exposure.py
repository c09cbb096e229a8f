"""Exposure FITS I/O: exact round trips, plain telescope files, and clear errors on bad input."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from dialab.cli import main
from dialab.errors import BadInputError
from dialab.exposure import Exposure, bits_set, read_exposure, write_exposure
from dialab.psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf

from .conftest import make_exposure


def _wcs(shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = np.array([[-0.168, 0.001], [0.001, 0.168]]) / 3600
    return w


@pytest.mark.parametrize("psf", [
    GaussianPsf(sigma_pix=2.1, g1=0.03),
    MoffatPsf(fwhm_pix=4.2, beta=2.7),
    ImagePsf(GaussianPsf(sigma_pix=1.7).stamp(15)),
    GridPsf(np.array([GaussianPsf(sigma_pix=s).stamp(15) for s in (1.5, 2.0, 2.5, 3.0)]),
            np.array([10.0, 90.0, 10.0, 90.0]), np.array([10.0, 10.0, 50.0, 50.0])),
])
def test_write_then_read_is_exact(tmp_path, psf):
    rng = np.random.default_rng(3)
    shape = (60, 100)
    exp = make_exposure(rng.normal(size=shape), rng.uniform(0.5, 2, shape), psf=psf, wcs=_wcs(shape),
                        visit=11690, detector=49, band="g", mjd=57000.123456789, exptime=270.0, magzero=27.1,
                        gain=3.1, saturate=60000.0)
    exp.set_plane("SAT", rng.uniform(size=shape) > 0.9)
    exp.set_plane("MY_PLANE", rng.uniform(size=shape) > 0.95)
    exp.header["OBSERVER"] = "someone"
    path = tmp_path / "e.fits"
    write_exposure(exp, path)
    back = read_exposure(path)
    np.testing.assert_array_equal(back.image, exp.image)
    np.testing.assert_array_equal(back.variance, exp.variance)
    np.testing.assert_array_equal(back.mask, exp.mask)
    # the planes are byte-swapped in their read buffers: native, writeable, and the file itself untouched
    for plane in (back.image, back.variance, back.mask):
        assert plane.dtype.isnative and plane.flags.writeable
    np.testing.assert_array_equal(read_exposure(path).image, exp.image)
    assert back.mask_planes.bits == exp.mask_planes.bits
    for name in ("visit", "detector", "band", "mjd", "exptime", "magzero", "gain", "saturate"):
        assert getattr(back, name) == getattr(exp, name), name
    assert back.header["OBSERVER"] == "someone"
    assert type(back.psf) is type(psf)
    np.testing.assert_array_equal(back.psf.stamp(x=30, y=20), psf.stamp(x=30, y=20))
    pix = np.array([[0, 0], [50.5, 20.25], [99, 59]])
    np.testing.assert_array_equal(back.wcs.all_pix2world(pix, 0), exp.wcs.all_pix2world(pix, 0))


def test_plain_integer_fits_with_bzero_gain_and_saturation(tmp_path):
    """A raw-like uint16 frame: BZERO applied, SAT from SATURATE, variance from GAIN/RDNOISE."""
    rng = np.random.default_rng(4)
    sky, gain, rn = 1000.0, 2.0, 6.0
    truth = np.full((200, 200), sky)
    truth[100, 100] = 70000.0
    counts = rng.poisson(truth * gain) / gain + rng.normal(0, rn / gain, truth.shape)
    data = np.clip(np.round(counts), 0, 65535).astype(np.uint16)
    hdu = fits.PrimaryHDU(data)  # astropy stores uint16 as int16 with BZERO 32768
    hdu.header.update(GAIN=gain, RDNOISE=rn, SATURATE=65000.0, FILTER="r", EXPTIME=30.0)
    hdu.writeto(tmp_path / "raw.fits")
    assert fits.getheader(tmp_path / "raw.fits")["BZERO"] == 32768
    exp = read_exposure(tmp_path / "raw.fits")
    assert exp.image[5, 5] == data[5, 5]
    assert exp.plane("SAT")[100, 100] and exp.plane("SAT").sum() == 1
    expected_var = sky / gain + (rn / gain) ** 2
    assert np.median(exp.variance) == pytest.approx(expected_var, rel=0.05)
    pull = (exp.image - sky) / np.sqrt(exp.variance)
    assert np.std(pull[~exp.plane("SAT")]) == pytest.approx(1.0, abs=0.03)
    assert exp.band == "r"


def test_sky_subtracted_plain_fits_uses_measured_noise(tmp_path):
    """GAIN present but the sky removed: the variance follows the measured sky scatter."""
    rng = np.random.default_rng(5)
    data = rng.normal(0.0, 25.0, (256, 256))
    data[3, 7] = np.nan
    hdu = fits.PrimaryHDU(data)
    hdu.header.update(GAIN=4.0, RDNOISE=10.0)
    hdu.writeto(tmp_path / "sub.fits")
    exp = read_exposure(tmp_path / "sub.fits")
    assert np.median(np.sqrt(exp.variance)) == pytest.approx(25.0, rel=0.05)
    assert exp.plane("NO_DATA")[3, 7] and exp.plane("NO_DATA").sum() == 1
    assert np.isfinite(exp.image).all()


def test_separate_noise_mask_and_psf_files(tmp_path):
    rng = np.random.default_rng(6)
    fits.PrimaryHDU(rng.normal(size=(50, 50)).astype(np.float32)).writeto(tmp_path / "img.fits")
    sigma = np.full((50, 50), 0.5, np.float32)
    sigma[0, 0] = 0.0
    fits.PrimaryHDU(sigma).writeto(tmp_path / "noise.fits")
    m = np.zeros((50, 50), np.int16)
    m[10, 10] = 1
    fits.PrimaryHDU(m).writeto(tmp_path / "mask.fits")
    fits.PrimaryHDU(GaussianPsf(sigma_pix=2.0).stamp(21) * 7.0).writeto(tmp_path / "psf.fits")
    exp = read_exposure(tmp_path / "img.fits", psf=tmp_path / "psf.fits", noise=tmp_path / "noise.fits",
                        mask=tmp_path / "mask.fits")
    assert exp.variance[5, 5] == pytest.approx(0.25)
    assert exp.plane("NO_DATA")[0, 0] and exp.plane("BAD")[10, 10]
    assert exp.psf.stamp().sum() == pytest.approx(1.0)
    assert exp.psf.sigma == pytest.approx(2.0, rel=1e-3)


def _bad_inputs(tmp_path):
    """(name, path, extra CLI args, expected words) for each kind of bad input."""
    cases = [("missing", tmp_path / "nope.fits", [], "file not found")]
    (tmp_path / "text.fits").write_text("this is not FITS\n")
    cases.append(("not fits", tmp_path / "text.fits", [], "not a readable FITS"))
    fits.PrimaryHDU().writeto(tmp_path / "empty.fits")
    cases.append(("empty", tmp_path / "empty.fits", [], "no 2-d image"))
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((10, 10), np.float32), name="IMAGE"),
                  fits.ImageHDU(np.zeros((10, 10), np.int32), name="MASK"),
                  fits.ImageHDU(np.zeros((10, 12), np.float32), name="VARIANCE")]).writeto(tmp_path / "shape.fits")
    cases.append(("shape", tmp_path / "shape.fits", [], "VARIANCE shape"))
    fits.PrimaryHDU(np.full((10, 10), np.nan, np.float32)).writeto(tmp_path / "nan.fits")
    cases.append(("all nan", tmp_path / "nan.fits", [], "non-finite"))
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(np.random.default_rng(0).normal(size=(40, 40)).astype(np.float32)).writeto(good)
    fits.PrimaryHDU(np.ones((4, 4))).writeto(tmp_path / "even.fits")
    cases.append(("even psf", good, ["--psf", str(tmp_path / "even.fits")], "even size"))
    fits.PrimaryHDU(np.zeros((5, 5))).writeto(tmp_path / "zero.fits")
    cases.append(("zero psf", good, ["--psf", str(tmp_path / "zero.fits")], "sum"))
    return cases


def test_bad_inputs_give_one_line_naming_file_and_exit_2(tmp_path, capsys):
    for name, path, extra, words in _bad_inputs(tmp_path):
        assert main(["info", str(path), *extra]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (name, err)
        culprit = extra[-1] if extra else str(path)
        assert culprit in err and words in err, (name, err)
        with pytest.raises(BadInputError):
            read_exposure(path, psf=extra[-1] if extra else None)


def test_exposure_refuses_mismatched_planes():
    with pytest.raises(BadInputError, match="VARIANCE shape"):
        Exposure(np.zeros((5, 5)), np.zeros((5, 5), np.int32), np.zeros((4, 5)))


def test_lossless_compression_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(4)
    shape = (70, 130)
    exp = make_exposure(rng.normal(size=shape), rng.uniform(0.5, 2, shape), psf=GaussianPsf(sigma_pix=2.0),
                        wcs=_wcs(shape), visit=3, detector=7, band="r")
    exp.set_plane("SAT", rng.uniform(size=shape) > 0.9)
    plain, packed = tmp_path / "plain.fits", tmp_path / "packed.fits"
    write_exposure(exp, plain)
    write_exposure(exp, packed, compression="lossless")
    back = read_exposure(packed)
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(exp, name), err_msg=name)
    with fits.open(packed) as hdul:
        assert isinstance(hdul["MASK"], fits.CompImageHDU) and isinstance(hdul["IMAGE"], fits.CompImageHDU)


def test_quantized_difference_keeps_fluxes_within_a_percent_of_their_errors(tmp_path):
    """Quantized (by default to 1/128 of the noise): forced PSF fluxes move by 0.29/128 of their errors (rms),
    each by < 1%; the noise grows by < 0.01%, zeros (no data) and the mask stay exact, the file is 3x smaller."""
    from dialab.photometry import forced_psf_flux

    rng = np.random.default_rng(5)
    shape, sigma = (512, 512), 10.0
    psf = GaussianPsf(sigma_pix=2.0)
    image = rng.normal(0, sigma, shape)
    x, y = rng.uniform(30, 480, 40), rng.uniform(30, 480, 40)
    flux = 10 ** rng.uniform(2.3, 4.5, 40)  # S/N ~ 3 to 400 (PSF noise-equivalent area ~ 50 px)
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(xi), int(yi)
        image[iy - 10 : iy + 11, ix - 10 : ix + 11] += fi * psf.draw(xi - ix, yi - iy, 21)
    image[:, :20] = 0.0
    exp = make_exposure(image, np.full(shape, sigma**2), psf=psf)
    exp.set_plane("NO_DATA", np.zeros(shape, bool) | (np.arange(shape[1]) < 20)[None, :])
    plain, packed = tmp_path / "plain.fits", tmp_path / "packed.fits"
    write_exposure(exp, plain)
    write_exposure(exp, packed, compression="quantized")
    assert packed.stat().st_size < plain.stat().st_size / 3
    back = read_exposure(packed)
    np.testing.assert_array_equal(back.mask, exp.mask)
    assert (back.image[:, :20] == 0).all()
    error = back.image - exp.image
    assert np.std(error) < sigma / 128 / np.sqrt(12) * 1.2
    assert abs(np.std(back.image[:, 20:]) / np.std(exp.image[:, 20:]) - 1) < 1e-4
    np.testing.assert_allclose(back.variance, exp.variance, rtol=1e-3)
    before, after = forced_psf_flux(exp, x, y), forced_psf_flux(back, x, y)
    shift = np.abs(after.psfFlux - before.psfFlux) / before.psfFluxErr
    assert np.sqrt(np.mean(shift**2)) < 0.005 and shift.max() < 0.01, shift.describe()


def test_quantized_image_with_non_finite_pixels_keeps_them(tmp_path):
    """A NaN cannot be an integer: such planes fall back to cfitsio's per-tile quantization, which keeps it."""
    rng = np.random.default_rng(6)
    image = rng.normal(0, 5.0, (64, 96)).astype(np.float32)
    image[10, 20] = np.nan
    exp = Exposure(image=image, mask=np.zeros(image.shape, np.int32), variance=np.full(image.shape, 25.0, np.float32))
    path = tmp_path / "nan.fits"
    write_exposure(exp, path, compression="quantized")
    with fits.open(path) as hdul:
        back = hdul["IMAGE"].data
    assert np.isnan(back[10, 20]) and np.isfinite(np.delete(back.ravel(), 10 * 96 + 20)).all()
    assert np.nanstd(back - image) < 5.0 / 128


def test_plane_is_the_bitwise_test_for_every_set_of_planes_and_mask_layout():
    """``plane`` reads only the bytes that hold the asked planes: it must equal (mask & bits) != 0 for planes in
    the low byte, the second byte, beyond, and for masks that are not contiguous little-endian int32."""
    rng = np.random.default_rng(4)
    m = rng.integers(-(2**31), 2**31, (37, 23), dtype=np.int64).astype(np.int32)
    exp = Exposure(np.zeros(m.shape, np.float32), m, np.ones(m.shape, np.float32))
    exp.mask_planes.bits.update({"HIGH": 20, "TOP": 30})
    names = list(exp.mask_planes.bits)
    for mask in (m, m.astype(">i4"), np.asfortranarray(m), m[:, ::2]):
        exp.mask = mask
        exp.image = np.zeros(mask.shape, np.float32)
        for _ in range(200):
            chosen = list(rng.choice(names, size=rng.integers(1, 4), replace=False))
            got = exp.plane(*chosen)
            bits = np.int64(exp.mask_planes.bitmask(*chosen))
            want = (mask.astype(np.int64) & bits) != 0
            assert got.dtype == bool and got.shape == mask.shape and np.array_equal(got, want), chosen


@pytest.mark.parametrize("bits", [0, 1 << 3, (1 << 3) | (1 << 12), 1 << 20, (1 << 5) | (1 << 17) | (1 << 30)])
def test_mask_bits_tested_byte_by_byte_are_the_integer_test(bits):
    """Planes above the standard sixteen (added ones: INJECTED_TEMPLATE, SAT_TEMPLATE) are tested on their own
    bytes; the answer is the full integer test's, also for a view that is not contiguous."""
    rng = np.random.default_rng(3)
    mask = rng.integers(-(2**31), 2**31 - 1, size=(37, 53), dtype=np.int64).astype(np.int32)
    expected = (mask.astype(np.int64) & bits) != 0
    assert np.array_equal(bits_set(mask, bits), expected)
    assert np.array_equal(bits_set(mask[:, ::2], bits), expected[:, ::2])
