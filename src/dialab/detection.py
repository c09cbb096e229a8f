"""Finding sources: smoothing with a PSF-like filter, thresholding and peaks.

This module holds the shared machinery (peaks above a S/N threshold in a filtered image). It is
used for stars (PSF measurement, kernel candidates) and, through detect_sources, for diaSources.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from .errors import BadInputError
from .imageops import find_peaks, interpolate_masked, matched_filter_snr

# --------------------------------------------------------------------------- diaSource detection

#: Peaks on these planes are dropped (no usable data under them).
PEAK_EXCLUDED = ("NO_DATA", "BAD", "SAT", "EDGE")


class DetectConfig(BaseModel):
    """Detection of diaSources on a difference or score image."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(5.0, gt=0, description="detection threshold, sigma of the filtered noise")
    grow_sigma: float = Field(2.4, ge=0, description="footprints grown by this many PSF sigma")
    negative: bool = Field(True, description="also detect negative sources")
    background_mesh_pix: int = Field(128, ge=16, description="mesh size of the residual background")
    subtract_background: bool = Field(True, description="remove a smooth residual background first")
    find_cosmic_rays: bool = Field(True, description="mask features sharper than the PSF as CR")
    cosmic_ray_nsigma: float = Field(6.0, description="significance of a cosmic-ray pixel")
    cosmic_ray_margin: float = Field(3.0, description="noise sigmas a CR pixel must clear its neighbours' PSF bound by")
    calibrate_noise: bool = Field(True, description="scale the filtered S/N (and flux errors) to the noise measured "
                                  "where nothing is detected: correlated noise makes the variance plane too small")
    n_sky_sources: int = Field(0, ge=0, description="empty positions measured for noise checks (0: none)")
    sky_source_seed: int = Field(0, description="seed of the sky-source positions")


@dataclass(frozen=True)
class Footprint:
    """One merged detection: its pixels (flat indices), bounding box and signed peaks."""

    id: int
    pixels: np.ndarray
    bbox: tuple[slice, slice]
    peaks: np.ndarray  # (n, 4): x, y, filtered S/N (signed), sign


@dataclass(frozen=True)
class Detections:
    footprints: list[Footprint]
    labels: np.ndarray  # footprint id (1-based) per pixel, 0 elsewhere
    snr: np.ndarray  # filtered S/N image that was thresholded
    background: np.ndarray
    sky_positions: np.ndarray  # (n, 2) x, y
    is_score: bool
    noise_scale: float = 1.0  # measured / predicted std of the filtered S/N (divided out of ``snr``)


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
    ny, nx = image.shape
    out = np.zeros(image.shape, bool)
    sigma_img = np.sqrt(np.maximum(variance, 1e-30))
    for sign in (1.0, -1.0):
        significant = sign * image > nsigma * sigma_img
        significant[[0, -1], :] = False
        significant[:, [0, -1]] = False
        if usable is not None:
            significant &= usable
        y, x = np.nonzero(significant)
        if not len(y):
            continue
        v = sign * image[y, x].astype(float)
        sig = sigma_img[y, x]
        sharp = np.zeros(len(y), bool)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            ratio = (1 - psf_tolerance) * 0.5 * (psf_stamp[c + dy, c + dx] + psf_stamp[c - dy, c - dx]) / p0
            mean = 0.5 * sign * (image[y + dy, x + dx] + image[y - dy, x - dx])
            sharp |= (v - margin * sig) * ratio > mean + margin * sig / np.sqrt(2)
        out[y[sharp], x[sharp]] = True
    if not out.any():
        return out
    return _grow(out, np.ones((3, 3), bool))


def repair_cosmic_rays(exp, nsigma: float = 6.0, margin: float = 3.0) -> int:
    """Find cosmic rays in a science exposure, mark them CR and INTRP and interpolate over them, in place.

    Raw visits carry cosmic rays; a convolution (preconvolution, convolveScience) would turn each
    into a PSF-like blob, so they are repaired before subtraction, as LSST's calibration does.
    Returns the number of CR pixels.
    """
    from .background import estimate_background
    from .psf import measure_psf

    unusable = exp.plane("BAD", "SAT", "NO_DATA")
    background = estimate_background(exp.image, unusable)
    psf = exp.psf if exp.psf is not None else measure_psf(exp, background=background)
    residual = (exp.image - background.level).astype(np.float32)
    cr = find_cosmic_rays(residual, exp.variance, psf.stamp(), nsigma, margin, ~unusable)
    if cr.any():
        exp.set_plane("CR", cr)
        exp.set_plane("INTRP", cr)
        filled = interpolate_masked(residual, cr | unusable, max(psf.sigma, 1.0)) + background.level
        exp.image = np.where(cr, filled, exp.image).astype(np.float32)
    return int(cr.sum())


def _grow(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary dilation done object by object inside padded bounding boxes (sparse masks are cheap)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask.copy()
    if mask.mean() > 0.05:
        return ndimage.binary_dilation(mask, structure=structure)
    r = structure.shape[0] // 2
    ny, nx = mask.shape
    out = np.zeros_like(mask)
    for sl in ndimage.find_objects(labels):
        y0, y1 = max(sl[0].start - r, 0), min(sl[0].stop + r, ny)
        x0, x1 = max(sl[1].start - r, 0), min(sl[1].stop + r, nx)
        out[y0:y1, x0:x1] |= ndimage.binary_dilation(mask[y0:y1, x0:x1], structure=structure)
    return out


def _disk(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= radius * radius + 1e-9


def detect_sources(exp, config: DetectConfig | None = None, is_score: bool | None = None,
                   workers: int | None = None) -> Detections:
    """Threshold the PSF-filtered S/N of a difference (or the S/N of a score image) in both polarities.

    Sets CR (when enabled), DETECTED and DETECTED_NEGATIVE in ``exp.mask``; the image itself is not
    changed (the residual background is returned separately).
    """
    cfg = config or DetectConfig()
    if exp.psf is None:
        raise BadInputError("detection needs the difference's PSF", exp.path)
    is_score = bool(exp.header.get("SCORE", False)) if is_score is None else is_score
    unusable = exp.plane(*PEAK_EXCLUDED)
    image = np.where(unusable, 0.0, exp.image).astype(np.float32)
    if cfg.subtract_background:
        from .background import estimate_background

        # A difference is mostly empty: per-cell sigma clipping removes its few sources, no masking pass.
        bg = estimate_background(image, unusable, cfg.background_mesh_pix, mask_sources_nsigma=None).level
    else:
        bg = np.zeros(image.shape, np.float32)
    image = np.where(unusable, 0.0, image - bg).astype(np.float32)
    psf = exp.psf.stamp()
    if cfg.find_cosmic_rays and not is_score:
        cr = find_cosmic_rays(image, exp.variance, psf, cfg.cosmic_ray_nsigma, cfg.cosmic_ray_margin, ~unusable)
        exp.set_plane("CR", cr)
    var = np.where(unusable, np.median(exp.variance), exp.variance).astype(np.float32)
    snr = image / np.sqrt(np.maximum(var, 1e-30)) if is_score else matched_filter_snr(image, var, psf, workers)
    snr = np.where(unusable, 0.0, snr).astype(np.float32)
    noise_scale = (filtered_noise_scale(snr, unusable, cfg.threshold, int(np.ceil(3 * exp.psf.sigma)))
                   if cfg.calibrate_noise else 1.0)
    if noise_scale != 1.0:
        snr = snr / np.float32(noise_scale)
    pos = snr > cfg.threshold
    neg = (snr < -cfg.threshold) if cfg.negative else np.zeros_like(pos)
    sigma = exp.psf.sigma
    grow = _disk(cfg.grow_sigma * sigma) if cfg.grow_sigma > 0 else np.ones((1, 1), bool)
    pos_grown = _grow(pos, grow)
    neg_grown = _grow(neg, grow)
    labels, n = ndimage.label(pos_grown | neg_grown, structure=np.ones((3, 3), bool))
    # Peaks: local extrema of the filtered S/N above threshold, not on unusable pixels.
    sep = max(1, int(round(sigma)))
    ymax, xmax = find_peaks(snr, cfg.threshold, sep, exclude=unusable)
    ymin, xmin = find_peaks(-snr, cfg.threshold, sep, exclude=unusable) if cfg.negative else ([], [])
    py = np.concatenate([ymax, ymin]).astype(int)
    px = np.concatenate([xmax, xmin]).astype(int)
    sign = np.concatenate([np.ones(len(ymax)), -np.ones(len(ymin))])
    owner = labels[py, px]
    footprints = []
    slices = ndimage.find_objects(labels)
    order = np.argsort(owner, kind="stable")
    owner_sorted = owner[order]
    starts = np.searchsorted(owner_sorted, np.arange(1, n + 2))
    new_labels = np.zeros_like(labels)
    for lab in range(1, n + 1):
        sel = order[starts[lab - 1] : starts[lab]]
        if len(sel) == 0:
            continue  # every peak of this footprint sat on unusable pixels
        bbox = slices[lab - 1]
        local = labels[bbox] == lab
        fid = len(footprints) + 1
        new_labels[bbox][local] = fid
        flat = np.ravel_multi_index(np.nonzero(local), local.shape)
        yy, xx = np.unravel_index(flat, local.shape)
        pixels = np.ravel_multi_index((yy + bbox[0].start, xx + bbox[1].start), labels.shape)
        peaks = np.column_stack([px[sel], py[sel], snr[py[sel], px[sel]], sign[sel]])
        peaks = peaks[np.argsort(-np.abs(peaks[:, 2]))]
        footprints.append(Footprint(fid, pixels, bbox, peaks))
    exp.set_plane("DETECTED", pos_grown & (new_labels > 0))
    exp.set_plane("DETECTED_NEGATIVE", neg_grown & (new_labels > 0))
    sky = _sky_positions(new_labels > 0, unusable, cfg.n_sky_sources, int(np.ceil(3 * sigma)), cfg.sky_source_seed)
    return Detections(footprints, new_labels, snr, bg, sky, is_score, noise_scale)


def filtered_noise_scale(snr: np.ndarray, unusable: np.ndarray, threshold: float, grow: int) -> float:
    """Robust std of the filtered S/N where nothing is: 1 when the variance plane is honest about the noise
    *after filtering*.

    Pixel variances miss the correlations that drizzling, stacking or warping leave (the filtered noise of a
    drizzled NIRCam image is 1.7-1.8x what its variance plane predicts), so a 5-sigma threshold would act like
    2.8 sigma. Sources (|S/N| above the threshold, grown by ``grow`` pixels) are left out; the clipped std
    (corrected for its own clipping) of the rest is the measured filtered noise.
    """
    from .background import clipped_stats, dilate_box

    scale = 1.0
    for _ in range(4):  # where the noise is underestimated, noise peaks pass the threshold: iterate
        busy = dilate_box(np.abs(snr) > threshold * scale, grow) | unusable
        values = snr[~busy]
        if values.size < 1000:
            return scale
        _, sigma = clipped_stats(values[:: max(1, values.size // 1_000_000)])
        if not (np.isfinite(sigma) and sigma > 0) or abs(sigma / scale - 1) < 0.01:
            return float(sigma) if np.isfinite(sigma) and sigma > 0 else scale
        scale = float(sigma)
    return scale


def _sky_positions(occupied: np.ndarray, unusable: np.ndarray, n: int, radius: int, seed: int) -> np.ndarray:
    """Up to ``n`` random positions at least ``radius`` px from any footprint, masked pixel or edge."""
    if n == 0:
        return np.zeros((0, 2))
    blocked = ndimage.maximum_filter((occupied | unusable).view(np.uint8), size=2 * radius + 1) > 0
    blocked[:radius] = blocked[-radius:] = True
    blocked[:, :radius] = blocked[:, -radius:] = True
    yy, xx = np.nonzero(~blocked)
    if len(yy) == 0:
        return np.zeros((0, 2))
    rng = np.random.default_rng(seed)
    chosen = []
    for i in rng.permutation(len(yy)):
        x, y = xx[i], yy[i]
        if all((x - cx) ** 2 + (y - cy) ** 2 > (2 * radius) ** 2 for cx, cy in chosen):
            chosen.append((x, y))
            if len(chosen) == n:
                break
    return np.array(chosen, dtype=float)
