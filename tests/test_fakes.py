"""Fake injection, matching and efficiency: fluxes come back, masks and variance are right, signs are right."""

import numpy as np
import pandas as pd
import pytest

from dialab.efficiency import efficiency_curve, fit_sigmoid
from dialab.exposure import Exposure
from dialab.injection import InjectConfig, inject_catalog, inject_fakes, make_fake_catalog
from dialab.matching import match_fakes, match_one_to_one
from dialab.measurement import detect_and_measure
from dialab.photometry import forced_psf_flux
from dialab.psf import GaussianPsf
from dialab.simulate.pair import PairSpec, simulate_pair
from dialab.subtraction import subtract
from dialab.warp import align_to


def _blank(shape=(1024, 1024), seed=0, gain=2.0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 5, shape)
    return Exposure(image, np.zeros(shape, np.int32), np.full(shape, 25.0), psf=GaussianPsf(sigma_pix=2.0),
                    gain=gain, magzero=27.0)


@pytest.mark.parametrize("aperture_correction", [None, 1.07])
def test_injected_flux_comes_back_with_unit_pulls(aperture_correction):
    """Also when the PSF carries an aperture correction: a fake drawn with the model is measured with it."""
    exp = _blank()
    exp.psf = exp.psf.with_aperture_correction(aperture_correction)
    rng = np.random.default_rng(1)
    grid = np.arange(24, 1000, 32)
    x = np.tile(grid, len(grid)) + rng.uniform(-0.5, 0.5, grid.size**2)
    y = np.repeat(grid, len(grid)) + rng.uniform(-0.5, 0.5, grid.size**2)
    flux = rng.uniform(2e3, 2e4, x.size)
    out = inject_fakes(exp, x, y, flux, seed=3)
    only = Exposure(out.image - exp.image, exp.mask, np.maximum(out.variance - exp.variance, 1e-6), psf=exp.psf)
    phot = forced_psf_flux(only, x, y)
    pulls = (phot.psfFlux - flux) / phot.psfFluxErr
    assert 0.9 <= np.std(pulls) <= 1.1
    assert abs(np.mean(pulls)) < 0.05  # 961 pulls: the mean's own scatter is 0.03
    # and on the full image (sky noise too) the flux is unbiased
    full = forced_psf_flux(out, x, y)
    assert np.median(full.psfFlux / flux) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("aperture_correction", [None, 1.07])
def test_expected_snr_is_the_psf_fits(aperture_correction):
    """A catalog's expected S/N is what a PSF fit of the fake will have, also with a corrected model (the fake is
    drawn fainter by the correction, and its corrected error is larger by it)."""
    exp = _blank(gain=float("nan"))
    exp.psf = exp.psf.with_aperture_correction(aperture_correction)
    fakes = make_fake_catalog(exp, InjectConfig(density_per_deg2=2e4, min_per_detector=50))
    errors = forced_psf_flux(exp, fakes.x.to_numpy(), fakes.y.to_numpy()).psfFluxErr.to_numpy()
    np.testing.assert_allclose(fakes.expected_snr, fakes.flux / errors, rtol=0.01)


def test_injected_mask_is_the_fakes_footprint_and_variance_grows_by_poisson_term():
    """INJECTED marks where the fake adds more than half the pixel noise (its whole stamp marked half of a
    small image with 20 fakes, and kept every star near one out of the kernel fit)."""
    exp = _blank(shape=(300, 300))
    out = inject_fakes(exp, np.array([100.3]), np.array([150.7]), np.array([5e4]))
    inj = out.plane("INJECTED")
    size = exp.psf.default_size
    model = 5e4 * exp.psf.draw(0.3, -0.3, size)
    assert inj.sum() == np.count_nonzero(model > 0.5 * np.sqrt(exp.variance[0, 0]))
    ys, xs = np.nonzero(inj)
    assert xs.min() >= 100 - size // 2 and ys.min() >= 151 - size // 2 and inj[151, 100]
    h = size // 2
    dv = (out.variance - exp.variance)[151 - h : 151 + h + 1, 100 - h : 100 + h + 1]
    np.testing.assert_allclose(dv, np.maximum(model, 0) / exp.gain, rtol=1e-4, atol=1e-6)
    outside = np.ones(exp.shape, bool)
    outside[151 - h : 151 + h + 1, 100 - h : 100 + h + 1] = False
    assert not (out.variance != exp.variance)[outside].any()


def test_catalog_is_deterministic_per_detector_and_independent_between_detectors():
    a = _blank()
    cfg = InjectConfig(min_per_detector=30)
    a.visit, a.detector = 11690, 49
    c1, c2 = make_fake_catalog(a, cfg), make_fake_catalog(a, cfg)
    pd.testing.assert_frame_equal(c1, c2)
    a.detector = 50
    c3 = make_fake_catalog(a, cfg)
    assert not np.allclose(c1.x.to_numpy()[:10], c3.x.to_numpy()[:10])
    assert c1.id.is_unique and set(c1.id).isdisjoint(c3.id)
    assert (c1.x >= 50).all() and (c1.x <= 1024 - 51).all() and len(c1) >= 30
    assert c1.mag.between(20, 26).all()


def test_fakes_on_hosts_sit_on_hosts_one_magnitude_fainter():
    exp = _blank()
    hosts = pd.DataFrame({"x": [200.0, 600.0, 800.0], "y": [300.0, 500.0, 900.0], "mag": [21.0, 21.5, 22.0]})
    cat = make_fake_catalog(exp, InjectConfig(min_per_detector=400, host_fraction=0.5), hosts=hosts)
    on = cat[cat.on_host]
    assert 0.4 < cat.on_host.mean() < 0.6
    assert set(zip(on.x, on.y)) <= set(zip(hosts.x, hosts.y))
    offset = on.mag.to_numpy() - hosts.set_index(["x", "y"]).loc[list(zip(on.x, on.y))].mag.to_numpy()
    assert np.mean(offset) == pytest.approx(1.0, abs=0.2) and np.std(offset) == pytest.approx(1.0, abs=0.2)


def test_matching_is_nearest_one_to_one_within_radius():
    fx, fy = np.array([10.0, 20.0, 50.0]), np.array([10.0, 10.0, 50.0])
    sx, sy = np.array([10.5, 11.0, 49.0]), np.array([10.0, 10.0, 50.0])
    idx, d = match_one_to_one(np.column_stack([fx, fy]), np.column_stack([sx, sy]), radius=2.0)
    assert list(idx) == [0, -1, 2]  # 20,10 has nothing within 2; the two sources near 10,10 match one fake
    assert d[0] == pytest.approx(0.5) and np.isnan(d[1])
    # optimal, not greedy: A-b is nearest but A-a, B-b is the better pairing
    idx, _ = match_one_to_one(np.array([[0.0, 0.0], [1.8, 0.0]]), np.array([[-0.9, 0.0], [0.9, 0.0]]), radius=1.0)
    assert list(idx) == [0, 1]


def test_wilson_interval_and_sigmoid_fit():
    curve = efficiency_curve(np.arange(10.0), np.arange(10) < 5, np.array([0.0, 10.0]))
    lo, hi = curve.err_lo[0], curve.err_hi[0]  # Wilson 68% interval of 5 of 10: centre 0.5, half-width below
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * np.sqrt(0.25 / 10 + 1 / 400) / (1 + 0.1), rel=1e-6)
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 15, 4000)
    found = rng.uniform(size=s.size) < 1 / (1 + np.exp(-(s - 5.0) / 0.7))
    fit = fit_sigmoid(s, found)
    assert fit.x50 == pytest.approx(5.0, abs=3 * fit.x50_err) and fit.x50_err < 0.1
    curve = efficiency_curve(s, found, np.arange(0, 16, 1.0))
    assert curve.n.sum() == s.size and (curve.efficiency.iloc[-1] > 0.95)


def test_fakes_end_to_end_on_a_simulated_pair():
    """Science fakes come out positive and template fakes negative; efficiency >= 95% at expected S/N >= 10
    and the 50% point near S/N 5."""
    science, template, _ = simulate_pair(PairSpec(shape=(1024, 1024), n_transients=0), seed=4)
    template = align_to(template, science)
    fakes = make_fake_catalog(science, InjectConfig(density_per_deg2=2.0e5, template_fraction=0.3), template)
    sci, tpl = inject_catalog(science, template, fakes)
    res = subtract(sci, tpl)
    cat, _, _ = detect_and_measure(res, sci, res.matched_image)
    matched = match_fakes(fakes, cat, res.difference)
    use = matched[~matched.near_edge]
    found = use.diaSourceId > 0
    neg = cat.set_index("diaSourceId").isNegative
    signs = neg.loc[use.diaSourceId[found]].to_numpy()
    vis = (use.target[found] == "visit").to_numpy()
    print(f"science fakes negative: {signs[vis].sum()}/{vis.sum()}, template fakes positive: "
          f"{(~signs[~vis]).sum()}/{(~vis).sum()}")
    # a fake can land on an unrelated residual; the signs hold for all but a stray one
    assert signs[vis].mean() <= 0.02 and vis.sum() > 100
    assert signs[~vis].mean() >= 0.98 and (~vis).sum() > 50
    bright = use.expected_snr >= 10
    fit = fit_sigmoid(use.expected_snr, found)
    print(f"{len(use)} fakes: efficiency {found[bright].mean():.3f} at S/N >= 10; 50% at S/N {fit.x50:.2f} "
          f"+- {fit.x50_err:.2f}")
    print(efficiency_curve(use.expected_snr, found, np.array([0, 2, 3, 4, 5, 6, 7, 8, 10, 15, 30, 1e4])))
    assert found[bright].mean() >= 0.95
    assert 4.5 <= fit.x50 <= 6.0


def test_fakes_recovered_on_a_real_decam_frame(real_data):
    """DECam DEC-OBS04a (plain FITS, no zeropoint) minus the mean of the DEC-OBS18 frames."""
    from dialab.exposure import read_exposure
    from dialab.psf import measure_psf

    from .test_subtraction_real import _decam_reference

    science = read_exposure(real_data / "decam" / "DEC-OBS04a.mini.fits")
    science.psf = measure_psf(science)
    template = align_to(_decam_reference(real_data), science)
    template.psf = measure_psf(template)
    template.magzero = science.magzero
    found_all, bright_all = [], []
    for seed in range(3):  # 20 fakes per 256 x 256 stamp: three draws for a useful count
        fakes = make_fake_catalog(science, InjectConfig(seed=seed, template_fraction=0.0), template)
        sci, tpl = inject_catalog(science, template, fakes, seed=seed)
        res = subtract(sci, tpl)
        cat, _, _ = detect_and_measure(res, sci, res.matched_image)
        m = match_fakes(fakes, cat, res.difference, edge_pix=20)
        m = m[~m.near_edge]
        found_all.append((m.diaSourceId > 0).to_numpy())
        bright_all.append((m.expected_snr >= 10).to_numpy())
    found, bright = np.concatenate(found_all), np.concatenate(bright_all)
    print(f"DECam: {found[bright].sum()}/{bright.sum()} fakes with expected S/N >= 10 recovered")
    assert bright.sum() >= 10
    assert found[bright].mean() >= 0.9


def test_template_fakes_get_the_template_counts_when_only_the_template_is_calibrated():
    """A template with MAGZERO and a science image without: 0.2.0 injected NaN. The template's counts per
    science count now come from the stars (true ratio 1 / 0.8 = 1.25 here)."""
    from dialab.injection import inject_catalog, make_fake_catalog, template_counts_per_science_count
    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair

    spec = TruthPairSpec(shape=(512, 512), n_stars=150, n_galaxies=50, n_transients=0, flux_ratio=0.8)
    science, template, _, _ = simulate_truth_pair(spec, seed=31)
    science.magzero = float("nan")
    assert template_counts_per_science_count(science, template) == pytest.approx(1.25, rel=0.01)
    fakes = make_fake_catalog(science, InjectConfig(template_fraction=0.5), template)
    sci, tpl = inject_catalog(science, template, fakes)
    assert np.isfinite(sci.image).all() and np.isfinite(tpl.image).all()
    assert (tpl.image - template.image).sum() > 0
