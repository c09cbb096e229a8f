"""Photometry with a PSF model: forced PSF fluxes, aperture fluxes, and the aperture correction that ties the
first to the total flux (a PSF model is a unit-sum stamp: a fit with it measures the light inside the stamp).

The correction belongs to the PSF model (``Psf.aperture_correction``), as LSST's belongs to its exposure: every
PSF flux measured with the model (diaSources, forced photometry of science, template and difference) is
multiplied by it, and fakes drawn with the model are divided by it, so that an injected flux is measured back.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from .background import sky_background, sky_subtracted
from .exposure import Exposure
from .imageops import aperture_sum, stamp_index
from .lazy import lazy_module
from .psf import ApertureCorrection, GridPsf, Psf, resize_stamp, shift_stamps, shifted_centres
from .stars import locus_stars, peak_positions, psf_filter_sigma

pd = lazy_module("pandas")
log = logging.getLogger(__name__)

#: Objects measured per batch: bounds the (batch, size, size) model and pixel stamps held at once.
FORCED_BATCH = 1024


def forced_psf_flux(exp: Exposure, x: np.ndarray, y: np.ndarray, size: int | None = None) -> pd.DataFrame:
    """Linear PSF fit at fixed positions: flux = sum(P D / V) / sum(P^2 / V), error 1 / sqrt(sum(P^2 / V)).

    Unusable pixels (BAD, SAT, NO_DATA, EDGE) carry no weight; a source with no usable pixel gets NaN.
    On a score image (header SCORE = True: already the PSF-filtered difference, with correlated
    noise) the matched filter has been applied, so the flux is the score at the position divided by
    the score PSF's value there, and the error is sqrt(variance) scaled the same way.
    Objects are measured in batches of array operations (``Psf.draw_many``): every diaObject of an image is.
    Fluxes are totals: multiplied by the PSF's aperture correction (``Psf.flux_correction``) when it has one.
    """
    flux, err = psf_fluxes(exp, x, y, size)
    return pd.DataFrame({"psfFlux": flux, "psfFluxErr": err})


def psf_fluxes(exp: Exposure, x: np.ndarray, y: np.ndarray, size: int | None = None,
               image=None) -> tuple[np.ndarray, np.ndarray]:
    """``forced_psf_flux``'s fluxes and errors as arrays (the subtraction's own callers need no table library);
    measured on ``image`` (read in windows, e.g. ``sky_subtracted``) instead of the exposure's own pixels when
    given."""
    psf = exp.psf
    if psf is None:
        raise ValueError("forced photometry needs the exposure's PSF")
    size = size or min(psf.default_size, 31)
    x, y = np.asarray(x, float), np.asarray(y, float)
    flux = np.full(len(x), np.nan)
    err = np.full(len(x), np.nan)
    measure = _score_flux if exp.header.get("SCORE", False) else _fitted_flux
    for start in range(0, len(x), FORCED_BATCH):
        batch = slice(start, start + FORCED_BATCH)
        flux[batch], err[batch] = measure(exp, x[batch], y[batch], size, exp.image if image is None else image)
    corr = psf.flux_correction(x, y)
    return flux * corr, err * corr


def _fitted_flux(exp: Exposure, x: np.ndarray, y: np.ndarray, size: int, image) -> tuple[np.ndarray, np.ndarray]:
    psf, h = exp.psf, size // 2
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    # The fit window is cropped from the full, unit-sum model: fluxes are totals, not window sums.
    model = psf.draw_many(x - ix, y - iy, x, y)
    model = resize_stamp(model, size)
    at, inside = stamp_index(ix, iy, h, exp.shape)
    w = np.where(inside & ~exp.unusable[at], 1.0 / np.maximum(exp.variance[at], np.float32(1e-30)), np.float32(0))
    denom = np.einsum("kij,kij,kij->k", model, model, w)
    good = denom > 0
    flux = np.where(good, np.einsum("kij,kij,kij->k", model, image[at], w) / np.where(good, denom, 1.0), np.nan)
    return flux, np.where(good, 1.0 / np.sqrt(np.where(good, denom, 1.0)), np.nan)


def _score_flux(exp: Exposure, x: np.ndarray, y: np.ndarray, size: int, image) -> tuple[np.ndarray, np.ndarray]:
    ny, nx = exp.shape
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    ok[ok] = ~exp.unusable[iy[ok], ix[ok]]
    flux, err = np.full(len(x), np.nan), np.full(len(x), np.nan)
    peak = shifted_centres(exp.psf.stamps_at(x[ok], y[ok]), x[ok] - ix[ok], y[ok] - iy[ok])
    flux[ok] = image[iy[ok], ix[ok]] / peak
    err[ok] = np.sqrt(exp.variance[iy[ok], ix[ok]]) / peak
    return flux, err


def aperture_flux(exp: Exposure, x: float, y: float, radius: float) -> tuple[float, float]:
    """Sum of pixels whose centres lie within ``radius`` of (x, y), and its error from the variance."""
    return aperture_sum(exp.image, exp.variance, x, y, radius)


#: Radius of the aperture that PSF fluxes are calibrated to, in FWHM (LSST calibrates to a 12-px aperture, about
#: 3 FWHM on HSC). On 1-Mpix galaxy-rich truth images the correction to 2 and 3 FWHM came out within 0.6% and
#: 1% of the truth, and to 4 FWHM up to 2.4% low: the sky's error grows with the aperture's area.
APCORR_RADIUS_FWHM = 3.0


def aperture_correction(exp: Exposure, radius_fwhm: float = APCORR_RADIUS_FWHM, min_snr: float = 50.0,
                        psf: Psf | None = None) -> ApertureCorrection:
    """Aperture flux / PSF flux of the bright isolated stars of ``exp`` (with ``psf``, default its own), as a
    plane over the image.

    A PSF model is a stamp of unit sum, so a PSF fit measures the light the model holds: a given model
    truncated by its stamp, or one measured from stars whose outer wings hold some of their neighbours' light,
    measures a share of the light that depends on how the model was made. Calibrated to one aperture of ``radius_fwhm``
    FWHM, PSF fluxes mean the same on every image, whatever its model. (The light beyond the aperture, 2-3% for
    Kolmogorov and Airy wings at 3 FWHM, is the zeropoint's business, as in LSST.)

    The aperture is taken on the image less its sky around stars with no other 5-sigma peak within a FWHM of
    it, and the stars' ratios are combined by ``_star_ratio`` (weighted by their errors: the brightest stars
    measure it best; the median of the ratios, ruled by stars near the S/N cut, scattered 0.98-1.19 on 1-Mpix
    truth images). Stars of S/N >= ``min_snr`` are used, or down to 2.5 times fainter when too few are bright and
    isolated (small and crowded images). With fewer than ``MIN_STARS``, or an error above ``MAX_ERROR``, the
    correction is 1 with 0 stars.

    A given model (not ``Psf.from_stars``) knows what its stamp leaves out: its own correction
    (``model_aperture_correction``) is exact for the true PSF, where the stars' carries the sky's and the compact
    galaxies' errors (+-1% in galaxy-rich fields). It is used unless the stars disagree with it by more than
    ``MODEL_AGREEMENT`` (a model of another shape than the image's stars: the stars' is used, with a warning).
    """
    psf = exp.psf if psf is None else psf
    if psf is None:
        return ApertureCorrection(1.0)
    stars = _stars_correction(exp, psf, radius_fwhm, min_snr)
    own = None if psf.from_stars else model_aperture_correction(psf, exp.shape, radius_fwhm * psf.fwhm)
    if own is None:
        return stars
    if stars.n_stars and abs(stars.value / own.value - 1) > max(MODEL_AGREEMENT, 3 * stars.error):
        log.warning("%s: the stars' aperture correction %.4f disagrees with the given PSF model's own %.4f: the "
                    "stars' is used", exp.path or "image", stars.value, own.value)
        return stars
    return dataclasses.replace(own, error=stars.error, n_stars=stars.n_stars)


#: A given model's own correction stands unless its stars' differs by more than this fraction (or 3 of its errors):
#: on galaxy-rich truth images the stars' came out 1.05% low to 0.54% high of the exact value, the true model's own
#: within 0.13%; a WebbPSF model of a drizzled NIRCam image (20% sharper than its stars) is 9-15% off.
MODEL_AGREEMENT = 0.02


#: Most pixels by which a given model's own aperture correction may reach past its stamp (``model_aperture_correction``).
APERTURE_MARGIN = 2


def model_aperture_correction(psf: Psf, shape: tuple[int, int], radius: float) -> ApertureCorrection | None:
    """A given model's own aperture / PSF flux: the share of its light inside the aperture, averaged over the
    sub-pixel phases a star can have, as a plane over the image (from nine positions when it varies). None when the
    aperture does not fit in the model's stamp: the light between them is unknown to the model. An aperture that
    reaches at most a pixel past the stamp's inscribed circle (a 41-px model of FWHM 6.8 px, an HSC stamp in 1.1"
    seeing, at 3 FWHM: 20.5 px) is taken on the stamp padded with zeros (``APERTURE_MARGIN``, a pixel more for the
    sub-pixel shifts): the model puts its whole unit sum inside, and the light of the true PSF in that sliver is
    ~0.1%, where the stars' correction, from a dozen bright stars in apertures full of neighbours, was 1-1.4%
    uncertain and 3.5% off."""
    size = psf.default_size
    pad = max(0, math.ceil(radius + 1 - (size - 1) / 2))
    if pad > APERTURE_MARGIN:
        return None
    centre = (size - 1) / 2 + pad
    ny, nx = shape
    phases = (np.arange(4) + 0.5) / 4 - 0.5
    dx, dy = (a.ravel() for a in np.meshgrid(phases, phases))
    xs, ys = (a.ravel() for a in np.meshgrid((0.1 * nx, 0.5 * nx, 0.9 * nx), (0.1 * ny, 0.5 * ny, 0.9 * ny)))
    if not isinstance(psf, GridPsf):
        xs, ys = xs[4:5], ys[4:5]  # one model everywhere
    values = []
    for x, y in zip(xs, ys):
        moved = shift_stamps(np.repeat(np.pad(psf.stamp(size, x, y), pad)[None], len(dx), axis=0), dx, dy)
        values.append(np.mean([aperture_sum(m, m, centre + a, centre + b, radius)[0] for m, a, b in zip(moved, dx, dy)]))
    design = np.column_stack([np.ones_like(xs), xs - 0.5 * nx, ys - 0.5 * ny])[:, : 1 if len(xs) == 1 else 3]
    coef = np.r_[np.linalg.lstsq(design, np.array(values), rcond=None)[0], 0.0, 0.0][:3]
    return ApertureCorrection(float(coef[0]), 0.5 * nx, 0.5 * ny, float(coef[1]), float(coef[2]), 0.5 * nx, 0.5 * ny,
                              source="model")


def _stars_correction(exp: Exposure, psf: Psf, radius_fwhm: float, min_snr: float) -> ApertureCorrection:
    """The stars' aperture / PSF flux ratio (``_star_ratio``), or 1 with 0 stars."""
    none = ApertureCorrection(1.0)
    # found with the PSF's own filter, as registration and the kernel candidates find theirs: one search
    sigma = psf_filter_sigma(psf)
    radius = radius_fwhm * psf.fwhm
    px, py = peak_positions(exp, sigma)
    sub = None
    for snr in (min_snr, min_snr / 2.5):  # a small or crowded image may have too few bright isolated stars
        stars = locus_stars(exp, sigma, snr, radius_pix=max(5, int(math.ceil(3 * sigma))))
        if len(px) > 1 and len(stars):
            d = np.hypot(stars.x[:, None] - px[None], stars.y[:, None] - py[None])
            stars = stars.select(np.sort(d, axis=1)[:, 1] > radius + psf.fwhm)
        if len(stars) < MIN_STARS:
            continue
        if sub is None:  # the sky-subtracted pixels read in windows: no full-size copy
            sub = dataclasses.replace(exp, psf=psf.with_aperture_correction(None))
            image = sky_subtracted(exp.image, sky_background(exp))
        fitted = psf_fluxes(sub, stars.x, stars.y, image=image)[0]
        apertures = np.array([aperture_sum(image, sub.variance, x, y, radius) for x, y in zip(stars.x, stars.y)])
        good = np.isfinite(fitted) & np.isfinite(apertures).all(axis=1) & (fitted > 0)
        if good.sum() >= MIN_STARS:
            corr = _star_ratio(apertures[good, 0] / fitted[good], apertures[good, 1] / fitted[good], stars.x[good],
                               stars.y[good])
            if corr.n_stars:
                return corr
    return none


#: Fewest stars of a correction (with fewer, or a correction less precise than MAX_ERROR, it is 1).
MIN_STARS = 5
MAX_ERROR = 0.02
#: Stars per term of the plane (its gradients are fitted only with this many per term, and kept when significant).
STARS_PER_TERM = 5


def _star_ratio(ratio: np.ndarray, error: np.ndarray, x: np.ndarray, y: np.ndarray) -> ApertureCorrection:
    """The stars' aperture / PSF flux ratio as a plane in (x, y), or a constant.

    A compact galaxy that passed the stellar locus has a *larger* ratio (its light extends beyond the PSF), and
    on a deep field such galaxies can be half the candidates; nothing is more concentrated than a star. So the
    fit is iterated with a one-sided clip: ratios more than 3 sigma above it are dropped (5 sigma below: a
    cosmic ray, a neighbour's dip). The weights are inverse variances with a 0.5% floor for the model's error.
    The gradients are kept when they lower the chi^2 significantly (F test, p < 0.01): a model measured from
    the stars can get the PSF's variation across the CCD a few per cent wrong, and its fluxes with it.
    """
    from scipy.special import fdtrc  # the F distribution's survival function (scipy.stats costs 0.5 s to import)

    error = np.hypot(error, 0.005 * np.abs(ratio))
    x0, y0 = float(np.mean(x)), float(np.mean(y))
    design = np.column_stack([np.ones_like(x), x - x0, y - y0])
    fit = _clipped_plane(ratio, error, design[:, :1])
    if fit is None:
        return ApertureCorrection(1.0)
    coef, keep, chi2 = fit
    if len(ratio) >= STARS_PER_TERM * 3:
        plane = _clipped_plane(ratio, error, design)
        if plane is not None:
            dof = plane[1].sum() - 3
            f = (chi2 - plane[2]) / 2 / max(plane[2] / max(dof, 1), 1e-30)
            if dof > 0 and fdtrc(2, dof, f) < 0.01:
                coef, keep, chi2 = plane
    coef = np.r_[coef, 0.0, 0.0][:3]
    w = 1.0 / error[keep] ** 2
    scale = max(chi2 / max(keep.sum() - 1, 1), 1.0)
    error_of_value = float(np.sqrt(scale / np.sum(w)))
    if keep.sum() < MIN_STARS or error_of_value > MAX_ERROR:
        return ApertureCorrection(1.0)
    return ApertureCorrection(float(coef[0]), x0, y0, float(coef[1]), float(coef[2]),
                              float(np.max(np.abs(x - x0))), float(np.max(np.abs(y - y0))), error_of_value,
                              int(keep.sum()))


def _clipped_plane(ratio, error, design) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Weighted least squares of ``ratio`` on ``design`` with the one-sided clip: (coef, kept, chi^2) or None.

    High outliers are clipped first, and low ones only against the fit that leaves: where a few precise compact
    galaxies pull the first fit up, the most precise star would otherwise be clipped as a low outlier and the fit
    settle on the galaxies (a 768^2 truth image: 1.012 for 0.964).
    """
    med = np.median(ratio)
    keep = np.abs(ratio - med) < 0.5 * med  # a start without the absurd
    coef = None
    for low in (-np.inf, -5.0):
        for _ in range(20):
            if keep.sum() < max(3, design.shape[1] + 2):
                return None
            w = 1.0 / error[keep]
            coef, *_ = np.linalg.lstsq(design[keep] * w[:, None], ratio[keep] * w, rcond=None)
            pull = (ratio - design @ coef) / error
            new = (pull < 3.0) & (pull > low)
            if (new == keep).all():
                break
            keep = new
    return coef, keep, float(np.sum(((ratio - design @ coef) / error)[keep] ** 2))


def with_aperture_correction(exp: Exposure, psf: Psf | None = None) -> Psf | None:
    """``psf`` (default the exposure's) carrying the aperture correction measured on ``exp``, unless it carries one."""
    psf = exp.psf if psf is None else psf
    if psf is None or psf.aperture_correction is not None:
        return psf
    corr = aperture_correction(exp, psf=psf)  # the exposure itself: its sky and stars are already known
    log.info("%s: aperture correction %.4f (%s; %d stars, +- %.4f) gradients %.2g, %.2g per 1000 px",
             exp.path or "image", corr.value, corr.source, corr.n_stars, corr.error, 1e3 * corr.gx, 1e3 * corr.gy)
    return psf.with_aperture_correction(corr)
