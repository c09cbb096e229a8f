"""The ZOGY flavor against known truth: white noise where the variance says, transients found and measured,
no false detections where A&L's sharper-science regime makes them, and a non-square pair equal to its crops."""

import numpy as np
import pytest

from dialab.measurement import detect_and_measure
from dialab.photometry import APCORR_RADIUS_FWHM
from dialab.psf import ImagePsf
from dialab.simulate.truthpair import light_within
from dialab.subtraction import SubtractConfig, subtract
from dialab.subtraction.zogy import _tile_weights

from .simulated_pairs import CUT_FLAGS, gaussian_exposure, match_truth, source_free, star_positions


def _truth_pair(shape, science_fwhm, template_fwhm, seed=5, n_transients=60):
    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair

    area = shape[0] * shape[1] / 1024**2
    spec = TruthPairSpec(shape=shape, science_fwhm=science_fwhm, template_fwhm=template_fwhm,
                         n_transients=n_transients, n_stars=int(120 * area), n_galaxies=int(400 * area))
    return (spec, *simulate_truth_pair(spec, seed=seed))


def _crop(exp, x0: int, width: int):
    """Columns x0 .. x0 + width of an exposure, its grid PSF's nodes moved with it."""
    from dialab.exposure import Exposure
    from dialab.psf import GridPsf

    cols = slice(x0, x0 + width)
    psf = GridPsf(exp.psf.stamps, exp.psf.xs - x0, exp.psf.ys)
    return Exposure(image=exp.image[:, cols].copy(), mask=exp.mask[:, cols].copy(),
                    variance=exp.variance[:, cols].copy(), psf=psf, visit=exp.visit, detector=exp.detector,
                    band=exp.band, mjd=exp.mjd, magzero=exp.magzero, gain=exp.gain)


def test_tile_weights_sum_to_one():
    for length, edges in ((100, np.array([0, 100])), (1000, np.array([0, 250, 500, 750, 1000]))):
        weights = _tile_weights(length, edges, 64)
        np.testing.assert_allclose(np.sum(weights, axis=0), 1.0)
        assert all(w[(a + b) // 2] == 1.0 for w, a, b in zip(weights, edges[:-1], edges[1:]))


def test_gaussian_pair_gives_white_noise_and_the_flux_ratio():
    """Constant Gaussian PSFs, white noise: D / sqrt(var D) and S_corr have unit scatter away from stars, the
    fitted flux ratio is the true one, and P_D has unit sum."""
    rng = np.random.default_rng(3)
    shape = (512, 768)  # not square
    stars = star_positions(shape, 300, rng, (1000.0, 4000.0))
    sci = gaussian_exposure(shape, (stars[0], stars[1], 0.8 * stars[2]), 2.0, 1.0, rng)
    tpl = gaussian_exposure(shape, stars, 2.6, 0.5, rng)
    res = subtract(sci, tpl, SubtractConfig(flavor="zogy", workers=1))
    assert res.kernel is None and res.diagnostics.convolved == "both"
    assert res.diagnostics.kernel_sum == pytest.approx(0.8, rel=0.01)
    free = source_free(sci, stars, 15) & ~res.difference.plane("EDGE")
    z = res.difference.image[free] / np.sqrt(res.difference.variance[free])
    s = res.score.image[free] / np.sqrt(res.score.variance[free])
    assert np.std(z) == pytest.approx(1.0, abs=0.05) and np.std(s) == pytest.approx(1.0, abs=0.05)
    assert res.difference.psf.stamp().sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("science_fwhm, template_fwhm", [(4.0, 3.4), (3.0, 4.0)])
def test_transients_found_and_measured_without_false_detections(science_fwhm, template_fwhm):
    """Both PSF regimes on a 1024 x 1024 truth pair (varying PSFs, compact galaxies outnumbering stars): every
    bright transient found, at most one false detection per Mpix after the flag cut (convolveTemplate makes
    dozens in the sharper-science regime), fluxes of S/N > 10 transients within 1.5% of their light within the
    aperture PSF fluxes are calibrated to, and flux errors that describe the scatter."""
    spec, sci, tpl, transients, _ = _truth_pair((1024, 1024), science_fwhm, template_fwhm)
    res = subtract(sci, tpl, SubtractConfig(flavor="zogy"))
    cat, _, _ = detect_and_measure(res, sci, res.matched_image)
    good = cat[~cat[CUT_FLAGS].any(axis=1)]
    hit, j = match_truth(good, transients)
    assert (~hit).sum() <= 1, good[~hit]
    bright = transients.flux.to_numpy() > 5000
    found = np.zeros(len(transients), bool)
    found[j[hit]] = True
    assert found[bright].mean() >= 0.95
    measured = good[hit]
    # PSF fluxes are calibrated to the light within 3 FWHM (photometry.aperture_correction)
    true = transients.flux.to_numpy()[j[hit]] * light_within(spec, measured.x, measured.y,
                                                             APCORR_RADIUS_FWHM * res.science_psf.fwhm)
    strong = measured.snr.to_numpy() > 10
    assert np.median(measured.psfFlux.to_numpy()[strong] / true[strong]) == pytest.approx(1.0, abs=0.015)
    pull = (measured.psfFlux.to_numpy() - true) / measured.psfFluxErr.to_numpy()
    assert 0.7 < 1.4826 * np.median(np.abs(pull - np.median(pull))) < 1.5


def test_a_non_square_pair_gives_the_diasources_of_its_square_crops():
    """2048 x 1024 (varying PSF, several tiles) against its two 1024 x 1024 halves: where a half's interior
    lies, the same diaSources at the same places with fluxes well within their errors."""
    _, sci, tpl, transients, _ = _truth_pair((1024, 2048), 3.0, 4.0, seed=9, n_transients=120)
    full = subtract(sci, tpl, SubtractConfig(flavor="zogy"))
    whole, _, _ = detect_and_measure(full, sci, full.matched_image)
    whole = whole[~whole[CUT_FLAGS].any(axis=1) & (whole.snr.abs() > 7)]
    for x0 in (0, 1024):
        s, t = _crop(sci, x0, 1024), _crop(tpl, x0, 1024)
        part = subtract(s, t, SubtractConfig(flavor="zogy"))
        cat, _, _ = detect_and_measure(part, s, part.matched_image)
        cat = cat[~cat[CUT_FLAGS].any(axis=1) & (cat.snr.abs() > 7)]
        inner = whole[(whole.x > x0 + 80) & (whole.x < x0 + 1024 - 80)]
        d = np.hypot(inner.x.to_numpy()[:, None] - x0 - cat.x.to_numpy()[None],
                     inner.y.to_numpy()[:, None] - cat.y.to_numpy()[None])
        assert len(inner) >= 20 and (d.min(axis=1) < 0.5).mean() >= 0.95
        k = d.argmin(axis=1)
        close = d.min(axis=1) < 0.5
        diff = (inner.psfFlux.to_numpy()[close] - cat.psfFlux.to_numpy()[k[close]]) / inner.psfFluxErr.to_numpy()[close]
        assert np.abs(np.median(diff)) < 0.1 and np.abs(diff).max() < 1.0


def test_defects_are_grown_only_as_far_as_they_reach_into_d():
    """A bad column in both images (filled before the FFTs): a transient 14 px beside it is still detected and
    measured; the column is flagged no farther than D's filters carry it (at most two FWHM)."""
    rng = np.random.default_rng(4)
    shape = (384, 384)
    stars = star_positions(shape, 200, rng, (1000.0, 4000.0))
    sci = gaussian_exposure(shape, (np.r_[stars[0], 214.0], np.r_[stars[1], 190.0], np.r_[stars[2], 3000.0]), 2.0,
                            1.0, rng)
    tpl = gaussian_exposure(shape, stars, 2.6, 0.5, rng)
    for exp in (sci, tpl):
        exp.psf = ImagePsf(exp.psf.stamp(61))  # a generous stamp, as a PSF model file often has
        exp.image[:, 200] = 1e5
        exp.set_plane("BAD", np.zeros(shape, bool) | (np.arange(shape[1]) == 200)[None, :])
    res = subtract(sci, tpl, SubtractConfig(flavor="zogy", workers=1))
    bad = res.difference.plane("BAD")
    assert bad[:, 200].all() and not bad[:, 214].any() and bad.any(axis=0).sum() <= 2 * 13 + 1
    cat, _, _ = detect_and_measure(res, sci, res.matched_image)
    hit = np.hypot(cat.x - 214, cat.y - 190) < 1.5
    assert hit.sum() == 1 and cat.psfFlux[hit].iloc[0] == pytest.approx(3000, rel=0.1)


def test_the_flux_scale_from_a_kernel_is_fitted_the_way_that_convolves():
    """Science FWHM 3 px against a 4-px template, the stars' ratio not used (``scale_from_stars: false``): ZOGY's
    flux scale comes from an Alard-Lupton kernel, fitted science -> template and inverted. Fitted template ->
    science it deconvolves, and its sum was 3.8% high here."""
    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair

    spec = TruthPairSpec(shape=(600, 600), science_fwhm=3.0, template_fwhm=4.0, n_stars=50, n_galaxies=150,
                         n_transients=10)
    science, template, _, _ = simulate_truth_pair(spec, seed=1)
    cfg = SubtractConfig(scale_from_stars=False)
    deconvolving = subtract(science, template, cfg).diagnostics.kernel_sum  # convolveTemplate's free fit
    assert abs(deconvolving / spec.flux_ratio - 1) > 0.025  # the case this is about
    d = subtract(science, template, cfg.model_copy(update={"flavor": "zogy"})).diagnostics
    assert d.free_kernel_sum == d.kernel_sum  # the kernel decided, not the stars
    assert d.kernel_sum == pytest.approx(spec.flux_ratio, rel=0.015)
