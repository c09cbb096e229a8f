"""Image primitives shared by every stage: filters, peaks, FFT convolution, masked interpolation, windows.

A leaf module: it imports nothing from dialab, so every other module may use it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage


def gaussian_filtered_snr(image: np.ndarray, variance: np.ndarray | float, sigma_pix: float,
                          bad: np.ndarray | None = None) -> np.ndarray:
    """S/N of a Gaussian matched filter: (image * g) / sqrt(variance * g^2).

    The filter is normalised so that for a point source of the filter's shape this is the
    optimal (PSF-fit) S/N. ``bad`` pixels count as zero. ``image`` may be anything that gives its rows as
    ``image[y0:y1]`` (a ``PlaneSum``): it is filtered a band of rows at a time (with the filter's reach of rows
    round each, the same sums as one full-image pass), so the only full-size buffer is the result.
    """
    ny, nx = image.shape
    reach = int(4.0 * sigma_pix + 0.5)  # ndimage's kernel radius at truncate=4
    smoothed = np.empty((ny, nx), np.float32)
    for y0 in range(0, ny, 2 * ROW_BLOCK):
        lo, hi = max(0, y0 - reach), min(ny, y0 + 2 * ROW_BLOCK + reach)
        data = np.asarray(image[lo:hi], np.float32)
        if bad is not None:
            data = np.where(bad[lo:hi], np.float32(0), data)
        band = ndimage.gaussian_filter(data, sigma_pix, mode="constant", truncate=4.0)
        smoothed[y0 : y0 + 2 * ROW_BLOCK] = band[y0 - lo : y0 - lo + 2 * ROW_BLOCK]
    g2_scale = 1.0 / (4.0 * np.pi * sigma_pix**2)
    var = np.asarray(variance, dtype=np.float32)
    if var.ndim == 0:
        return smoothed / np.sqrt(var * np.float32(g2_scale))
    # Convolving the variance with g^2 (a Gaussian of sigma/sqrt(2), scaled) gives the filtered variance.
    # It is smooth on the filter's scale, so it is computed on 4x4 blocks (edge-padded to whole blocks).
    b = 4
    if min(ny, nx) < 64:
        filt_var = ndimage.gaussian_filter(var, sigma_pix / np.sqrt(2.0), mode="nearest", truncate=3.0)
        return smoothed / np.sqrt(np.maximum(filt_var * g2_scale, 1e-30))
    py, px = -ny % b, -nx % b
    var = np.pad(var, ((0, py), (0, px)), mode="edge") if py or px else var
    coarse = block_sum(var, b) / np.float32(b * b)
    coarse = ndimage.gaussian_filter(coarse, sigma_pix / np.sqrt(2.0) / b, mode="nearest", truncate=3.0)
    inverse = (1.0 / np.sqrt(np.maximum(coarse * g2_scale, 1e-30))).astype(np.float32)
    if py or px:
        return smoothed * np.repeat(np.repeat(inverse, b, axis=0), b, axis=1)[:ny, :nx]
    smoothed.reshape(ny // b, b, nx // b, b)[...] *= inverse[:, None, :, None]  # no full-size copy of the noise
    return smoothed


def block_sum(image: np.ndarray, b: int) -> np.ndarray:
    """Sums over b x b blocks of an image whose sides are multiples of b: strided adds, about ten times faster
    than a reduction over the axes of a (ny/b, b, nx/b, b) view."""
    rows = image[0::b].copy()
    for k in range(1, b):
        rows += image[k::b]
    out = rows[:, 0::b].copy()
    for k in range(1, b):
        out += rows[:, k::b]
    return out


def find_peaks(snr: np.ndarray, threshold: float, min_separation_pix: int = 2,
               exclude: np.ndarray | None = None, border_pix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) integer positions of local maxima of ``snr`` above ``threshold``, highest first.

    Only pixels above the threshold are examined, each against its (2s+1)^2 neighbourhood.
    """
    s = int(min_separation_pix)
    ny, nx = snr.shape
    y, x = np.nonzero(snr > threshold)
    if exclude is not None and len(y):
        keep = ~exclude[y, x]
        y, x = y[keep], x[keep]
    if border_pix > 0 and len(y):
        keep = (y >= border_pix) & (y < ny - border_pix) & (x >= border_pix) & (x < nx - border_pix)
        y, x = y[keep], x[keep]
    if len(y) > 0.05 * snr.size:  # dense: a box filter is cheaper, a band of rows at a time (no full-size copies)
        keep = np.empty(len(y), bool)
        for y0 in range(0, ny, ROW_BLOCK):  # y is ascending (row-major order)
            sel = slice(*np.searchsorted(y, [y0, y0 + ROW_BLOCK]))
            lo = max(0, y0 - s)
            band_max = box_reduce(snr[lo : y0 + ROW_BLOCK + s], s, np.maximum)
            keep[sel] = snr[y[sel], x[sel]] == band_max[y[sel] - lo, x[sel]]
    else:
        v = snr[y, x]
        keep = np.ones(len(y), bool)
        for dy in range(-s, s + 1):
            for dx in range(-s, s + 1):
                if dy or dx:
                    keep &= v >= snr[np.clip(y + dy, 0, ny - 1), np.clip(x + dx, 0, nx - 1)]
    y, x = y[keep], x[keep]
    y, x = _one_per_plateau(snr, y, x, s)
    order = np.argsort(-snr[y, x], kind="stable")
    return y[order], x[order]


def _one_per_plateau(snr: np.ndarray, y: np.ndarray, x: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Of maxima (y, x in raster order) with an equal maximum earlier in raster order within s pixels, only that one:
    two pixels of one source with the same value are one peak, not two (a star's stamp counted twice)."""
    ny, nx = snr.shape
    linear = y * nx + x  # ascending
    v = snr[y, x]
    repeat = np.zeros(len(y), bool)
    for dy in range(-s, 1):
        for dx in range(-s, s + 1 if dy else 0):
            inside = (x + dx >= 0) & (x + dx < nx) & (y + dy >= 0)
            at = np.minimum(np.searchsorted(linear, linear + dy * nx + dx), len(linear) - 1)
            repeat |= inside & (linear[at] == linear + dy * nx + dx) & (v[at] == v)
    return y[~repeat], x[~repeat]


def grow_mask(mask: np.ndarray, radius: float, shape: str = "box") -> np.ndarray:
    """The one way dialab grows a boolean mask: by a (2r + 1)^2 box or by a disk of radius r.

    A box is separable: shifted ORs along each axis, several times faster than a generic maximum
    filter on large images. A disk is dilated object by object inside padded bounding boxes, so a
    sparse mask (a few footprints or cosmic rays on a large image) stays cheap.
    """
    if shape == "box":
        return _grow_box(mask, int(radius))
    if shape != "disk":
        raise ValueError(f"grow_mask: shape must be 'box' or 'disk', not {shape!r}")
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    structure = xx * xx + yy * yy <= radius * radius + 1e-9
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0 or r == 0:
        return mask.copy()
    if mask.mean() > 0.05:
        return ndimage.binary_dilation(mask, structure=structure)
    ny, nx = mask.shape
    out = np.zeros_like(mask)
    for sl in ndimage.find_objects(labels):
        y0, y1 = max(sl[0].start - r, 0), min(sl[0].stop + r, ny)
        x0, x1 = max(sl[1].start - r, 0), min(sl[1].stop + r, nx)
        out[y0:y1, x0:x1] |= ndimage.binary_dilation(mask[y0:y1, x0:x1], structure=structure)
    return out


def _grow_box(mask: np.ndarray, r: int) -> np.ndarray:
    return box_reduce(np.asarray(mask, dtype=bool), r, np.logical_or)


def box_reduce(values: np.ndarray, r: int, combine=np.maximum) -> np.ndarray:
    """``combine`` (a binary ufunc: maximum, minimum, logical_or) over the (2r + 1)^2 box round each pixel,
    clipped at the borders: separable shifted passes, several times faster than ndimage's generic filters."""
    out = np.asarray(values)
    for axis in (0, 1):
        src, out = out, np.empty_like(out)  # each pass reads the last one's result (or the input) unchanged
        part = functools.partial(_along, axis)
        reach = min(r, out.shape[axis] - 1)
        if reach < 1:
            out[...] = src
            continue
        # the first shift writes straight into the pass's result: no copy of its input first
        combine(src[part(1, None)], src[part(None, -1)], out=out[part(1, None)])
        out[part(0, 1)] = src[part(0, 1)]
        combine(out[part(None, -1)], src[part(1, None)], out=out[part(None, -1)])
        for k in range(2, reach + 1):
            combine(out[part(k, None)], src[part(None, -k)], out=out[part(k, None)])
            combine(out[part(None, -k)], src[part(k, None)], out=out[part(None, -k)])
    return out


def _along(axis: int, start: int | None, stop: int | None) -> tuple[slice, slice]:
    """The index of rows (axis 0) or columns (axis 1) start:stop of a 2-d array."""
    return (slice(start, stop), slice(None)) if axis == 0 else (slice(None), slice(start, stop))


def default_workers() -> int:
    return os.cpu_count() or 1


#: Rows of a real image produced per inverse transform: a block's buffers are small next to a full-size image.
ROW_BLOCK = 256


def inverse_rows(spectrum: np.ndarray, n: int, rows: slice, cols: slice, workers: int):
    """(start, stop, block) for the real image rows ``rows`` (and columns ``cols``) of the inverse rfft of
    ``spectrum``, whose column (axis 0) transform is already inverted, a block of rows at a time: the full-size
    real result is never held, so a caller writing or summing the blocks keeps its own buffer and nothing more."""
    for start in range(rows.start, rows.stop, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, rows.stop)
        yield start - rows.start, stop - rows.start, fft.irfft(spectrum[start:stop], n=n, axis=1, workers=workers)[:, cols]


#: Output rows per band of a banded FFT convolution (at least four kernel sizes, so the overlap stays small).
CONVOLUTION_BAND = 512


def fft_convolve_sum(image: np.ndarray, kernels, factors=None, workers: int | None = None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """sum_k rows_k[:, None] cols_k[None, :] (image * K_k): 'same'-size convolutions of ``image`` with each (odd,
    square, equal-sized) kernel, each weighted by the outer product of its ``factors`` (row, column) vectors
    (no weights when None); float32, zero padding. ``image`` may be anything that gives its rows as
    ``image[y0:y1]`` (a ``PlaneSum``).

    Overlap-save by bands of rows: each band of output rows is the linear convolution of the input rows it
    reaches (the band and the kernel's half-width either side), transformed with a padding that keeps the
    circular wrap off those rows. No full-size transform is held (a band's is about 1/5 of the image's), the
    shorter column transforms stay in cache, and the kernels' spectra are made once at the band's size: a
    quarter faster than one full-image transform of an 8 Mpix image, and the same sums to float rounding.

    Into ``out`` (float32, the image's shape) when given; it may be the image itself: the input rows a band's
    halo still needs are kept aside before the band is written over them."""
    ny, nx = image.shape
    kernels = np.asarray(kernels, np.float32)
    size = kernels.shape[-1]
    h = size // 2
    rows = min(max(CONVOLUTION_BAND, 4 * size), ny)
    # a band reads up to rows + 2h input rows; with rows + size - 1 transform rows the circular wrap lands only on
    # the result rows before the kept ones
    shape = (fft.next_fast_len(rows + size - 1, real=True), fft.next_fast_len(nx + size - 1, real=True))
    workers = workers or default_workers()
    spectra = [fft.rfft2(kernel, shape, workers=workers) for kernel in kernels]
    in_place = out is not None and isinstance(image, np.ndarray) and np.shares_memory(out, image)
    out = np.empty((ny, nx), np.float32) if out is None else out
    above = None  # in place: the input rows just above the band, as they were before the last band replaced them
    for y0 in range(0, ny, rows):
        y1 = min(y0 + rows, ny)
        lo = max(0, y0 - h)
        rows_in = np.asarray(image[y0 if above is not None else lo : min(ny, y1 + h)], np.float32)
        if above is not None:
            rows_in = np.concatenate([above, rows_in])
        band = fft.rfft2(rows_in, shape, workers=workers)
        if in_place:
            above = image[max(0, y1 - h) : y1].astype(np.float32) if h else None
        for k, spectrum in enumerate(spectra):
            block = fft.irfft2(band * spectrum, shape, workers=workers)[y0 - lo + h : y1 - lo + h, h : h + nx]
            if factors is not None:
                row, col = factors[k]
                block *= row[y0:y1, None]
                block *= col[None, :]
            if k:
                out[y0:y1] += block
            else:
                out[y0:y1] = block
    return out


class PlaneSum:
    """sum_k w_k P_k of full-size planes, evaluated only on the windows read from it (``planes[rows, cols]``, any
    numpy index): a variance scaled to the measured noise, or the sum of two, costs no full-size buffer of its
    own while the subtraction reads stamps and row blocks of it. ``np.asarray`` (or ``full``) gives the whole
    plane, a block of rows at a time. A term's plane may itself be a PlaneSum."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, *terms: tuple[np.ndarray, float]):
        self.terms = terms
        self.shape = terms[0][0].shape

    def __getitem__(self, key) -> np.ndarray:
        out = None
        for plane, weight in self.terms:
            part = plane[key] * np.float32(weight)
            if out is None:
                out = np.asarray(part, np.float32)
            else:
                out += part
        return out

    def full(self) -> np.ndarray:
        out = np.empty(self.shape, np.float32)
        for start in range(0, self.shape[0], ROW_BLOCK):
            out[start : start + ROW_BLOCK] = self[start : start + ROW_BLOCK]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.full() if dtype is None else self.full().astype(dtype)


def padded_rfft2(image: np.ndarray, shape: tuple[int, int], workers: int) -> np.ndarray:
    """``rfft2(image, s=shape)`` (complex64) with no zero-padded real copy: the rows are transformed a block at a
    time into the complex result, the all-zero padding rows not at all (a small kernel's transform costs about
    half a full-size one), then the columns in place."""
    out = np.zeros((shape[0], shape[1] // 2 + 1), np.complex64)
    for start in range(0, image.shape[0], ROW_BLOCK):
        rows = image[start : start + ROW_BLOCK].astype(np.float32, copy=False)
        out[start : start + len(rows)] = fft.rfft(rows, n=shape[1], axis=1, workers=workers)
    return fft.fft(out, axis=0, workers=workers, overwrite_x=True)


def fft_convolve(image: np.ndarray, kernel: np.ndarray, workers: int | None = None) -> np.ndarray:
    """'same'-size convolution of ``image`` with one (odd, square) kernel; float32, zero padding."""
    return fft_convolve_sum(image, kernel[None], workers=workers)


def convolve_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The full linear convolution of two small 2-d arrays (stamps, kernels), float64."""
    shape = (a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1)
    padded = tuple(fft.next_fast_len(n, real=True) for n in shape)
    out = fft.irfft2(fft.rfft2(a, padded) * fft.rfft2(b, padded), padded)
    return out[: shape[0], : shape[1]]


def correlate_valid(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The 'valid' correlation sum_ij a[p + i, q + j] w[i, j] of two small 2-d arrays (float64), by FFT: a
    circular correlation over a's own extent never wraps for the valid lags, and costs a few small transforms
    where a direct sum costs size^2 x lags^2."""
    out_shape = (a.shape[0] - w.shape[0] + 1, a.shape[1] - w.shape[1] + 1)
    padded = tuple(fft.next_fast_len(n, real=True) for n in a.shape)
    full = fft.irfft2(fft.rfft2(a, padded) * np.conj(fft.rfft2(w, padded)), padded)
    return full[: out_shape[0], : out_shape[1]]


def matched_filter_snr(image: np.ndarray, variance: np.ndarray, psf_stamp: np.ndarray,
                       workers: int | None = None) -> np.ndarray:
    """(D * P') / sqrt(V * P'^2) with P' the reflected PSF: the S/N of a PSF fit at every pixel."""
    p = psf_stamp[::-1, ::-1].astype(np.float32)
    num = fft_convolve(image, p, workers)
    var = fft_convolve(variance, p * p, workers)
    np.maximum(var, np.float32(1e-30), out=var)  # in place: no full-size temporaries
    return np.divide(num, np.sqrt(var, out=var), out=num)


def interpolate_masked(image: np.ndarray, masked: np.ndarray, sigma: float, fill: float = 0.0,
                       only: np.ndarray | None = None) -> np.ndarray:
    """A copy with masked pixels replaced by the Gaussian-weighted mean of the good pixels round them.

    Bad columns, saturated cores and cosmic rays must not be smeared by a convolution; pixels with
    no good neighbour within a few sigma (inside a NO_DATA strip) get ``fill``. Only boxes round the
    masked regions are filtered, so sparse defects stay cheap on large images. With ``only`` (a subset of
    ``masked``), just those pixels are replaced: the boxes go round them, the rest of ``masked`` still giving
    no weight (cosmic rays next to a bad column are filled from good pixels alone).
    """
    out = np.array(image, dtype=np.float32, copy=True)
    if not masked.any() or (only is not None and not only.any()):
        return out
    pad = int(np.ceil(4 * sigma)) + 1  # the filter's reach (4 sigma): each box holds all it reads
    labels, _ = ndimage.label(grow_mask(masked if only is None else only, pad))
    for sl in ndimage.find_objects(labels):
        sub_mask = masked[sl]
        good = (~sub_mask).astype(np.float32)
        weights = ndimage.gaussian_filter(good, sigma, mode="constant")
        values = ndimage.gaussian_filter(np.where(sub_mask, 0, out[sl]).astype(np.float32), sigma, mode="constant")
        with np.errstate(invalid="ignore", divide="ignore"):
            filled = np.where(weights > 1e-3, values / weights, fill)
        out[sl] = np.where(sub_mask if only is None else only[sl], filled, out[sl])
    return out


def window_any(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, half: int) -> np.ndarray:
    """For each integer (x, y): any ``mask`` pixel in the (2 half + 1)^2 window round it (clipped at
    the borders). A few hundred windows cost far less than dilating the whole mask."""
    ny, nx = mask.shape
    out = np.zeros(len(xs), bool)
    if not mask.any():
        return out
    for i, (x, y) in enumerate(zip(np.asarray(xs, int), np.asarray(ys, int))):
        out[i] = mask[max(y - half, 0) : y + half + 1, max(x - half, 0) : x + half + 1].any()
    return out


def stamp_index(ix: np.ndarray, iy: np.ndarray, h: int, shape: tuple[int, int]) -> tuple[tuple, np.ndarray]:
    """Index of the (2h + 1)^2 windows centred on integer pixels (ix, iy), for ``image[index]`` of shape
    (n, 2h + 1, 2h + 1), clipped to the image; and where each window pixel lies on it. A fancy index takes
    every window at once, with no padded copy of the image."""
    offsets = np.arange(-h, h + 1)
    rows, cols = np.asarray(iy)[:, None] + offsets, np.asarray(ix)[:, None] + offsets
    inside = ((rows >= 0) & (rows < shape[0]))[:, :, None] & ((cols >= 0) & (cols < shape[1]))[:, None, :]
    return (np.clip(rows, 0, shape[0] - 1)[:, :, None], np.clip(cols, 0, shape[1] - 1)[:, None, :]), inside


def cut_stamps(image: np.ndarray, xs, ys, size: int) -> np.ndarray:
    """Array (n, size, size) of float32 stamps centred on the rounded (x, y) (clipped to the image), NaN
    beyond its border: every stamp has the same shape whatever its distance to the edge."""
    ix = np.clip(np.rint(np.asarray(xs, float)).astype(int), 0, image.shape[1] - 1)
    iy = np.clip(np.rint(np.asarray(ys, float)).astype(int), 0, image.shape[0] - 1)
    at, inside = stamp_index(ix, iy, size // 2, image.shape)
    return np.where(inside, image[at].astype(np.float32), np.float32(np.nan)).reshape(-1, size, size)


@dataclass(frozen=True)
class Chebyshev2D:
    """Products T_i(x') T_j(y') with i + j <= order, x' and y' scaled to [-1, 1] over the image."""

    order: int
    width: int
    height: int

    @property
    def n_terms(self) -> int:
        return (self.order + 1) * (self.order + 2) // 2

    def powers(self) -> list[tuple[int, int]]:
        return [(i, t - i) for t in range(self.order + 1) for i in range(t, -1, -1)]

    def _polys(self, u: np.ndarray) -> list[np.ndarray]:
        """T_0 .. T_order of u (already scaled to [-1, 1])."""
        t = [np.ones_like(u), u]
        for _ in range(2, self.order + 1):
            t.append(2 * u * t[-1] - t[-2])
        return t

    def _scaled(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        xs = 2.0 * np.asarray(x, dtype=float) / max(self.width - 1, 1) - 1.0
        ys = 2.0 * np.asarray(y, dtype=float) / max(self.height - 1, 1) - 1.0
        return xs, ys

    def terms(self, x, y) -> np.ndarray:
        """Array (n_terms, *shape(x)) of the basis evaluated at pixel coordinates."""
        xs, ys = self._scaled(x, y)
        tx, ty = self._polys(xs), self._polys(ys)
        return np.array([tx[i] * ty[j] for i, j in self.powers()])

    def factors(self, shape: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per term, the (row, column) vectors whose outer product is T_k over a full (ny, nx) grid."""
        ny, nx = shape
        xs, ys = self._scaled(np.arange(nx), np.arange(ny))
        tx, ty = self._polys(xs), self._polys(ys)
        return [(ty[j].astype(np.float32), tx[i].astype(np.float32)) for i, j in self.powers()]

    def evaluate(self, coeffs: np.ndarray, shape: tuple[int, int], add_to: np.ndarray | None = None) -> np.ndarray:
        """Image of sum_k coeffs[k] T_k over a full (ny, nx) grid: T_y C T_x, one matrix product (added to
        ``add_to`` in place when given)."""
        ny, nx = shape
        xs, ys = self._scaled(np.arange(nx), np.arange(ny))
        middle = np.zeros((self.order + 1, self.order + 1))
        for c, (i, j) in zip(coeffs, self.powers()):
            middle[j, i] = c
        k = self.order + 1
        return separable_product(np.array(self._polys(ys)[:k]).T @ middle, np.array(self._polys(xs)[:k]),
                                 add_to=add_to)


def grid_spline(ys: np.ndarray, xs: np.ndarray, values: np.ndarray):
    """The interpolating spline of ``values`` (rows, columns) on the grid (``ys``, ``xs``): cubic along each axis
    that has the points for it, lower along one that has fewer. It is called as f(y, x): scipy's first axis (its
    "x", with degree kx) is the rows, so the degrees are given row axis first."""
    from scipy.interpolate import RectBivariateSpline

    return RectBivariateSpline(ys, xs, values, kx=min(3, len(ys) - 1), ky=min(3, len(xs) - 1))


class SplineGrid:
    """A tensor-product spline (from :func:`grid_spline`) on the columns ``xs`` and any rows: B_y C B_x^T with the
    axes' sparse B-spline design matrices (degree + 1 non-zeros per row), coordinates held to the spline's data
    range. ``right`` (B_x^T) is made once, so a block of rows, ``left(ys) @ right``, costs a few multiply-adds per
    pixel and no full-size intermediate (FITPACK's grid evaluation costs four times as many)."""

    def __init__(self, spline, xs: np.ndarray):
        from scipy.interpolate import BSpline

        self._design = BSpline.design_matrix
        (self.ky, kx), (self.ty, tx) = spline.degrees, spline.get_knots()
        self.coeffs = spline.get_coeffs().reshape(len(self.ty) - self.ky - 1, len(tx) - kx - 1)
        xs = np.clip(np.asarray(xs, float), tx[kx], tx[-kx - 1])
        self.right = self._design(xs, tx, kx).T.tocsr()

    def left(self, ys: np.ndarray) -> np.ndarray:
        ys = np.clip(np.asarray(ys, float), self.ty[self.ky], self.ty[-self.ky - 1])
        return np.asarray(self._design(ys, self.ty, self.ky) @ self.coeffs)

    def rows(self, ys: np.ndarray) -> np.ndarray:
        """The spline at every (y, x) of ``ys`` x the columns (float64)."""
        return np.asarray(self.left(ys) @ self.right)


def separable_product(rows: np.ndarray, cols: np.ndarray, block: int = 512,
                      add_to: np.ndarray | None = None) -> np.ndarray:
    """The float32 image ``rows @ cols`` ((ny, k) by (k, nx); ``cols`` may be sparse): a smooth surface of few
    terms, such as a polynomial or a tensor-product spline, made by blocks of rows with no full-size float64
    intermediate. With ``add_to`` (float32) it is added to that image in place: no full-size buffer at all."""
    out = np.empty((rows.shape[0], cols.shape[1]), np.float32) if add_to is None else add_to
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block] @ cols
        if add_to is None:
            out[start : start + block] = part
        else:
            out[start : start + block] += np.asarray(part, np.float32)
    return out


def aperture_sum(image: np.ndarray, variance: np.ndarray, x: float, y: float, radius: float) -> tuple[float, float]:
    """Sum of the pixels whose centres lie within ``radius`` of (x, y) (clipped at the borders), and its error
    from the variance plane."""
    ny, nx = image.shape
    r = int(np.ceil(radius))
    ix, iy = int(round(x)), int(round(y))
    y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, ny), max(ix - r, 0), min(ix + r + 1, nx)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
    return float(image[y0:y1, x0:x1][inside].sum()), float(np.sqrt(variance[y0:y1, x0:x1][inside].sum()))
