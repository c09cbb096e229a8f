"""Detection and measurement of diaSources, checked against injected truths and noise statistics."""

import galsim
import numpy as np
import pytest
from scipy.special import erfc

from dialab.detection import DetectConfig, detect_sources
from dialab.exposure import Exposure
from dialab.measurement import BAD_FLAGS, MeasureConfig, detect_and_measure
from dialab.psf import GaussianPsf
from dialab.simulate.render import draw_point_sources
from dialab.subtraction import subtract

from .simulated_pairs import gaussian_exposure, star_positions

SIGMA = 2.4


def _difference(shape, x, y, flux, noise=1.0, seed=0, sigma=SIGMA):
    """A difference image: signed point sources on white noise, PSF Gaussian ``sigma``."""
    rng = np.random.default_rng(seed)
    model = draw_point_sources(shape, np.asarray(x), np.asarray(y), np.asarray(flux),
                               lambda a, b: galsim.Gaussian(sigma=sigma), method="no_pixel") if len(x) else 0
    image = model + rng.normal(0, noise, shape)
    return Exposure(image, np.zeros(shape, np.int32), np.full(shape, noise**2), psf=GaussianPsf(sigma_pix=sigma))


def test_transients_of_both_signs_are_found_with_flux_and_sign():
    """Static scene (sigma 2.4), science noise 1, template noise 0.25, 10 transients of +-1000-2000."""
    shape = (512, 512)
    rng = np.random.default_rng(5)
    stars = star_positions(shape, 300, rng)
    tx, ty = rng.uniform(40, 470, 10), rng.uniform(40, 470, 10)
    tf = rng.uniform(1000, 2000, 10) * np.where(np.arange(10) % 2, 1, -1)
    extra = draw_point_sources(shape, tx, ty, tf, lambda a, b: galsim.Gaussian(sigma=SIGMA), method="no_pixel")
    sci = gaussian_exposure(shape, stars, SIGMA, 1.0, rng, extra=extra)
    tpl = gaussian_exposure(shape, stars, SIGMA, 0.25, rng)
    res = subtract(sci, tpl)
    cat, _, _ = detect_and_measure(res, sci, res.matched_image)
    assert len(cat) == 10
    used = set()
    for x, y, f in zip(tx, ty, tf):
        d = np.hypot(cat.x - x, cat.y - y)
        i = int(np.argmin(d))
        assert d.iloc[i] < 1.0 and i not in used
        used.add(i)
        assert cat.psfFlux.iloc[i] == pytest.approx(f, rel=0.025)
        assert bool(cat.isNegative.iloc[i]) == (f < 0)
    assert not cat[list(BAD_FLAGS)].any(axis=None)


def test_two_sources_in_one_footprint_are_two_diasources_unless_footprints_are_not_split():
    """Two positive sources 4 sigma apart share a footprint (its grown pixels join them), a negative one sits
    10 sigma from them. Each positive peak rises far above the col between them: by default (peaks of
    prominence >= 5 split) three diaSources; with an infinite prominence (LSST's difference imaging does not
    deblend) one per footprint and sign, at the stronger peak, and the lone one unchanged."""
    x, y, f = [100.0, 109.6, 150.0], [100.0, 100.0, 100.0], [3000.0, 2000.0, -2500.0]
    split, det, _ = detect_and_measure(_difference((200, 250), x, y, f, seed=3))
    merged, _, _ = detect_and_measure(_difference((200, 250), x, y, f, seed=3),
                                      measure_config=MeasureConfig(peak_prominence=np.inf))
    assert len(split) == 3 and len(det.footprints) == 2  # the two positive peaks are in one footprint
    np.testing.assert_allclose(np.sort(split.x[~split.isNegative]), [100.0, 109.6], atol=0.5)
    assert len(merged) == 2
    pos = merged[~merged.isNegative]
    assert abs(pos.x.iloc[0] - 100.0) < 0.5 and abs(pos.y.iloc[0] - 100.0) < 0.5
    np.testing.assert_allclose(merged[merged.isNegative][["x", "y", "psfFlux"]].to_numpy(),
                               split[split.isNegative][["x", "y", "psfFlux"]].to_numpy())


def _one_footprint(snr, peaks):
    """Detections of one footprint covering the whole S/N image ``snr``, with ``peaks`` (strongest first)."""
    from dialab.detection import Detections, Footprint

    footprint = Footprint(1, np.arange(snr.size), (slice(0, snr.shape[0]), slice(0, snr.shape[1])), peaks)
    return Detections([footprint], np.ones(snr.shape, np.int32), snr, np.zeros_like(snr), np.zeros((0, 2)), False)


@pytest.mark.parametrize("second", [12.0, 40.0])
def test_a_weaker_peak_is_its_own_diasource_only_when_it_rises_enough_above_the_col(second):
    """An S/N landscape of two bumps 16 px apart (peaks 60 and ``second`` on a ridge along x): the weaker peak's
    prominence is its height above the lowest point between them, read off the ridge here; it is split off
    exactly when that reaches ``peak_prominence``, for several settings."""
    from dialab.measurement import split_footprints

    yy, xx = np.mgrid[0:60, 0:80].astype(float)
    snr = (60 * np.exp(-((xx - 30) ** 2 + (yy - 30) ** 2) / (2 * 4.0**2))
           + second * np.exp(-((xx - 46) ** 2 + (yy - 30) ** 2) / (2 * 3.0**2))).astype(np.float32)
    ridge = snr[30]
    weak = 40 + int(np.argmax(ridge[40:]))
    prominence = ridge[weak] - ridge[30:weak].min()
    assert ridge[weak] > max(ridge[weak - 1], ridge[weak + 1])  # a peak of its own
    det = _one_footprint(snr, np.array([[30, 30, snr[30, 30], 1.0], [weak, 30, snr[30, weak], 1.0]]))
    for setting in (0.0, 0.5 * prominence, 0.9 * prominence, 1.1 * prominence, 2 * prominence, np.inf):
        assert len(split_footprints(det, 5.0, setting)) == (2 if setting <= prominence else 1), setting


def test_one_pixel_template_shift_gives_dipoles_of_one_pixel():
    """Ten stars, template shifted by 1 px: each a dipole; the science image's star flux fixes the
    lobe flux (F x separation alone is what the difference constrains), so the separation is 1 px."""
    shape = (400, 400)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(40, 360, 10), rng.uniform(40, 360, 10)
    keep = np.ones(10, bool)
    for i in range(10):
        keep[i] = all(np.hypot(x[i] - x[j], y[i] - y[j]) > 40 for j in range(i))
    x, y = x[keep], y[keep]
    f = np.full(len(x), 20000.0)
    diff = _difference(shape, np.r_[x, x + 1.0], np.r_[y, y], np.r_[f, -f])
    science = _difference(shape, x, y, f, seed=9)  # the stars themselves, which pin the lobes' flux
    cat, _, _ = detect_and_measure(diff, science)
    assert len(cat) == len(x)
    assert cat.isDipole.all()
    np.testing.assert_allclose(cat.dipoleLength, 1.0, rtol=0.10)  # no WCS: lengths in pixels


def test_a_dipole_fit_that_runs_off_its_footprint_neither_moves_the_source_nor_gives_it_fluxes(monkeypatch):
    """The fit's lobe positions are free: on an HSC CCD one ran 128 px off a cosmic ray's remains (chi^2 70 per
    pixel) and the diaSource was moved there, its forced fluxes and flags read at the wrong place. A fit whose
    lobes leave the footprint's box (grown by a FWHM) is a failed fit: the source stays at its peak, with no
    dipole fluxes. Fits that stay on it are kept (the one-pixel dipoles above)."""
    import dialab.measurement as measurement

    shape = (200, 200)
    diff = _difference(shape, [100.0, 101.0], [100.0, 100.0], [20000.0, -20000.0])
    honest = measurement.fit_dipole

    def runaway(exp, fp, peaks, prior=None):
        fit = honest(exp, fp, peaks, prior)
        return {**fit, "dipoleX": fit["dipoleX"] + 60.0, "dipoleLengthPix": 7.9}

    kept, _, _ = detect_and_measure(diff)
    monkeypatch.setattr(measurement, "fit_dipole", runaway)
    cat, _, _ = detect_and_measure(diff)
    assert len(kept) == len(cat) == 1 and kept.isDipole.all() and cat.isDipole.all()
    assert np.isfinite(kept.dipoleMeanFlux).all() and abs(kept.x.iloc[0] - 100.5) < 0.5
    assert np.isnan(cat.dipoleMeanFlux).all() and np.isnan(cat.dipoleLength).all()
    assert np.hypot(cat.x.iloc[0] - 100.5, cat.y.iloc[0] - 100.0) < 5  # at a lobe's filtered peak, not 60 px off


def test_pure_noise_gives_gaussian_false_detections_and_honest_sky_sources():
    """2048 x 2048 pure noise: expected 5-sigma false detections ~ 2 N_pix/NEA_filter x P(>5 sigma)."""
    shape = (2048, 2048)
    diff = _difference(shape, [], [], [], seed=11)
    cat, det, sky = detect_and_measure(diff, detect_config=DetectConfig(n_sky_sources=400))
    nea = GaussianPsf(sigma_pix=SIGMA).nea
    expected = 2 * shape[0] * shape[1] / (2 * nea) * 0.5 * erfc(5 / np.sqrt(2))
    print(f"false 5-sigma detections on 2048^2 noise: {len(cat)} (Gaussian expectation ~{expected:.2f})")
    assert len(cat) <= 5
    pulls = sky.psfFlux / sky.psfFluxErr
    assert len(pulls) == 400  # 400 rather than 100: the std of 100 pulls scatters by 7%
    assert 0.9 <= np.std(pulls) <= 1.1


def test_completeness_matches_a_five_sigma_matched_filter():
    """Point sources at known S/N: 50% found near S/N 5, >= 95% at S/N >= 7, flux pulls of unit width."""
    shape = (1024, 1024)
    rng = np.random.default_rng(3)
    gx, gy = np.meshgrid(np.arange(40, 1000, 40), np.arange(40, 1000, 40))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    snr_true = rng.uniform(2.0, 10.0, x.size)
    flux = snr_true * np.sqrt(GaussianPsf(sigma_pix=SIGMA).nea)  # noise 1: S/N = F / sqrt(NEA)
    diff = _difference(shape, x, y, flux, seed=4)
    cat, _, _ = detect_and_measure(diff)
    found = np.zeros(x.size, bool)
    pulls = []
    for i in range(x.size):
        d = np.hypot(cat.x - x[i], cat.y - y[i])
        if len(d) and d.min() < 2.0:
            found[i] = True
            pulls.append((cat.psfFlux.iloc[int(np.argmin(d))] - flux[i]) / cat.psfFluxErr.iloc[int(np.argmin(d))])
    bins = np.arange(2.0, 10.5, 0.5)
    centres, eff = [], []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (snr_true >= lo) & (snr_true < hi)
        centres.append(0.5 * (lo + hi))
        eff.append(found[sel].mean())
    half = float(np.interp(0.5, eff, centres))
    print(f"50% completeness at S/N {half:.2f}; efficiency per bin {np.round(eff, 2)}")
    assert 4.5 <= half <= 5.5
    assert found[snr_true >= 7].mean() >= 0.95
    assert 0.9 <= np.std(pulls) <= 1.2


def test_cosmic_rays_are_masked_and_flagged_but_transients_are_not():
    shape = (300, 300)
    diff = _difference(shape, [220.0], [220.0], [1234.0 * GaussianPsf(sigma_pix=SIGMA).nea ** 0.0 / 0.0276])
    peak = diff.image[220, 220]
    diff.image[50, 50:55] += 1234.0  # 1 x 5 streak
    diff.image[100:105, 150] += 1234.0  # 5 x 1 streak
    diff.image[200, 60] += 1234.0  # hot pixel
    cat, _, _ = detect_and_measure(diff)
    assert peak > 1000  # the transient's peak is comparable to the cosmic rays'
    assert diff.plane("CR")[50, 52] and diff.plane("CR")[102, 150] and diff.plane("CR")[200, 60]
    for x, y in ((52, 50), (150, 102), (60, 200)):
        row = cat.iloc[int(np.argmin(np.hypot(cat.x - x, cat.y - y)))]
        assert np.hypot(row.x - x, row.y - y) < 3 and row.pixelFlags_cr and row.pixelFlags_crCenter
    row = cat.iloc[int(np.argmin(np.hypot(cat.x - 220, cat.y - 220)))]
    assert not row.pixelFlags_cr and not diff.plane("CR")[215:226, 215:226].any()


@pytest.mark.parametrize("flag,plane", [
    ("bad", "BAD"), ("suspect", "SUSPECT"), ("interpolated", "INTRP"), ("edge", "EDGE"), ("saturated", "SAT"),
    ("nodata", "NO_DATA"), ("injected", "INJECTED"), ("injected_template", "INJECTED_TEMPLATE"),
])
def test_footprint_flag_goes_on_for_a_plane_in_the_footprint_only(flag, plane):
    diff = _difference((200, 200), [100.0], [100.0], [3000.0])
    diff.mask[100, 104] |= diff.mask_planes.bit(plane)  # inside the footprint, outside the 3x3 centre
    diff.mask[10, 10] |= diff.mask_planes.bit(plane)  # far away
    cat, _, _ = detect_and_measure(diff, detect_config=DetectConfig(find_cosmic_rays=False))
    assert len(cat) == 1
    assert cat[f"pixelFlags_{flag}"].iloc[0]
    center = f"pixelFlags_{flag}Center"
    if center in cat:
        assert not cat[center].iloc[0]


@pytest.mark.parametrize("flag,plane", [("saturatedCenter", "SAT"), ("interpolatedCenter", "INTRP"),
                                        ("suspectCenter", "SUSPECT"), ("crCenter", "CR"),
                                        ("injectedCenter", "INJECTED")])
def test_center_flag_goes_on_only_within_the_central_3x3(flag, plane):
    diff = _difference((200, 200), [100.0], [100.0], [3000.0])
    diff.mask[101, 101] |= diff.mask_planes.bit(plane)
    cat, _, _ = detect_and_measure(diff, detect_config=DetectConfig(find_cosmic_rays=False))
    assert cat[f"pixelFlags_{flag}"].iloc[0]
    diff2 = _difference((200, 200), [100.0], [100.0], [3000.0])
    diff2.mask[100, 103] |= diff2.mask_planes.bit(plane)
    cat2, _, _ = detect_and_measure(diff2, detect_config=DetectConfig(find_cosmic_rays=False))
    assert not cat2[f"pixelFlags_{flag}"].iloc[0]


def test_peaks_on_unusable_pixels_are_dropped():
    diff = _difference((200, 200), [100.0], [100.0], [3000.0])
    diff.set_plane("NO_DATA", np.pad(np.ones((21, 21), bool), ((90, 89), (90, 89))))
    det = detect_sources(diff, DetectConfig(find_cosmic_rays=False))
    assert len(det.footprints) == 0


@pytest.mark.parametrize("spacing_in_reach", [0.5, 1.2])
def test_peaks_beyond_the_prominence_reach_are_separate_and_cost_a_window_each(spacing_in_reach):
    """A trail-like ridge (S/N 50) as long as the image, with small bumps (+3, under the prominence of 5): bumps
    within reach of a stronger one belong to it (one diaSource for the trail), bumps farther apart than the
    reach are separate whatever the col, and the long footprint is labelled in windows only (fast)."""
    import time

    from dialab.measurement import PROMINENCE_REACH_FWHM, split_footprints

    fwhm = 4.0
    reach = PROMINENCE_REACH_FWHM * fwhm
    ny, nx = 21, 4000
    xx = np.arange(nx, dtype=float)
    bumps = np.arange(20.0, nx - 20, spacing_in_reach * reach)
    ridge = 50 + sum(3 * np.exp(-((xx - b) ** 2) / (2 * 2.0**2)) for b in bumps)
    snr = np.repeat(ridge[None, :], ny, axis=0).astype(np.float32)
    peaks = np.array([[b, 10, ridge[int(b)], 1.0] for b in bumps])
    peaks = peaks[np.argsort(-peaks[:, 2], kind="stable")]
    det = _one_footprint(snr, peaks)
    t0 = time.perf_counter()
    sources = split_footprints(det, fwhm, 5.0)
    assert time.perf_counter() - t0 < 1.0
    assert len(sources) == (1 if spacing_in_reach < 1 else len(bumps))
