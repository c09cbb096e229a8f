"""Cosmic rays: finding features sharper than the PSF, and repairing them before a convolution.

Detection masks them on the difference; the pipeline repairs them on raw science visits first,
because a convolution (preconvolution, convolveScience) would turn each into a PSF-like blob.
"""

from __future__ import annotations

import logging

import numpy as np

from .background import keep_sky, sky_background
from .imageops import ROW_BLOCK, grow_mask, interpolate_masked, window_any
from .psf import measure_psf
from .stars import peak_positions, psf_filter_sigma

log = logging.getLogger(__name__)


def find_cosmic_rays(image: np.ndarray, variance: np.ndarray, psf_stamp: np.ndarray, nsigma: float = 6.0,
                     margin: float = 3.0, usable: np.ndarray | None = None, psf_tolerance: float = 0.25
                     ) -> np.ndarray:
    """Pixels sharper than the PSF allows, of either sign (grown by one pixel).

    A pixel is a cosmic ray when it is ``nsigma`` significant and, along at least one of the
    four directions, the mean of its two neighbours is below what the PSF would give
    (value x P(d)/P(0), less ``psf_tolerance`` of it for the PSF model's own error) by more than
    ``margin`` noise sigmas: streaks along any direction and single hot pixels qualify, while a
    point source of any brightness does not (without the tolerance, the core of a very bright
    star a few per cent sharper than the measured PSF was taken for a cosmic ray).
    """
    c = psf_stamp.shape[0] // 2
    p0 = psf_stamp[c, c]
    out = np.zeros(image.shape, bool)
    # a cheap superset of the significant pixels (squares, no full-size sqrt), then the exact test on those only
    maybe = np.empty(image.shape, bool)
    for y0 in range(0, image.shape[0], ROW_BLOCK):  # a band of rows at a time: no full-size float temporaries
        rows = slice(y0, y0 + ROW_BLOCK)
        np.greater(image[rows] * image[rows], variance[rows] * np.float32(nsigma * nsigma * (1 - 1e-5)),
                   out=maybe[rows])
    maybe[[0, -1], :] = False
    maybe[:, [0, -1]] = False
    if usable is not None:
        maybe &= usable
    y_all, x_all = np.nonzero(maybe)
    del maybe
    value_all = image[y_all, x_all]
    sig_all = np.sqrt(np.maximum(variance[y_all, x_all], 1e-30))
    for sign in (1.0, -1.0):
        significant = sign * value_all > nsigma * sig_all
        y, x, sig = y_all[significant], x_all[significant], sig_all[significant]
        if not len(y):
            continue
        v = sign * value_all[significant].astype(float)
        sharp = np.zeros(len(y), bool)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            ratio = (1 - psf_tolerance) * 0.5 * (psf_stamp[c + dy, c + dx] + psf_stamp[c - dy, c - dx]) / p0
            mean = 0.5 * sign * (image[y + dy, x + dx] + image[y - dy, x - dx])
            sharp |= (v - margin * sig) * ratio > mean + margin * sig / np.sqrt(2)
        out[y[sharp], x[sharp]] = True
    if not out.any():
        return out
    return grow_mask(out, 1)


#: Below this FWHM (pixels) a point source centred on a pixel is sharper than the PSF model (made from stars at every
#: sub-pixel phase) says, and may pass for a cosmic ray: the stars are then checked, and the model's tolerance raised
#: through PSF_TOLERANCES until at most MAX_STARS_HIT of the stars (S/N >= STAR_SNR) have a cosmic-ray pixel on their
#: centre. At FWHM 1.3 px (Moffat) the repair had taken a fifth of the bright stars' cores; cosmic rays, one or two
#: pixels with neighbours at 0-20% of their peak, stay below any of these tolerances.
UNDERSAMPLED_FWHM = 2.5
PSF_TOLERANCES = (0.25, 0.45, 0.65)
MAX_STARS_HIT = 0.05
STAR_SNR = 100.0


def _round_peaks(residual: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the bright peaks whose pixel neighbours hold some of the central pixel's light in every direction:
    point sources, however undersampled, and not a cosmic ray (a hit or a track has a direction with almost nothing
    beside it). Sizes are no help here: HSM fails on exactly the stars at risk, those centred on a pixel."""
    ny, nx = residual.shape
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (ix > 0) & (iy > 0) & (ix < nx - 1) & (iy < ny - 1)
    ix, iy = ix[inside], iy[inside]
    centre = residual[iy, ix].astype(float)
    keep = centre > 0
    for directions, least in ((((0, 1), (1, 0)), ROUND_NEIGHBOUR), (((1, 1), (1, -1)), ROUND_NEIGHBOUR / 5)):
        for dy, dx in directions:
            keep &= 0.5 * (residual[iy + dy, ix + dx] + residual[iy - dy, ix - dx]) >= least * centre
    return x[inside][keep], y[inside][keep]


#: Least neighbour / centre ratio of a point source's peak along the pixel axes (a fifth of it along the diagonals;
#: Moffat FWHM 1.3 px centred on a pixel: 0.3 and 0.1; see ``_round_peaks``).
ROUND_NEIGHBOUR = 0.15


def _stars_hit(cr: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of the stars at (x, y) with a cosmic-ray pixel within one pixel of their centre."""
    if not len(x):
        return 0.0
    return float(window_any(cr, np.round(x).astype(int), np.round(y).astype(int), 1).mean())


def repair_cosmic_rays(exp, nsigma: float = 6.0, margin: float = 3.0) -> int:
    """Find cosmic rays in a science exposure, mark them CR and INTRP and interpolate over them, in place.

    Raw visits carry cosmic rays; a convolution (preconvolution, convolveScience) would turn each
    into a PSF-like blob, so they are repaired before subtraction, as LSST's calibration does.
    Returns the number of CR pixels.
    """
    unusable = exp.plane("BAD", "SAT", "NO_DATA")
    background = sky_background(exp)
    psf = exp.psf if exp.psf is not None else measure_psf(exp)
    residual = (exp.image - background.level).astype(np.float32, copy=False)
    stars = None
    for tolerance in PSF_TOLERANCES:
        cr = find_cosmic_rays(residual, exp.variance, psf.stamp(), nsigma, margin, ~unusable, psf_tolerance=tolerance)
        if psf.fwhm >= UNDERSAMPLED_FWHM or not cr.any():
            break
        if stars is None:  # only for an undersampled PSF, and only with cosmic rays found
            stars = _round_peaks(residual, *peak_positions(exp, psf_filter_sigma(psf), STAR_SNR))
        hit = _stars_hit(cr, *stars)
        if len(stars[0]) < 5 or hit <= MAX_STARS_HIT:
            break
        log.warning("%s: %d%% of the stars look sharper than the PSF model allows (FWHM %.2f px, undersampled: a "
                    "star centred on a pixel is sharper than the model): cosmic-ray tolerance %.2f raised",
                    exp.path or "image", round(100 * hit), psf.fwhm, tolerance)
    if cr.any():
        exp.set_plane("CR", cr)
        exp.set_plane("INTRP", cr)
        repaired = interpolate_masked(residual, cr | unusable, max(psf.sigma, 1.0), only=cr)[cr]
        del residual  # before the new image is made
        image = exp.image.astype(np.float32)  # a new array: values derived from the old pixels see the change
        image[cr] = repaired + background.level[cr]
        exp.image = image
        keep_sky(exp, background)
    return int(cr.sum())
