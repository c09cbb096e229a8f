"""PSF models and measurement, checked against analytic truths and GalSim-rendered fields."""

import math

import galsim
import numpy as np
import pytest

from dialab.errors import BadInputError
from dialab.exposure import read_exposure, read_psf
from dialab.psf import FWHM_PER_SIGMA, GaussianPsf, GridPsf, ImagePsf, MoffatPsf, measure_psf, stamp_fwhm
from dialab.simulate.render import add_noise, draw_point_sources, random_star_field

from .conftest import make_exposure


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.3])
def test_gaussian_nea_is_four_pi_sigma_squared(sigma):
    psf = GaussianPsf(sigma_pix=sigma)
    assert psf.nea == pytest.approx(4 * math.pi * sigma**2, rel=0.01)
    assert psf.stamp().sum() == pytest.approx(1.0)
    assert psf.stamp().shape[0] % 2 == 1


@pytest.mark.parametrize("fwhm,beta", [(3.0, 2.5), (4.0, 3.0), (6.5, 4.765)])
def test_moffat_fwhm_matches_its_formula(fwhm, beta):
    """FWHM = 2 alpha sqrt(2^(1/beta) - 1): the drawn stamp's half-maximum width agrees."""
    psf = MoffatPsf(fwhm_pix=fwhm, beta=beta)
    assert 2 * psf.alpha * math.sqrt(2 ** (1 / beta) - 1) == pytest.approx(fwhm)
    assert stamp_fwhm(psf.stamp()) == pytest.approx(fwhm, rel=0.02)
    # GalSim's Moffat with the same parameters has the same half-light shape
    assert galsim.Moffat(beta=beta, fwhm=fwhm).scale_radius == pytest.approx(psf.alpha, rel=1e-6)


def test_gaussian_sigma_from_adaptive_moments_and_fwhm_consistent():
    psf = ImagePsf(GaussianPsf(sigma_pix=2.4).stamp())
    assert psf.sigma == pytest.approx(2.4, rel=1e-3)
    assert psf.fwhm == pytest.approx(FWHM_PER_SIGMA * 2.4, rel=0.01)


def test_adaptive_moments_of_an_elliptical_gaussian_are_its_covariance_bad_pixels_ignored():
    from dialab.moments import adaptive_moments

    cov = np.array([[5.0, -0.4], [-0.4, 3.4]])
    yy, xx = np.mgrid[0:41, 0:41] - np.array([19.8, 20.3])[:, None, None]
    inv = np.linalg.inv(cov)
    stamp = np.exp(-0.5 * (inv[0, 0] * xx**2 + 2 * inv[0, 1] * xx * yy + inv[1, 1] * yy**2))
    m = adaptive_moments(stamp, 20, 20, 2.0)
    assert m.converged and (m.x, m.y) == (pytest.approx(20.3, abs=1e-4), pytest.approx(19.8, abs=1e-4))
    np.testing.assert_allclose([m.ixx, m.iyy, m.ixy], [5.0, 3.4, -0.4], atol=1e-4)
    # a cosmic ray 2 px from the centre: masked, it has no effect at all (the pixel is left out)
    bad = np.zeros(stamp.shape, bool)
    bad[22, 17] = True
    hit = stamp.copy()
    hit[22, 17] += 50.0
    masked = adaptive_moments(hit, 20, 20, 2.0, bad=bad)
    assert masked == adaptive_moments(stamp, 20, 20, 2.0, bad=bad)
    np.testing.assert_allclose([masked.ixx, masked.iyy], [5.0, 3.4], rtol=0.05)
    unmasked = adaptive_moments(hit, 20, 20, 2.0)
    assert not (unmasked.converged and abs(unmasked.ixx - 5.0) < 0.25)
    assert not adaptive_moments(np.zeros((21, 21)), 10, 10).converged


def test_shifted_draw_keeps_flux_and_moves_centroid():
    psf = MoffatPsf(fwhm_pix=4.0, beta=3.0, g1=0.05)
    p = psf.draw(0.3, -0.4, 41)
    yy, xx = np.mgrid[-20:21, -20:21]
    assert p.sum() == pytest.approx(1.0, abs=0.01)
    assert (p * xx).sum() / p.sum() == pytest.approx(0.3, abs=0.02)
    assert (p * yy).sum() / p.sum() == pytest.approx(-0.4, abs=0.02)


def test_grid_psf_interpolates_bilinearly_between_nodes():
    stamps = np.array([GaussianPsf(sigma_pix=s).stamp(21) for s in (1.5, 2.5, 1.5, 2.5)])
    grid = GridPsf(stamps, np.array([0.0, 100.0, 0.0, 100.0]), np.array([0.0, 0.0, 100.0, 100.0]))
    mid = grid.stamp(x=50, y=30)
    expected = 0.5 * (stamps[0] + stamps[1])
    np.testing.assert_allclose(mid, expected / expected.sum(), atol=1e-12)
    np.testing.assert_allclose(grid.stamp(x=-10, y=0), stamps[0], atol=1e-12)


def _grid_psf():
    rng = np.random.default_rng(4)
    sigmas = 1.5 + rng.random(9)
    stamps = np.array([MoffatPsf(fwhm_pix=2.355 * s, beta=3.0, g1=0.1 * rng.random()).stamp(25) for s in sigmas])
    xs, ys = np.meshgrid([0.0, 150.0, 300.0], [0.0, 80.0, 200.0])
    return GridPsf(stamps, xs.ravel(), ys.ravel())


@pytest.mark.parametrize("psf", [GaussianPsf(sigma_pix=1.8), MoffatPsf(fwhm_pix=3.0, beta=2.5, g2=0.1),
                                 ImagePsf(GaussianPsf(sigma_pix=2.2, g1=0.1).stamp(19)), _grid_psf()],
                         ids=["gaussian", "moffat", "image", "grid"])
def test_batched_draws_are_the_one_at_a_time_draws(psf):
    """Forced photometry draws every object's PSF at once: the same numbers as draw(), whatever the shift
    (zero, on one axis, half a pixel, beyond a pixel) and wherever the object (off the grid too)."""
    rng = np.random.default_rng(2)
    dx = np.r_[0.0, 0.0, 0.37, -0.5, 0.5, 1e-9, 1.3, rng.uniform(-0.5, 0.5, 20)]
    dy = np.r_[0.0, -0.21, 0.0, 0.5, -0.5, -1e-9, -2.2, rng.uniform(-0.5, 0.5, 20)]
    x, y = rng.uniform(-50, 350, len(dx)), rng.uniform(-50, 250, len(dx))
    batched = psf.draw_many(dx, dy, x, y)
    for k in range(len(dx)):
        np.testing.assert_allclose(batched[k], psf.draw(dx[k], dy[k], None, x=x[k], y=y[k]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [np.ones((4, 4)), np.zeros((5, 5)), np.ones((5, 3))])
def test_bad_psf_stamps_are_refused(bad):
    with pytest.raises(BadInputError):
        ImagePsf(bad)


def _star_field(shape, profile_at, seed, n=250):
    rng = np.random.default_rng(seed)
    x, y, flux = random_star_field(shape, n, rng, flux_range=(5e3, 3e5), min_separation_pix=15)
    model = draw_point_sources(shape, x, y, flux, profile_at)
    field = add_noise(model, sky=200.0, gain=2.0, read_noise_e=5.0, rng=rng)
    return make_exposure(field.image - 200.0, field.variance)


def test_measure_psf_recovers_moffat_fwhm_from_galsim_star_field():
    """Stars drawn with a Moffat of FWHM 4.0 px (pixel-integrated by GalSim): measured within 3%."""
    moffat = galsim.Moffat(beta=3.0, fwhm=4.0)
    exp = _star_field((400, 400), lambda x, y: moffat, seed=1)
    psf = measure_psf(exp)
    effective = galsim.Convolve(moffat, galsim.Pixel(1.0)).calculateFWHM()
    assert psf.fwhm == pytest.approx(4.0, rel=0.03)
    assert psf.fwhm == pytest.approx(effective, rel=0.03)
    assert psf.stamp().sum() == pytest.approx(1.0)


def test_measured_psf_follows_a_psf_that_widens_across_the_image():
    """FWHM grows linearly from 3.0 px (left) to 5.0 px (right); each grid column follows it."""
    nx = 600
    def fwhm_at(x):
        return 3.0 + 2.0 * x / (nx - 1)
    exp = _star_field((300, nx), lambda x, y: galsim.Moffat(beta=3.5, fwhm=fwhm_at(x)), seed=2, n=400)
    psf = measure_psf(exp)  # enough stars: a spatially varying model, found without being asked
    assert isinstance(psf, GridPsf)
    for xc in psf.grid_x:
        measured = psf.at(xc, 150).fwhm
        # the stars are pixel-integrated: compare with the effective profile's FWHM
        truth = galsim.Convolve(galsim.Moffat(beta=3.5, fwhm=fwhm_at(xc)), galsim.Pixel(1.0)).calculateFWHM()
        assert measured == pytest.approx(truth, rel=0.06), (xc, measured, truth)
    assert psf.at(psf.grid_x[-1], 150).fwhm > psf.at(psf.grid_x[0], 150).fwhm + 1.0


def test_measured_psf_in_a_galaxy_rich_field_follows_the_true_varying_psf():
    """Kolmogorov x Airy PSF widening +-6% across the CCD; compact galaxies outnumber stars 3:1.

    0.2.0 measured FWHM +6 to +24% (galaxies on the locus, no variation); the stars' model must follow
    the true effective PSF within 5% in FWHM at the centre and both edges."""
    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair

    science, _, _, _ = simulate_truth_pair(TruthPairSpec(shape=(768, 768), science_fwhm=4.0), seed=3)
    truth = science.psf
    science.psf = None
    measured = measure_psf(science)
    for x in (60, 384, 708):
        assert measured.at(x, 384).fwhm == pytest.approx(truth.at(x, 384).fwhm, rel=0.05), x
    assert measured.at(708, 384).fwhm > measured.at(60, 384).fwhm


def test_psf_from_stars_on_real_frames_without_a_psf(real_data):
    """NIRCam F200W (undersampled, a cluster field full of galaxies) and SFFT's DECam stacks, PSFs from the stars.

    NIRCam: within 5% of direct Gaussian fits to the stars (0.2.0: +198% of the WebbPSF model). The given
    WebbPSF models are ~20% sharper than this drizzled image's stars (Gaussian fits 2.46 px vs 2.04 px), so the
    stars, not the models, are the truth here. DECam stacks: within 10% of their header FWHM (0.2.0: +45%)."""
    from astropy.io import fits

    from dialab.psf import check_given_psf
    from tests.test_real_images import _gaussian_fit_fwhm

    nircam = real_data / "nircam"
    for stem in ("jw02561001002-02561-o001_t003", "jw01324001001-01324-o001_t001"):
        path = nircam / f"{stem}_nircam_clear-f200w_i2d_stamp"
        exp = read_exposure(f"{path}.fits", noise=f"{path}.noise.fits")
        measured, direct = measure_psf(exp), _gaussian_fit_fwhm(exp, radius=6)
        given = read_psf(f"{path}.WebbPSF.fits")
        print(stem, measured.fwhm, direct, given.fwhm)
        assert measured.fwhm == pytest.approx(direct, rel=0.05)
        assert measured.fwhm > 1.1 * given.fwhm  # the model is sharper than the stars
        # the model blurred to fit them (each star is, with half the chi^2 of the model as given)
        assert check_given_psf(exp, given).fwhm == pytest.approx(measured.fwhm, rel=0.03)
    for epoch in ("04", "18"):
        path = real_data / "peer-results" / "sfft" / f"decam_Stack-DEC-OBS{epoch}.fits"
        assert measure_psf(read_exposure(path)).fwhm == pytest.approx(fits.getheader(path)["FWHM"], rel=0.10)


@pytest.mark.parametrize("blur", [0.0, 0.65])
def test_a_given_psf_sharper_than_its_stars_is_blurred_to_fit_them(blur, caplog):
    """A model of the optics alone (Airy, FWHM 2.1 px) given for stars blurred by a Gaussian of 0.65 px (what
    drizzling, jitter and charge diffusion do to a WebbPSF model's stars), 25 stars: the checked model has the
    stars' FWHM within 3% and NEA within 5% (as given: -15%, -32%), with a warning. A right model is kept as it is."""
    from dialab.psf import check_given_psf

    rng = np.random.default_rng(7)
    optics = galsim.Airy(lam_over_diam=2.1 / 1.03)
    stars = galsim.Convolve(optics, galsim.Gaussian(sigma=blur)) if blur else optics
    x, y, flux = random_star_field((512, 512), 25, rng, flux_range=(5e3, 3e5), min_separation_pix=15)
    field = add_noise(draw_point_sources((512, 512), x, y, flux, lambda a, b: stars), 100.0, 2.0, 5.0, rng)
    given = optics.drawImage(nx=101, ny=101, scale=1.0).array
    truth = stars.drawImage(nx=101, ny=101, scale=1.0).array
    exposure = make_exposure(field.image - 100.0, field.variance)
    with caplog.at_level("WARNING"):
        checked = check_given_psf(exposure, ImagePsf(given))
    if not blur:
        assert np.array_equal(checked.stamp(101), ImagePsf(given).stamp()) and not caplog.text
        return
    assert "convolved with a Gaussian" in caplog.text
    assert checked.fwhm == pytest.approx(stamp_fwhm(truth), rel=0.03)
    assert checked.nea == pytest.approx(1 / np.sum((truth / truth.sum()) ** 2), rel=0.05)


def test_grid_psf_sizes_are_computed_once():
    """Measurement asks a GridPsf for its sigma per source: 0.2.0 recomputed it (8 ms) every time."""
    stamps = np.array([GaussianPsf(sigma_pix=s).stamp(21) for s in (1.5, 2.5, 1.5, 2.5)])
    grid = GridPsf(stamps, np.array([0.0, 100.0, 0.0, 100.0]), np.array([0.0, 0.0, 100.0, 100.0]))
    first = (grid.sigma, grid.fwhm, grid.nea)
    grid.stamps[:] = GaussianPsf(sigma_pix=4.0).stamp(21)  # a recomputation would now see another PSF
    assert (grid.sigma, grid.fwhm, grid.nea) == first


@pytest.mark.parametrize("fwhm", [1.6, 2.0, 2.6])
def test_undersampled_psf_from_stars(fwhm):
    """Airy stars of FWHM 1.6-2.6 px (NIRCam-like sampling): the model (an effective PSF on a 4x finer grid) has the
    truth's FWHM within 3% and NEA within 5%. Stacked from stars recentred by interpolation it was +7% at 1.6 px."""
    rng = np.random.default_rng(3)
    profile = galsim.Airy(lam_over_diam=fwhm / 1.03)
    x, y, flux = random_star_field((512, 512), 150, rng, flux_range=(5e3, 3e5), min_separation_pix=15)
    field = add_noise(draw_point_sources((512, 512), x, y, flux, lambda a, b: profile), 100.0, 2.0, 5.0, rng)
    truth = profile.drawImage(nx=201, ny=201, scale=1.0).array
    measured = measure_psf(make_exposure(field.image - 100.0, field.variance))
    assert measured.fwhm == pytest.approx(stamp_fwhm(truth[70:131, 70:131]), rel=0.03)
    assert measured.nea == pytest.approx(1 / np.sum((truth / truth.sum()) ** 2), rel=0.05)


def test_undersampled_psf_among_compact_galaxies():
    """Kolmogorov x Airy stars of FWHM 2.1 px (pixel included), varying by +-6% across the CCD, among compact
    galaxies that outnumber them 2:1 at the PSF stars' S/N: the model at three columns has the truth's FWHM within
    3% and NEA within 5%. Before the finer grid and the locus of phase-corrected sizes: +9-10% and +9-11%. Its far
    wings (beyond 5.5 FWHM) are their azimuthal mean: the stack's own pixels there were noise (rms 7.4x the
    profile's level here, 2.4x now), which preconvolution's filter spread around every bright star (false detections
    6.8 -> 61 per 4 Mpix on a 768^2 pair)."""
    from dialab.simulate.truthpair import TruthPairSpec, psf_profile, simulate_truth_pair

    spec = TruthPairSpec(shape=(1024, 1024), science_fwhm=1.8, template_fwhm=2.0, airy_lam_over_diam=0.5)
    science = simulate_truth_pair(spec, seed=2)[0]
    science.psf = None
    measured = measure_psf(science)
    for x in (205, 512, 818):
        true = psf_profile(spec, spec.science_fwhm, x).drawImage(nx=201, ny=201, scale=1.0).array
        model = ImagePsf(measured.stamp(x=x, y=512))
        assert model.fwhm == pytest.approx(stamp_fwhm(true[70:131, 70:131]), rel=0.03)
        assert model.nea == pytest.approx(1 / np.sum((true / true.sum()) ** 2), rel=0.05)
    stamp = measured.stamp(x=512, y=512)
    h = stamp.shape[0] // 2
    true = psf_profile(spec, spec.science_fwhm, 512).drawImage(nx=201, ny=201, scale=1.0).array
    true = true[100 - h : 101 + h, 100 - h : 101 + h] / true.sum()
    far = np.hypot(*np.mgrid[-h : h + 1, -h : h + 1]) > 5.5 * measured.fwhm
    assert np.sqrt(np.mean((stamp - true)[far] ** 2)) < 4 * true[far].mean()
    # 400 cosmic rays left in (1-5 px hits): HSM fails on them as on stars centred on a pixel, but they are not
    # measured further (their peak leaves a neighbour empty); measured, they were the model (FWHM -41%)
    rng = np.random.default_rng(5)
    science.image = science.image.copy()  # new pixels: the stars found on the old ones are not reused
    for _ in range(400):
        x, y = rng.integers(5, 1019, 2)
        angle = rng.uniform(0, np.pi)
        for k in range(rng.integers(1, 6)):
            science.image[int(y + k * np.sin(angle)), int(x + k * np.cos(angle))] += rng.uniform(500, 20000)
    assert ImagePsf(measure_psf(science).stamp(x=512, y=512)).fwhm == pytest.approx(measured.fwhm, rel=0.03)


def test_shifted_centres_are_the_centres_of_the_shifted_stamps():
    """A score flux needs only the moved PSF's central pixel: the same number as the whole moved stamp's."""
    from dialab.psf import shift_stamps, shifted_centres

    rng = np.random.default_rng(1)
    stamps = np.array([GaussianPsf(sigma_pix=s).stamp(43) for s in rng.uniform(1.5, 3.0, 40)])
    dx, dy = rng.uniform(-0.5, 0.5, 40), rng.uniform(-0.5, 0.5, 40)
    dx[:3] = dy[:3] = 0.0
    dx[3] = 1.7  # beyond one pixel: ndimage's own operator
    assert shifted_centres(stamps, dx, dy) == pytest.approx(shift_stamps(stamps, dx, dy)[:, 21, 21], rel=1e-12)


def test_measured_psf_keeps_its_wings_in_galaxy_rich_fields():
    """Kolmogorov x Airy stars among compact galaxies (3:1), sky exactly known, FWHM 3 and 4 px, three fields each:
    the measured model's NEA against the true PSF's (normalised to all its light, drawn on 201 x 201 px) at the
    centre and both edges: median error within 5%, none beyond 10% (here 2% and 9%). A per-star sky from the
    stamp's border took the stars' own wings and their neighbours' light out of the stack: 11% and 20%."""
    from dialab.simulate.truthpair import TruthPairSpec, psf_profile, simulate_truth_pair

    errors = []
    for fwhm in (3.0, 4.0):
        spec = TruthPairSpec(shape=(768, 768), science_fwhm=fwhm)
        for seed in (3, 4, 5):
            science, _, _, _ = simulate_truth_pair(spec, seed=seed)
            science.psf = None
            measured = measure_psf(science)
            for x in (150, 384, 618):
                true = psf_profile(spec, fwhm, x).drawImage(nx=201, ny=201, scale=1.0).array
                errors.append(measured.at(x, 384).nea * np.sum((true / true.sum()) ** 2) - 1)
    assert np.median(np.abs(errors)) < 0.05, errors
    assert np.max(np.abs(errors)) < 0.10, errors


def test_measured_psf_of_stars_on_bright_galaxy_halos():
    """Moffat stars (beta 3, FWHM 4 px) on a sky with two bright de Vaucouleurs halos (half-light radii 50 and 80
    px) and a gradient: the model's NEA within 3% of the truth's. On the image's 64-px sky the halos' structure
    stayed under the stars, and with no sky of their own their stamps took it: +5.7%."""
    rng = np.random.default_rng(1)
    shape = (800, 800)
    moffat = galsim.Moffat(beta=3.0, fwhm=4.0)
    x, y, flux = random_star_field(shape, 220, rng, flux_range=(5e3, 3e5), min_separation_pix=15)
    model = draw_point_sources(shape, x, y, flux, lambda a, b: moffat)
    halos = galsim.ImageF(shape[1], shape[0], scale=1.0)
    for cx, cy, f, r in ((300, 350, 3e7, 80), (620, 600, 1.5e7, 50)):
        galaxy = galsim.Convolve(galsim.Sersic(n=4, half_light_radius=r, flux=f), moffat)
        galaxy.drawImage(halos, offset=(cx - shape[1] / 2, cy - shape[0] / 2), add_to_image=True, method="fft")
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    field = add_noise(model + halos.array + 0.05 * xx + 20 * np.sin(yy / 150.0), sky=200.0, gain=2.0,
                      read_noise_e=5.0, rng=rng)
    psf = measure_psf(make_exposure(field.image - 200.0, field.variance))
    true = galsim.Convolve(moffat, galsim.Pixel(1.0)).drawImage(nx=201, ny=201, scale=1.0, method="no_pixel").array
    assert psf.nea == pytest.approx(1.0 / np.sum((true / true.sum()) ** 2), rel=0.03)
    assert psf.fwhm == pytest.approx(4.0, rel=0.03)


@pytest.mark.parametrize("sigma", [0.4, 0.55, 0.7])
def test_the_size_of_an_undersampled_psf_centred_on_a_pixel(sigma):
    """HSM gives no moments for a profile this narrow centred on a pixel (the Gaussian weight collapses onto it), and a
    NaN sigma crashed the star search of a plain-FITS pair at FWHM 1.3 px. Measured on a 4x finer spline-interpolated
    grid instead, it is the pixel-convolved sigma within 10%."""
    from dialab.moments import adaptive_moments
    from dialab.psf import stamp_sigma

    stamp = galsim.Gaussian(sigma=sigma).drawImage(nx=15, ny=15, scale=1.0).array
    assert not adaptive_moments(stamp, 7, 7, 1.0).converged
    assert stamp_sigma(stamp) == pytest.approx(np.sqrt(sigma**2 + 1 / 12), rel=0.1)


def test_psf_stars_with_a_neighbour_in_their_stamp_give_the_true_wings():
    """A broad Moffat PSF (FWHM 8 px, as 1.3" seeing at HSC's scale) and every star with another of 1/3 to 3 times
    its flux 2.5-3 FWHM away, inside its 6-FWHM stamp. Stacked as they are, the neighbours made the model's wings at
    2-3 FWHM 1.7-2.3 times too bright and its NEA 10-18% too large (fluxes that much too high); with each
    neighbour's light (fitted with a first model) taken out of the stamps, the wings are within 15% and the NEA
    within 5%."""
    rng = np.random.default_rng(1)
    psf = galsim.Moffat(beta=3.0, fwhm=8.0)
    n = 70
    x, y, f = rng.uniform(60, 964, n), rng.uniform(60, 964, n), 10 ** rng.uniform(4.3, 5.3, n)
    angle, separation = rng.uniform(0, 2 * np.pi, n), rng.uniform(20, 26, n)
    xs, ys = np.r_[x, x + separation * np.cos(angle)], np.r_[y, y + separation * np.sin(angle)]
    fluxes = np.r_[f, f * 10 ** rng.uniform(-0.5, 0.5, n)]
    image = draw_point_sources((1024, 1024), xs, ys, fluxes, lambda a, b: psf) + rng.normal(0, 10.0, (1024, 1024))
    model = measure_psf(make_exposure(image, 100.0)).stamp()
    h = model.shape[0] // 2
    true = psf.drawImage(nx=2 * h + 1, ny=2 * h + 1, scale=1.0).array
    true /= true.sum()
    r = np.hypot(*np.mgrid[-h : h + 1, -h : h + 1])
    wings = (r >= 16) & (r <= 24)
    assert model[wings].sum() / true[wings].sum() == pytest.approx(1.0, abs=0.15)
    assert ImagePsf(model).nea == pytest.approx(ImagePsf(true).nea, rel=0.05)


def test_stars_of_a_very_undersampled_psf_are_found_and_modelled():
    """Kolmogorov x Airy stars of FWHM 1.5 px (pixel included) among compact galaxies (3:1). HSM fails on such a
    star centred on a pixel: measured only on the pixels, most stars were lost (21 of the 120 among 226 'stars')
    and the model was the galaxies' (FWHM +22-28%). Found on a finer grid when HSM fails, they are the stars again,
    and the model's FWHM is within 4% at the centre and both edges."""
    from dialab.simulate.truthpair import TruthPairSpec, psf_profile, simulate_truth_pair
    from dialab.stars import select_psf_stars

    spec = TruthPairSpec(shape=(1024, 1024), science_fwhm=1.0, template_fwhm=1.2, airy_lam_over_diam=0.5)
    science, _, _, static = simulate_truth_pair(spec, seed=1)
    science.psf = None
    found = select_psf_stars(science)
    stars = static[static.star]
    near = np.hypot(found.x[:, None] - stars.x.to_numpy()[None], found.y[:, None] - stars.y.to_numpy()[None]) < 1
    assert near.any(axis=0).sum() > 0.5 * len(stars)
    measured = measure_psf(science)
    for x in (205, 512, 818):
        true = psf_profile(spec, spec.science_fwhm, x).drawImage(nx=61, ny=61, scale=1.0).array
        assert stamp_fwhm(measured.stamp(x=x, y=512)) == pytest.approx(stamp_fwhm(true), rel=0.04)


def test_light_radius_is_the_analytic_one_and_sees_heavy_wings():
    """A Gaussian holds 90% of its light within sqrt(2 ln 10) sigma = 2.15 sigma (to the pixel rings' 0.5 px); a
    Moffat of beta 2 and the same FWHM reaches far further, which a delta kernel's box must follow."""
    from dialab.psf import light_radius

    gauss = GaussianPsf(sigma_pix=3.0)
    assert abs(light_radius(gauss.stamp(61)) - np.sqrt(2 * np.log(10)) * 3.0) < 0.5
    assert light_radius(gauss.stamp(61), 0.5) < light_radius(gauss.stamp(61))
    moffat = MoffatPsf(fwhm_pix=gauss.fwhm, beta=2.0)
    assert light_radius(moffat.stamp(101)) > 2 * light_radius(gauss.stamp(101))
