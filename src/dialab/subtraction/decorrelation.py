"""Noise decorrelation of A&L differences (Reiss & Lupton, DMTN-021).

Convolving one input with K correlates its noise; the filter
phi(f) = sqrt((s1^2 + s2^2 k_s^2) / (s1^2 + s2^2 |K(f)|^2))
whitens the difference back to variance s1^2 + s2^2 k_s^2. For the preconvolution score
S = v*N - K*R the filter is phi_S(f) = sqrt((s1^2 + s2^2 k_s^2) |v(f)|^2 / (s1^2 |v(f)|^2 + s2^2 |K(f)|^2)),
which leaves S with the noise of v * (white noise); the score filter is sometimes written without the square root,
but the noise power spectrum, not its amplitude, is what adds.
"""

from __future__ import annotations

import numpy as np
from scipy import fft

from ..imageops import ROW_BLOCK, fft_convolve_sum, inverse_rows, padded_rfft2
from .convolve import default_workers


def centered_ft(stamp: np.ndarray, shape: tuple[int, int], rows: slice = slice(None)) -> np.ndarray:
    """The rows ``rows`` of the rfft, on a ``shape`` grid, of an odd stamp placed with its centre at the origin.

    A small stamp's transform is two small matrix products with the Fourier factors of its offsets, E_y S E_x,
    so any block of rows comes without a full-size grid (and in double precision)."""
    h = stamp.shape[0] // 2
    offsets = np.arange(-h, h + 1)
    u = np.arange(shape[0])[rows]
    v = np.arange(shape[1] // 2 + 1)
    ey = np.exp(-2j * np.pi * np.outer(u, offsets) / shape[0])
    ex = np.exp(-2j * np.pi * np.outer(offsets, v) / shape[1])
    return (ey @ stamp.astype(np.float64)) @ ex


def decorrelation_filter(kernel: np.ndarray, s1sq: float, s2sq: float, shape: tuple[int, int],
                         score_psf: np.ndarray | None = None, rows: slice = slice(None)) -> np.ndarray:
    """phi (or phi_S when ``score_psf`` v is given) on the rows ``rows`` of the rfft grid of ``shape``."""
    kf = centered_ft(kernel, shape, rows)
    ks = float(kernel.sum())
    k2 = kf.real**2 + kf.imag**2
    total = s1sq + s2sq * ks**2
    if score_psf is None:
        return np.sqrt(total / (s1sq + s2sq * k2))
    vf = centered_ft(score_psf, shape, rows)
    v2 = vf.real**2 + vf.imag**2
    denom = s1sq * v2 + s2sq * k2
    tiny = 1e-12 * total
    return np.sqrt(total * v2 / np.maximum(denom, tiny))


#: Most of phi's power its real-space stamp (twice the kernel's size) may leave out for the filter to be applied as
#: that stamp; an Alard-Lupton difference's phi leaves 1e-15 to 1e-12 (its tail 1e-8 of its peak), while
#: preconvolution's phi_S, which divides by the score PSF's spectrum, reaches far beyond and is applied on the grid.
FILTER_TAIL = 1e-10


def filter_kernel(kernel: np.ndarray, s1sq: float, s2sq: float) -> np.ndarray | None:
    """phi in real space on a box twice the kernel's size, or None when more than ``FILTER_TAIL`` of its power lies
    beyond (computed on a grid twice as large again, whose wrap-around is far below that)."""
    n = kernel.shape[0]
    m = 4 * n + 1
    real = np.fft.fftshift(fft.irfft2(decorrelation_filter(kernel, s1sq, s2sq, (m, m)), s=(m, m)))
    c = m // 2
    box = real[c - n : c + n + 1, c - n : c + n + 1]
    power = float(np.sum(real**2))
    return box if power > 0 and 1.0 - float(np.sum(box**2)) / power <= FILTER_TAIL else None


def apply_filter(image: np.ndarray, kernel: np.ndarray, s1sq: float, s2sq: float,
                 score_psf: np.ndarray | None = None, workers: int | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Filter ``image`` with phi (or phi_S), with zero padding; into ``out`` (float32, the image's shape; it may be
    the image itself) when given. A compact phi (``filter_kernel``) is convolved by bands of rows, as the kernel
    is: no full-size transform. Otherwise the image is zero-padded by the kernel size to avoid wrap-around, the
    filter made and applied a block of rows at a time and the result inverted a block at a time: the image's
    transform is then the one full-size temporary."""
    workers = workers or default_workers()
    compact = filter_kernel(kernel, s1sq, s2sq) if score_psf is None else None
    if compact is not None:
        return fft_convolve_sum(image, compact[None], workers=workers, out=out)
    ny, nx = image.shape
    pad = kernel.shape[0] + (0 if score_psf is None else score_psf.shape[0])
    shape = (fft.next_fast_len(ny + pad, real=True), fft.next_fast_len(nx + pad, real=True))
    fi = padded_rfft2(image, shape, workers)
    for start in range(0, shape[0], ROW_BLOCK):
        rows = slice(start, min(start + ROW_BLOCK, shape[0]))
        fi[rows] *= decorrelation_filter(kernel, s1sq, s2sq, shape, score_psf, rows).astype(np.float32)
    fi = fft.ifft(fi, axis=0, workers=workers, overwrite_x=True)
    out = np.empty((ny, nx), np.float32) if out is None else out
    for start, stop, block in inverse_rows(fi, shape[1], slice(0, ny), slice(0, nx), workers):
        out[start:stop] = block
    return out


def filter_stamp(stamp: np.ndarray, kernel: np.ndarray, s1sq: float, s2sq: float,
                 score_psf: np.ndarray | None = None) -> np.ndarray:
    """The same filter applied to a PSF stamp (its output keeps the stamp's size and sum)."""
    n = stamp.shape[0]
    m = n + 2 * kernel.shape[0]
    m += 1 - m % 2
    pad = (m - n) // 2
    big = np.pad(stamp, pad)
    phi = decorrelation_filter(kernel, s1sq, s2sq, (m, m), score_psf)
    out = np.roll(fft.irfft2(centered_ft(big, (m, m)) * phi, s=(m, m)), (m // 2, m // 2), axis=(0, 1))
    return out[pad : pad + n, pad : pad + n]
