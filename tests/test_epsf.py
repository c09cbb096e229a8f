"""The effective PSF of undersampled stars on a finer grid, checked against GalSim's pixel-integrated PSFs."""

import galsim
import numpy as np
import pytest
from scipy import ndimage

from dialab.epsf import OVERSAMPLE, SplineGrid, bspline_weights, fit_effective_psf
from dialab.psf import ImagePsf, stamp_fwhm


def test_spline_weights_are_the_spline_ndimage_evaluates():
    """The design matrix and the star fits use these weights; the model is drawn with them too: all three must be
    one cubic B-spline (values, and derivatives against finite differences)."""
    rng = np.random.default_rng(1)
    coef = rng.normal(size=(30, 30))
    grid = SplineGrid(coef, 15)
    ox, oy = rng.uniform(-2.5, 2.5, (2, 200))
    value, gx, gy = grid.evaluate(ox, oy, gradient=True)
    coords = np.array([15 + OVERSAMPLE * oy, 15 + OVERSAMPLE * ox])
    assert value == pytest.approx(ndimage.map_coordinates(coef, coords, order=3, prefilter=False), abs=1e-12)
    h = 1e-5
    assert gx == pytest.approx((grid.evaluate(ox + h, oy) - grid.evaluate(ox - h, oy)) / (2 * h), abs=1e-5)
    assert gy == pytest.approx((grid.evaluate(ox, oy + h) - grid.evaluate(ox, oy - h)) / (2 * h), abs=1e-5)
    first, w = bspline_weights(np.array([3.0, 7.25]))
    assert first.tolist() == [2, 6] and w.sum(axis=1) == pytest.approx([1.0, 1.0])
    # values at the nodes (what a stamp is read from) are the spline's, not its coefficients
    assert grid.node_values()[5:25, 5:25] == pytest.approx(
        ndimage.map_coordinates(coef, np.mgrid[5:25, 5:25].astype(float), order=3, prefilter=False))


def _stars(profile, n, rng, size=17):
    """Noisy stars at random sub-pixel positions, normalised like the pipeline's (core sum 1), with their noise, true
    offsets and S/N."""
    h = size // 2
    core = np.hypot(*np.mgrid[-h : h + 1, -h : h + 1]) <= 4
    stamps, noise, dx, dy, snr = [], [], [], [], []
    for _ in range(n):
        ox, oy = rng.uniform(-0.5, 0.5, 2)
        flux = 10 ** rng.uniform(3.7, 5.5)
        img = flux * profile.drawImage(nx=size, ny=size, scale=1.0, offset=(ox, oy)).array
        var = 100.0 + np.maximum(img, 0)
        img = img + rng.normal(size=img.shape) * np.sqrt(var)
        stamps.append(img / img[core].sum())
        noise.append(np.sqrt(var) / img[core].sum())
        dx.append(ox)
        dy.append(oy)
        snr.append(flux / np.sqrt(var.sum()))
    return np.array(stamps), np.array(noise), np.array(dx), np.array(dy), np.array(snr)


@pytest.mark.parametrize("fwhm", [1.3, 2.2])
def test_effective_psf_of_undersampled_stars_is_the_pixel_integrated_psf(fwhm):
    """60 Kolmogorov x Airy stars of FWHM 1.7 and 2.4 px (pixel included), centres given 0.05 px off: the model's
    stamp has the true stamp's FWHM within 2% and NEA within 1.5%, the stars' centres come back within 0.02 px. The
    stars shifted to a common centre by cubic spline and averaged (0.2.0's way) are broader by more than that."""
    rng = np.random.default_rng(7)
    profile = galsim.Convolve(galsim.Kolmogorov(fwhm=fwhm), galsim.Airy(lam_over_diam=0.5, obscuration=0.3))
    stamps, noise, dx, dy, snr = _stars(profile, 60, rng)
    weights = np.minimum(snr, np.percentile(snr, 75)) ** 2
    fit = fit_effective_psf(stamps, noise, dx + rng.normal(0, 0.05, 60), dy + rng.normal(0, 0.05, 60), weights, fwhm)
    truth = ImagePsf(profile.drawImage(nx=17, ny=17, scale=1.0).array)
    model = ImagePsf(fit.grid.native_stamp(17))
    assert model.fwhm == pytest.approx(truth.fwhm, rel=0.02)
    assert model.nea == pytest.approx(truth.nea, rel=0.015)
    offset = np.median(fit.dx - dx), np.median(fit.dy - dy)  # the model's centre is its centroid, not the truth's
    assert np.std(fit.dx - dx) < 0.02 and np.std(fit.dy - dy) < 0.02 and np.hypot(*offset) < 0.02
    shifted = [ndimage.shift(s, (-y, -x), order=3, mode="nearest") for s, x, y in zip(stamps, dx, dy)]
    stacked = ImagePsf(np.average(shifted, axis=0, weights=weights))
    assert stacked.fwhm / truth.fwhm - 1 > 2 * abs(model.fwhm / truth.fwhm - 1)
    # the model at each star, which the stars are judged by, is the grid drawn at its fitted centre and flux
    yy, xx = np.mgrid[-8:9, -8:9]
    drawn = fit.grid.evaluate(xx[None] - fit.dx[:, None, None], yy[None] - fit.dy[:, None, None])
    assert fit.model == pytest.approx(fit.flux[:, None, None] * drawn, abs=1e-12)


def test_effective_psf_ignores_a_cosmic_ray():
    """A cosmic ray in one star's core (a single pixel at 50x the star's peak) is clipped: the model's peak is
    within 1% of the fit without it."""
    rng = np.random.default_rng(3)
    profile = galsim.Convolve(galsim.Kolmogorov(fwhm=1.8), galsim.Airy(lam_over_diam=0.5, obscuration=0.3))
    stamps, noise, dx, dy, snr = _stars(profile, 50, rng)
    clean = fit_effective_psf(stamps, noise, dx, dy, np.ones(50), 2.0).grid.native_stamp(17)
    hit = stamps.copy()
    hit[0, 9, 8] += 50 * stamps[0].max()
    model = fit_effective_psf(hit, noise, dx, dy, np.ones(50), 2.0).grid.native_stamp(17)
    assert model[8, 8] == pytest.approx(clean[8, 8], rel=0.01)
    assert stamp_fwhm(model) == pytest.approx(stamp_fwhm(clean), rel=0.01)
