"""Smooth sky background and its noise from a coarse mesh of clipped medians.

Used before PSF measurement, kernel-candidate selection and detection; masked pixels (and,
optionally, detected sources) are excluded so that stars do not lift the sky.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Background:
    """Sky level and per-pixel noise (same units as the image), full resolution."""

    level: np.ndarray
    rms: np.ndarray

    @property
    def median_rms(self) -> float:
        return float(np.median(self.rms))


def clipped_stats(values: np.ndarray, nsigma: float = 3.0, iterations: int = 5,
                  axis: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD-sigma after iterative sigma clipping; NaN entries are ignored."""
    v = np.array(values, dtype=float, copy=True)
    for _ in range(iterations):
        med = np.nanmedian(v, axis=axis, keepdims=True)
        sig = MAD_TO_SIGMA * np.nanmedian(np.abs(v - med), axis=axis, keepdims=True)
        v = np.where(np.abs(v - med) > nsigma * np.maximum(sig, 1e-30), np.nan, v)
    med = np.nanmedian(v, axis=axis)
    sig = MAD_TO_SIGMA * np.nanmedian(np.abs(v - np.nanmedian(v, axis=axis, keepdims=True)), axis=axis)
    return med, sig


def robust_std(values: np.ndarray) -> float:
    """Clipped MAD standard deviation of the finite entries."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    return float(clipped_stats(v)[1])


def estimate_background(image: np.ndarray, bad: np.ndarray | None = None, mesh_pix: int = 64,
                        mask_sources_nsigma: float | None = 3.0) -> Background:
    """Mesh background: clipped median and MAD per box, 3x3 median-filtered, spline-upsampled.

    ``bad`` marks pixels never used. When ``mask_sources_nsigma`` is set, a first pass finds
    pixels above that many sigma (grown by 2 px) and masks them for the second pass.
    """
    ny, nx = image.shape
    bad = np.zeros(image.shape, bool) if bad is None else bad | ~np.isfinite(image)
    bg = _mesh(image, bad, mesh_pix)
    if mask_sources_nsigma is not None:
        sources = (image - bg.level) > mask_sources_nsigma * bg.rms
        sources = ndimage.binary_dilation(sources, iterations=2)
        if (~(bad | sources)).sum() > 0.2 * image.size:
            bg = _mesh(image, bad | sources, mesh_pix)
    return bg


def _mesh(image: np.ndarray, bad: np.ndarray, mesh_pix: int) -> Background:
    ny, nx = image.shape
    by = max(1, int(round(ny / mesh_pix)))
    bx = max(1, int(round(nx / mesh_pix)))
    ey = np.linspace(0, ny, by + 1).astype(int)
    ex = np.linspace(0, nx, bx + 1).astype(int)
    level = np.full((by, bx), np.nan)
    rms = np.full((by, bx), np.nan)
    data = np.where(bad, np.nan, image.astype(float))
    for j in range(by):
        row = data[ey[j] : ey[j + 1]]
        boxes = [row[:, ex[i] : ex[i + 1]].ravel() for i in range(bx)]
        width = max(len(b) for b in boxes)
        stack = np.full((bx, width), np.nan)
        for i, b in enumerate(boxes):
            stack[i, : len(b)] = b
        enough = np.sum(np.isfinite(stack), axis=1) >= 0.1 * width
        if enough.any():
            med, sig = clipped_stats(stack[enough], axis=1)
            level[j, enough] = med
            rms[j, enough] = sig
    if not np.isfinite(level).any():
        level[:] = 0.0
        rms[:] = 1.0
    level = _fill(level)
    rms = _fill(rms)
    if min(by, bx) >= 3:
        level = ndimage.median_filter(level, size=3, mode="nearest")
        rms = ndimage.median_filter(rms, size=3, mode="nearest")
    return Background(_upsample(level, ny, nx), _upsample(rms, ny, nx))


def _fill(grid: np.ndarray) -> np.ndarray:
    """Replace NaN mesh cells by the nearest finite cell."""
    missing = ~np.isfinite(grid)
    if not missing.any():
        return grid
    idx = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    return grid[tuple(idx)]


def _upsample(grid: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Spline interpolation of mesh-cell values (at cell centres) to every pixel, separably."""
    by, bx = grid.shape
    cy = (np.arange(by) + 0.5) * ny / by - 0.5
    cx = (np.arange(bx) + 0.5) * nx / bx - 0.5
    if by == 1 and bx == 1:
        return np.full((ny, nx), grid[0, 0], dtype=np.float32)
    if by == 1 or bx == 1:
        axis_c, n = (cx, nx) if by == 1 else (cy, ny)
        line = np.interp(np.arange(n), axis_c, grid.ravel())
        out = np.broadcast_to(line[None, :] if by == 1 else line[:, None], (ny, nx))
        return np.ascontiguousarray(out, dtype=np.float32)
    spline = RectBivariateSpline(cy, cx, grid, kx=min(3, bx - 1), ky=min(3, by - 1))
    yy = np.clip(np.arange(ny), cy[0], cy[-1])
    xx = np.clip(np.arange(nx), cx[0], cx[-1])
    return spline(yy, xx).astype(np.float32)
