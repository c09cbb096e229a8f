"""How clean a difference is where it should be empty: significant residual blobs, and residuals at the
brightest sources.

The difference is put in units of its own noise, measured robustly on source-free sky (pixels where neither
input shows a source), so the count does not depend on whether a variance plane is honest: the same count
applies to any code's difference, ours or a peer's S/N map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..imageops import find_peaks, grow_mask


@dataclass(frozen=True)
class ResidualCounts:
    """Blobs of |z| > threshold with at least ``min_pixels`` pixels, and how many of the brightest template
    sources have one within ``radius`` pixels."""

    blobs: int
    bright_with_residual: int
    n_bright: int
    sky_std: float  # the difference's robust std on source-free sky (the unit of z)
    source_excess: float = float("nan")  # mean z^2 - 1 over the sources' pixels: their residual power, continuous

    def summary(self) -> str:
        return (f"{self.blobs} residual blobs, {self.bright_with_residual} of the {self.n_bright} brightest "
                f"template sources with a residual, excess power {self.source_excess:.2f} on the sources")


def source_free(science: np.ndarray, template: np.ndarray, sigma_pix: float, grow: int = 3,
                threshold: float = 3.0) -> np.ndarray:
    """Pixels where neither image, Gaussian-filtered, reaches ``threshold`` times the filtered image's own
    robust std (so correlated noise, as in drizzled or stacked images, is accounted for), with ``grow``
    pixels of margin around every source."""
    occupied = np.zeros(science.shape, bool)
    for img in (science, template):
        data = np.nan_to_num(np.asarray(img, np.float32))
        smooth = ndimage.gaussian_filter(data - np.median(data[::4, ::4]), sigma_pix)
        occupied |= smooth >= threshold * robust_std(smooth[::2, ::2])
    return ~grow_mask(occupied, grow)


def robust_std(values: np.ndarray) -> float:
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if len(v) else float("nan")


def brightest_sources(template: np.ndarray, n: int, sigma_pix: float, border: int) -> np.ndarray:
    """(n, 2) x, y of the ``n`` highest peaks of the (smoothed) template, away from the border."""
    data = np.nan_to_num(np.asarray(template, np.float32))
    smooth = ndimage.gaussian_filter(data - np.median(data[::4, ::4]), sigma_pix)
    y, x = find_peaks(smooth, np.percentile(smooth, 99.0), min_separation_pix=max(2, int(3 * sigma_pix)),
                      border_pix=border)
    return np.column_stack([x[:n], y[:n]])


def count_residuals(difference: np.ndarray, science: np.ndarray, template: np.ndarray, sigma_pix: float,
                    usable: np.ndarray | None = None, threshold: float = 5.0, min_pixels: int = 3,
                    n_bright: int = 12, radius: float | None = None, border: int = 20) -> ResidualCounts:
    """Residual blobs of ``difference`` (any scale: it is divided by its robust std on source-free sky).

    ``usable`` (default: finite, non-zero pixels away from the border) limits both the noise estimate and
    the blobs. Positive and negative blobs are counted apart (a dipole is two). A bright template source has
    a residual when a blob pixel lies within ``radius`` (default 3 sigma_pix + 2) pixels of its peak. Divide a
    difference by its per-pixel sigma first (an S/N map, as peers publish) to count on the footing of a noise
    that includes the sources' own photon noise.
    """
    diff = np.asarray(difference, np.float64)
    ok = np.isfinite(diff) & (diff != 0) if usable is None else usable & np.isfinite(diff)
    if border:
        edge = np.zeros_like(ok)
        edge[border:-border, border:-border] = True
        ok &= edge
    sky = ok & source_free(science, template, sigma_pix)
    std = robust_std(diff[sky])
    z = np.where(ok, (diff - np.median(diff[sky])) / std, 0.0)
    blob_pixels = np.zeros(diff.shape, bool)
    blobs = 0
    for sign in (1, -1):
        labels, _ = ndimage.label(sign * z > threshold)
        big = np.nonzero(np.bincount(labels.ravel())[1:] >= min_pixels)[0] + 1
        blobs += len(big)
        blob_pixels |= np.isin(labels, big)
    radius = 3 * sigma_pix + 2 if radius is None else radius
    bright = brightest_sources(template, n_bright, sigma_pix, border)
    near = grow_mask(blob_pixels, int(np.ceil(radius)), shape="disk") if blob_pixels.any() else blob_pixels
    hit = int(sum(near[y, x] for x, y in bright))
    sources = ok & ~sky
    excess = float(np.mean(z[sources] ** 2) - 1) if sources.any() else float("nan")
    return ResidualCounts(blobs, hit, len(bright), std, excess)
