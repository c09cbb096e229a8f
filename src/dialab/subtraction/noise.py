"""Honest noise: the inputs' variance planes scaled to their measured pixel noise, and the difference's
measured noise against its variance plane."""

from __future__ import annotations

import logging

import numpy as np

from ..background import clipped_stats, sky_background, sky_subtracted, smooth_grid_factors
from ..exposure import Exposure, bits_set
from ..imageops import ROW_BLOCK, block_sum, grow_mask

log = logging.getLogger(__name__)


def _sky_pixels(exp: Exposure, block: int = 4, windows: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(image - sky, read in blocks or windows; variance and source-free usable pixels, cut to whole blocks);
    None when under 30% is free. ``windows``: the caller reads a window only, so a released sky is not made
    at full size for it.

    Sources are found on 4x4-binned S/N (noise 4x lower, so noise peaks are not mistaken for
    sources and the pixel distribution is not clipped); their blocks and the neighbouring ones
    are excluded. The sky is the image's shared one, and the free pixels are found once per state of the
    pixels (the variance scale and the noise correlation both ask).
    """
    ny, nx = (exp.shape[0] // block) * block, (exp.shape[1] // block) * block
    sky = sky_background(exp)
    # read in blocks or windows, no full-size copy; a full pass makes the sky's plane (and keeps it)
    resid = sky_subtracted(exp.image, sky, full_pass=not windows)
    var = exp.variance[:ny, :nx]

    def free_pixels() -> np.ndarray | None:
        usable = ~exp.plane("BAD", "SAT", "NO_DATA", "EDGE", "CR")[:ny, :nx]
        snr = np.empty((ny // block, nx // block), np.float32)
        band = ROW_BLOCK - ROW_BLOCK % block
        for y0 in range(0, ny, band):
            rows = slice(y0, min(y0 + band, ny))
            u = usable[rows]
            snr[y0 // block : rows.stop // block] = block_sum(np.where(u, resid[rows, :nx], 0), block) / np.sqrt(
                np.maximum(block_sum(np.where(u, var[rows], 0), block), 1e-30))
        sources = grow_mask(np.abs(snr) > 3.0, 1)
        sources = np.repeat(np.repeat(sources, block, axis=0), block, axis=1)
        if (usable & ~sources).sum() < 0.3 * usable.sum():
            return None
        return usable & ~sources

    # kept packed (a bit per pixel): the exposure holds it as long as its pixels stay the same
    packed = exp.derived(("sky_pixels", block), lambda: _pack(free_pixels()))
    return None if packed is None else (resid, var, np.unpackbits(packed, count=ny * nx).reshape(ny, nx).view(bool))


def _pack(mask: np.ndarray | None) -> np.ndarray | None:
    return None if mask is None else np.packbits(mask)


def variance_scale(exp: Exposure, block: int = 4) -> float:
    """(measured / recorded)^2 pixel noise in source-free unmasked pixels (:func:`_sky_pixels`). Crowded
    images (under 30% free) keep their variance."""
    sky = _sky_pixels(exp, block)
    if sky is None:
        log.info("%s: too crowded to measure the pixel noise; variance kept", exp.path)
        return 1.0
    resid, _, usable = sky
    z = every_nth(_Pulls(exp, usable, resid), usable, max(1, int(np.count_nonzero(usable)) // 2_000_000))
    _, sigma = clipped_stats(z)
    return float(sigma**2) if np.isfinite(sigma) and sigma > 0 else 1.0


#: Largest pixel lag of the measured noise correlation (drizzling and resampling kernels reach 1-2 pixels).
MAX_LAG = 2
#: Smallest noise correlation kept.
MIN_CORRELATION = 0.02


def noise_correlation(exp: Exposure, max_lag: int = MAX_LAG) -> np.ndarray:
    """The pixel noise's normalised autocorrelation c(dy, dx), (2 max_lag + 1)^2 with c(0, 0) = 1, measured on
    source-free sky (at most a central 2048^2 window). Resampled, drizzled and stacked images have correlated
    noise, which a fit that corrects for the noise of its inputs must know. Lags under 0.02 or within 4 sigma
    of zero are set to zero, so white noise gives the delta function (the sky model leaves about -0.01 at
    every lag, which would add up over a smooth kernel basis; resampling's are 0.05 and more). Once per state
    of the image's pixels."""
    def measure() -> np.ndarray:
        out = np.zeros((2 * max_lag + 1,) * 2)
        out[max_lag, max_lag] = 1.0
        sky = _sky_pixels(exp, windows=True)  # a central window of the sky's pixels
        if sky is None:
            return out
        resid, var, usable = sky
        ny, nx = usable.shape
        y0, x0 = max(0, (ny - 2048) // 2), max(0, (nx - 2048) // 2)
        win = (slice(y0, min(y0 + 2048, ny)), slice(x0, min(x0 + 2048, nx)))
        m = usable[win]
        z, noise = resid[win], np.maximum(var[win], np.float32(1e-30))  # z in place: two window buffers at most
        z /= np.sqrt(noise, out=noise)
        del noise
        z[~m] = 0
        zz0 = (z * z).sum(dtype=float) / max(np.count_nonzero(m), 1)
        k = max_lag
        for dy in range(-k, k + 1):
            for dx in range(0, k + 1):
                if (dy, dx) <= (0, 0):
                    continue
                a = (slice(k + dy, z.shape[0] - k + dy), slice(k + dx, z.shape[1] - k + dx))
                b = (slice(k, z.shape[0] - k), slice(k, z.shape[1] - k))
                pairs = np.count_nonzero(m[a] & m[b])
                if pairs < 100:
                    continue
                c = (z[a] * z[b]).sum(dtype=float) / pairs / zz0  # float32 products, summed in float64
                if abs(c) > max(MIN_CORRELATION, 4 / np.sqrt(pairs)):
                    out[k + dy, k + dx] = out[k - dy, k - dx] = c
        return out
    return exp.derived(("noise_correlation", max_lag), measure)


def image_variance_scale(exp: Exposure) -> float:
    """:func:`variance_scale` against the image's shared sky, once per state of its pixels (every flavor
    that subtracts the image asks for it)."""
    return exp.derived("variance_scale", lambda: variance_scale(exp))


class _Usable:
    """The pixels with none of ``bits`` set, read a block of rows at a time (``usable[rows]``, ``usable[rows,
    cols]``): no full-size boolean plane of its own."""

    def __init__(self, mask: np.ndarray, bits: int):
        self.mask, self.bits, self.shape = mask, bits, mask.shape

    def __getitem__(self, key) -> np.ndarray:
        return ~bits_set(self.mask[key], self.bits)

    def count(self) -> int:
        return sum(int(np.count_nonzero(self[y : y + ROW_BLOCK])) for y in range(0, self.shape[0], ROW_BLOCK))


class _Pulls:
    """image / sqrt(variance) over ``usable``'s extent (the image's first rows and columns), NaN outside
    ``usable``, less a smooth surface once ``surface`` (its rows and columns factors) is set: made a block of rows
    at a time as it is read (``pulls[y0:y1]``), so no full-size buffer is held."""

    def __init__(self, exp: Exposure, usable: np.ndarray, image=None):
        self.exp, self.usable, self.shape = exp, usable, usable.shape
        self.image = exp.image if image is None else image  # or the image less its sky (``sky_subtracted``)
        self.surface = None

    def __getitem__(self, rows: slice) -> np.ndarray:
        rows, cols = slice(*rows.indices(self.shape[0])), slice(0, self.shape[1])
        z = np.sqrt(np.maximum(self.exp.variance[rows, cols], np.float32(1e-30)))
        np.divide(self.image[rows, cols], z, out=z)
        z[~self.usable[rows, cols]] = np.nan
        if self.surface is not None:
            z -= (self.surface[0][rows] @ self.surface[1]).astype(np.float32)
        return z


def noise_ratio(exp: Exposure, block: int = 64) -> float:
    """Robust std of image / sqrt(variance) in usable pixels, source pixels clipped: 1 when honest.

    A smooth residual background (box medians, spline-interpolated) is removed first: on a
    PSF-filtered score image a leftover sky gradient can be many times the pixel noise, and it
    must not be taken for noise (the variance plane is rescaled by this ratio).
    """
    ny, nx = (exp.shape[0] // block) * block, (exp.shape[1] // block) * block
    boxed = ny >= 2 * block and nx >= 2 * block
    unusable = exp.mask_planes.bitmask("BAD", "SAT", "NO_DATA", "EDGE", "CR", "DETECTED", "DETECTED_NEGATIVE")
    pulls = _Pulls(exp, _Usable(exp.mask[:ny, :nx] if boxed else exp.mask, unusable))
    if boxed:
        # every 4th pixel of each box row (a quarter of the boxes' pixels), one row of boxes at a time
        per_row = nx // block
        boxes = np.empty((ny // block * per_row, block * (block // 4)), np.float32)
        for y in range(0, ny, block):
            boxes[y // block * per_row : (y // block + 1) * per_row] = \
                pulls[y : y + block].reshape(block, per_row, block)[..., ::4].swapaxes(0, 1).reshape(per_row, -1)
        enough = np.isfinite(boxes).sum(axis=1) >= 0.25 * boxes.shape[1]
        if enough.any():
            level = np.full(len(boxes), np.nan)
            level[enough] = clipped_stats(boxes if enough.all() else boxes[enough], axis=1)[0]
            del boxes
            pulls.surface = smooth_grid_factors(level.reshape(ny // block, nx // block), ny, nx)
    values = every_nth(pulls, pulls.usable, max(1, pulls.usable.count() // 2_000_000))
    return float(clipped_stats(values, overwrite=True)[1]) if values.size else float("nan")


def every_nth(image, selected: np.ndarray, n: int, rows: int = 256) -> np.ndarray:
    """``image[selected][::n]`` without the full-size copy of ``image[selected]``: a block of rows at a time
    (``image`` is an array or anything that gives its rows as ``image[y0:y1]``)."""
    counts = [int(np.count_nonzero(selected[y : y + rows])) for y in range(0, image.shape[0], rows)]
    out = np.empty((sum(counts) + n - 1) // n, np.float32)  # filled in place: no list of pieces to concatenate
    seen = taken = 0
    for y, count in zip(range(0, image.shape[0], rows), counts):
        if count:
            picked = image[y : y + rows][selected[y : y + rows]][(-seen) % n :: n]
            out[taken : taken + len(picked)] = picked
            taken += len(picked)
        seen += count
    return out
