"""Finding sources: smoothing with a PSF-like filter, thresholding and peaks.

This module holds the shared machinery (peaks above a S/N threshold in a filtered image). It is
used for stars (PSF measurement, kernel candidates) and, through detect_sources, for diaSources.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from .background import clipped_stats, estimate_background
from .errors import BadInputError
from .imageops import find_peaks, grow_mask, matched_filter_snr
from .repair import find_cosmic_rays

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


def detect_sources(exp, config: DetectConfig | None = None, is_score: bool | None = None,
                   workers: int | None = None) -> Detections:
    """Threshold the PSF-filtered S/N of a difference (or the S/N of a score image) in both polarities.

    Sets CR (when enabled), DETECTED and DETECTED_NEGATIVE in ``exp.mask``; the image itself is not
    changed (the residual background is returned separately).

    Parameters
    ----------
    exp : Exposure
        The difference, with its PSF.
    config : DetectConfig, optional
    is_score : bool, optional
        The image is already PSF-filtered (default: the header's SCORE key).
    workers : int, optional
        FFT threads.

    Returns
    -------
    Detections
    """
    cfg = config or DetectConfig()
    if exp.psf is None:
        raise BadInputError("detection needs the difference's PSF", exp.path)
    is_score = bool(exp.header.get("SCORE", False)) if is_score is None else is_score
    unusable = exp.plane(*PEAK_EXCLUDED)
    zero = np.float32(0)  # float32 fills: no float64 full-size temporaries
    image = np.where(unusable, zero, exp.image.astype(np.float32, copy=False))
    if cfg.subtract_background:
        # A difference is mostly empty: per-cell sigma clipping removes its few sources, no masking pass.
        bg = estimate_background(image, unusable, cfg.background_mesh_pix, mask_sources_nsigma=None).level
    else:
        bg = np.zeros(image.shape, np.float32)
    image -= bg
    image[unusable] = zero
    psf = exp.psf.stamp()
    if cfg.find_cosmic_rays and not is_score:
        cr = find_cosmic_rays(image, exp.variance, psf, cfg.cosmic_ray_nsigma, cfg.cosmic_ray_margin, ~unusable)
        exp.set_plane("CR", cr)
    var = np.where(unusable, np.float32(np.median(exp.variance)), exp.variance.astype(np.float32, copy=False))
    snr = image / np.sqrt(np.maximum(var, 1e-30)) if is_score else matched_filter_snr(image, var, psf, workers)
    snr = np.asarray(snr, np.float32)
    snr[unusable] = zero
    noise_scale = (filtered_noise_scale(snr, unusable, cfg.threshold, int(np.ceil(3 * exp.psf.sigma)))
                   if cfg.calibrate_noise else 1.0)
    if noise_scale != 1.0:
        snr = snr / np.float32(noise_scale)
    pos = snr > cfg.threshold
    neg = (snr < -cfg.threshold) if cfg.negative else np.zeros_like(pos)
    sigma = exp.psf.sigma
    pos_grown = grow_mask(pos, cfg.grow_sigma * sigma, "disk")
    neg_grown = grow_mask(neg, cfg.grow_sigma * sigma, "disk")
    labels, n = ndimage.label(pos_grown | neg_grown, structure=np.ones((3, 3), bool))
    # Peaks: local extrema of the filtered S/N above threshold, not on unusable pixels.
    sep = max(1, int(round(sigma)))
    ymax, xmax = find_peaks(snr, cfg.threshold, sep, exclude=unusable)
    ymin, xmin = find_peaks(-snr, cfg.threshold, sep, exclude=unusable) if cfg.negative else ([], [])
    py = np.concatenate([ymax, ymin]).astype(int)
    px = np.concatenate([xmax, xmin]).astype(int)
    sign = np.concatenate([np.ones(len(ymax)), -np.ones(len(ymin))])
    footprints, new_labels = _footprints(labels, n, snr, px, py, sign)
    exp.set_plane("DETECTED", pos_grown & (new_labels > 0))
    exp.set_plane("DETECTED_NEGATIVE", neg_grown & (new_labels > 0))
    sky = _sky_positions(new_labels > 0, unusable, cfg.n_sky_sources, int(np.ceil(3 * sigma)), cfg.sky_source_seed)
    return Detections(footprints, new_labels, snr, bg, sky, is_score, noise_scale)


def _footprints(labels: np.ndarray, n: int, snr: np.ndarray, px: np.ndarray, py: np.ndarray, sign: np.ndarray
                ) -> tuple[list[Footprint], np.ndarray]:
    """One Footprint per labelled region that holds a peak (renumbered from 1), and the new label image."""
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
    return footprints, new_labels


def filtered_noise_scale(snr: np.ndarray, unusable: np.ndarray, threshold: float, grow: int) -> float:
    """Robust std of the filtered S/N where nothing is: 1 when the variance plane is honest about the noise
    *after filtering*.

    Pixel variances miss the correlations that drizzling, stacking or warping leave (the filtered noise of a
    drizzled NIRCam image is 1.7-1.8x what its variance plane predicts), so a 5-sigma threshold would act like
    2.8 sigma. Sources (|S/N| above the threshold, grown by ``grow`` pixels) are left out; the clipped std
    (corrected for its own clipping) of the rest is the measured filtered noise.
    """
    scale = 1.0
    for _ in range(4):  # where the noise is underestimated, noise peaks pass the threshold: iterate
        busy = grow_mask(np.abs(snr) > threshold * scale, grow) | unusable
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
    blocked = grow_mask(occupied | unusable, radius)
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
