"""Smooth sky background and its noise from a coarse mesh of clipped medians.

Used before PSF measurement, kernel-candidate selection and detection; masked pixels (and,
optionally, detected sources) are excluded so that stars do not lift the sky.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from scipy import ndimage

from .imageops import PlaneSum, SplineGrid, grid_spline, grow_mask, separable_product


class Background:
    """Sky level and per-pixel noise (same units as the image), full resolution, from a coarse mesh.

    ``level`` and ``rms`` are spline-evaluated from their mesh when first asked for (many callers never need
    ``rms``) and kept until :meth:`release`: a subtraction drops them once its last step that reads the sky is
    done (4 bytes per pixel of each image at its peak), and a later reader pays one evaluation again.
    """

    def __init__(self, level_grid: np.ndarray, rms_grid: np.ndarray, shape: tuple[int, int]):
        self.level_grid = level_grid
        self.rms_grid = rms_grid
        self.shape = shape

    @cached_property
    def level(self) -> np.ndarray:
        return _upsample(self.level_grid, *self.shape)

    @cached_property
    def rms(self) -> np.ndarray:
        return _upsample(self.rms_grid, *self.shape)

    def release(self) -> None:
        """Drop the full-resolution planes (the mesh stays; they are evaluated again when next asked for)."""
        self.__dict__.pop("level", None)
        self.__dict__.pop("rms", None)

    def level_windows(self) -> np.ndarray | SurfaceWindows:
        """The level as kept (a full plane), or, once released, read in windows from the mesh's spline: stamps
        and row blocks of the sky without a full-size plane."""
        return self.__dict__["level"] if "level" in self.__dict__ else \
            SurfaceWindows(*_upsample_factors(self.level_grid, *self.shape))


class SurfaceWindows:
    """A separable surface ``rows @ cols`` ((ny, k) by (k, nx)) evaluated only where it is read: ``s[rows, cols]``
    with slices, an integer row slice, the open-mesh index of stamps (``imageops.stamp_index``) or any pair of
    integer index arrays; float32, as the full-size evaluation (``separable_product``) gives it."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, rows: np.ndarray, cols: np.ndarray):
        self.rows, self.cols = rows, np.asarray(cols)
        self.shape = (rows.shape[0], self.cols.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key, slice(None))
        iy, ix = key
        if isinstance(iy, (int, np.integer)) and isinstance(ix, (slice, int, np.integer)):
            return np.asarray(self.rows[iy] @ self.cols[:, ix], np.float32)
        if isinstance(iy, slice) and isinstance(ix, (slice, int, np.integer)):
            return separable_product(self.rows[iy], self.cols[:, ix])  # by blocks of rows, float32
        iy, ix = np.asarray(iy), np.asarray(ix)
        if iy.ndim == ix.ndim == 3 and iy.shape[2] == 1 and ix.shape[1] == 1:  # stamps: one product each
            return np.asarray(self.rows[iy[:, :, 0]] @ self.cols[:, ix[:, 0, :]].transpose(1, 0, 2), np.float32)
        iy, ix = np.broadcast_arrays(iy, ix)
        out = np.empty(iy.shape, np.float32)
        flat_y, flat_x, flat_out = iy.ravel(), ix.ravel(), out.reshape(-1)
        for start in range(0, flat_out.size, 65536):  # bounded (chunk, k) temporaries
            chunk = slice(start, start + 65536)
            flat_out[chunk] = np.einsum("ik,ki->i", self.rows[flat_y[chunk]], self.cols[:, flat_x[chunk]])
        return out


class _Truncation(dict):
    """Half-width of the 15.87-84.13 percentile interval of a unit Gaussian clipped at +-k."""

    def __missing__(self, k):
        from scipy.special import erf, ndtri

        value = 1.0 if not np.isfinite(k) else float(ndtri(0.5 + 0.3413447 * erf(k / np.sqrt(2)))) / 1.0
        self[k] = value
        return value


_TRUNCATION = _Truncation()


def _quantile(srt: np.ndarray, idx: np.ndarray, a: np.ndarray, width: np.ndarray, q: float) -> np.ndarray:
    """Linearly interpolated quantile q of each row's kept range srt[a : a + width]."""
    pos = a + q * np.maximum(width - 1, 0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(a + width - 1, 0))
    t = pos - lo
    return (1 - t) * srt[idx, lo] + t * srt[idx, hi]


def _bound(value: float, dtype: np.dtype, up: bool):
    """``value`` in ``dtype``, rounded up (or down) to the nearest representable number: a search of a float32
    array for it then counts exactly the elements below (or at most) the float64 value, without converting the
    whole array to float64 (a full copy of it)."""
    if not np.isfinite(value) or dtype == np.float64:
        return value
    out = dtype.type(value)
    if up and out < value:
        return np.nextafter(out, dtype.type(np.inf))
    if not up and out > value:
        return np.nextafter(out, dtype.type(-np.inf))
    return out


def clipped_stats(values: np.ndarray, nsigma: float = 3.0, iterations: int = 5,
                  axis: int | None = None, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Median and sigma after iterative sigma clipping; NaN entries are ignored.

    Works on sorted rows: each clipping round only moves the bounds [a, b) of the kept range,
    and sigma is the half-width of the kept range's 15.87-84.13 percentile interval (Gaussian).
    ``axis`` is None (all values) or -1/1 (one result per row of a 2-d array). ``overwrite``: ``values`` (a
    contiguous float array) may be sorted in place, no copy of it made.
    """
    v = np.asarray(values)
    v = v if v.dtype in (np.float32, np.float64) else v.astype(float)  # float32 sorts twice as fast, same order
    rows = v.reshape(1, -1) if axis is None else v.reshape(-1, v.shape[-1])
    if overwrite and np.shares_memory(rows, v) and rows.flags.writeable:
        rows.sort(axis=1)  # NaN sort last
        srt = rows
    else:
        srt = np.sort(rows, axis=1)
    n = np.sum(np.isfinite(srt), axis=1)
    idx = np.arange(len(srt))
    a = np.zeros(len(srt), int)
    b = n.copy()
    med = sig = np.full(len(srt), np.nan)
    for it in range(iterations + 1):
        width = b - a
        ok = width > 0
        take = np.where(ok, a + width // 2, 0)
        med = np.where(ok, srt[idx, take], np.nan)
        sig = np.where(ok, 0.5 * (_quantile(srt, idx, a, width, 0.8413) - _quantile(srt, idx, a, width, 0.1587)),
                       np.nan) / _TRUNCATION[nsigma if it else np.inf]
        if it == iterations:
            break
        lo = med - nsigma * sig
        hi = med + nsigma * sig
        a_new = np.array([np.searchsorted(r[:k], _bound(l, r.dtype, up=True), "left")
                          for r, k, l in zip(srt, n, lo)]) if len(srt) < 8 else np.sum(srt < lo[:, None], axis=1)
        b_new = np.array([np.searchsorted(r[:k], _bound(h, r.dtype, up=False), "right")
                          for r, k, h in zip(srt, n, hi)]) if len(srt) < 8 \
            else np.minimum(np.sum(srt <= hi[:, None], axis=1), n)
        if np.array_equal(a_new, a) and np.array_equal(b_new, b):
            break
        a, b = a_new, b_new
    if axis is None:
        return med[0], sig[0]
    return med, sig


#: Pixels an image's sky never uses: no data, known defects, and saturated cores (their bleed would lift it).
SKY_BAD_PLANES = ("NO_DATA", "BAD", "SAT")


#: The sky mesh's cell (pixels) unless a step asks for another.
SKY_MESH_PIX = 64


def _sky_key(mesh_pix: int = SKY_MESH_PIX) -> tuple:
    """The shared sky's key among an exposure's derived values."""
    return ("sky", SKY_BAD_PLANES, mesh_pix)


def sky_background(exposure, mesh_pix: int = SKY_MESH_PIX) -> Background:
    """The exposure's sky, estimated once per state of its pixels (``Exposure.derived``) and shared by every
    step that needs it: star finding, PSF measurement, repair, the subtraction's preparation. A finer
    ``mesh_pix`` (the sky under the PSF stars' stamps) is kept apart."""
    return exposure.derived(_sky_key(mesh_pix),
                            lambda: estimate_background(exposure.image, exposure.plane(*SKY_BAD_PLANES), mesh_pix))


def sky_subtracted(image: np.ndarray, background: Background, full_pass: bool = False) -> PlaneSum:
    """``image - background.level`` evaluated only on the windows read from it: stamp measurements on a
    sky-subtracted image without a full-size copy. A reader of windows never makes a released sky's full plane;
    one that reads every pixel (``full_pass``) makes it once and keeps it for the next."""
    return PlaneSum((image, 1.0), (background.level if full_pass else background.level_windows(), -1.0))


def keep_sky(exposure, background: Background) -> None:
    """Declare ``background`` still the exposure's sky after a change of a few pixels that its clipped mesh
    medians clipped anyway (cosmic rays replaced by their surroundings)."""
    exposure.keep_derived(_sky_key(), background)


def carry_sky(source, injected) -> None:
    """Give ``injected`` (a copy of ``source`` with fake sources added) the sky ``source`` already has: fakes are
    sources, not sky. As in LSST, where fakes go into an image whose background was subtracted before, they do
    not move the sky estimate of the image they test (and the shared sky is not estimated again per copy)."""
    sky = source.known(_sky_key())
    if sky is not None:
        keep_sky(injected, sky)


def estimate_background(image: np.ndarray, bad: np.ndarray | None = None, mesh_pix: int = SKY_MESH_PIX,
                        mask_sources_nsigma: float | None = 3.0) -> Background:
    """Mesh background: clipped median and sigma per box, 3x3 median-filtered, spline-upsampled.

    ``bad`` marks pixels never used. When ``mask_sources_nsigma`` is set, a first pass (on the
    blocky mesh values) finds pixels above that many sigma, grown by 2 px, and masks them for
    the second pass.
    """
    ny, nx = image.shape
    unusable = np.isfinite(image)
    np.logical_not(unusable, out=unusable)  # boolean planes made in place: this runs on every image, first
    if bad is not None:
        unusable |= bad
    bad = unusable
    level, rms, rows, cols = _mesh(image, bad, mesh_pix)
    if mask_sources_nsigma is not None:
        rx = np.bincount(cols)
        level_cols = np.repeat(level.astype(np.float32), rx, axis=1)  # one row of cells at full x resolution
        limit_cols = np.repeat((mask_sources_nsigma * rms).astype(np.float32), rx, axis=1)
        sources = np.empty(image.shape, bool)
        for j, (y0, y1) in enumerate(_runs(rows)):  # a row of mesh cells at a time: no full-size temporaries
            np.greater(image[y0:y1] - level_cols[j], limit_cols[j], out=sources[y0:y1])
        sources = grow_mask(sources, 2)
        sources |= bad
        if sources.size - np.count_nonzero(sources) > 0.2 * image.size:
            level, rms, rows, cols = _mesh(image, sources, mesh_pix)
    return Background(level, rms, (ny, nx))


def _mesh(image: np.ndarray, bad: np.ndarray, mesh_pix: int):
    """Mesh-cell level and sigma grids, and each pixel's cell row and column index."""
    ny, nx = image.shape
    by = max(1, int(round(ny / mesh_pix)))
    bx = max(1, int(round(nx / mesh_pix)))
    ey = np.linspace(0, ny, by + 1).astype(int)
    ex = np.linspace(0, nx, bx + 1).astype(int)
    level = np.full((by, bx), np.nan)
    rms = np.full((by, bx), np.nan)
    stride = max(1, (mesh_pix * mesh_pix) // 1024)  # ~1000 pixels per box are plenty for a median
    for j in range(by):  # a row of cells at a time: no full-size copy of the image
        cells = slice(ey[j], ey[j + 1])
        row = np.where(bad[cells], np.float32(np.nan), image[cells].astype(np.float32, copy=False))
        boxes = [row[:, ex[i] : ex[i + 1]].ravel()[::stride] for i in range(bx)]
        width = max(len(b) for b in boxes)
        stack = np.full((bx, width), np.nan, np.float32)  # float32 sorts twice as fast as float64
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
    rows = np.searchsorted(ey, np.arange(ny), side="right") - 1
    cols = np.searchsorted(ex, np.arange(nx), side="right") - 1
    return level, rms, rows, cols


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal values in a sorted index (the pixel rows of each mesh row)."""
    edges = np.flatnonzero(np.diff(index)) + 1
    return list(zip(np.r_[0, edges].tolist(), np.r_[edges, len(index)].tolist()))


def smooth_grid_factors(grid: np.ndarray, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) whose product is a coarse grid of box values (NaN where unmeasured) at full (ny, nx)
    resolution: gaps filled from the nearest measured box, then spline-interpolated. ``rows[y0:y1] @ cols`` is a
    block of the surface, so none needs a full-size buffer."""
    return _upsample_factors(_fill(grid), ny, nx)


def _fill(grid: np.ndarray) -> np.ndarray:
    """Replace NaN mesh cells by the nearest finite cell."""
    missing = ~np.isfinite(grid)
    if not missing.any():
        return grid
    idx = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    return grid[tuple(idx)]


def _upsample(grid: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Spline interpolation of mesh-cell values (at cell centres) to every pixel, separably."""
    return separable_product(*_upsample_factors(grid, ny, nx))


def _upsample_factors(grid: np.ndarray, ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) whose product is the spline through the mesh-cell values (at cell centres) at every pixel."""
    by, bx = grid.shape
    cy = (np.arange(by) + 0.5) * ny / by - 0.5
    cx = (np.arange(bx) + 0.5) * nx / bx - 0.5
    if by == 1 and bx == 1:
        return np.full((ny, 1), float(grid[0, 0])), np.ones((1, nx))
    if by == 1:
        return np.ones((ny, 1)), np.interp(np.arange(nx), cx, grid.ravel())[None, :]
    if bx == 1:
        return np.interp(np.arange(ny), cy, grid.ravel())[:, None], np.ones((1, nx))
    # a tensor-product spline on a pixel grid is two matrix products with the axes' B-spline design matrices (the
    # columns' dense: for a mesh of tens of cells a dense product is faster than a sparse one)
    spline = SplineGrid(grid_spline(cy, cx, grid), np.arange(nx))
    return spline.left(np.arange(ny)), spline.right.toarray()
