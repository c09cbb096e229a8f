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

from .convolve import default_workers


def _centered_ft(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rFFT of an odd stamp placed with its centre at the origin of a ``shape`` grid."""
    h = stamp.shape[0] // 2
    grid = np.zeros(shape, dtype=np.float32 if shape[0] * shape[1] > 1_000_000 else np.float64)
    # wrap the stamp round the origin (its centre at [0, 0]) without rolling the whole grid
    idx = np.arange(-h, h + 1) % np.array(shape)[:, None]
    grid[np.ix_(idx[0], idx[1])] = stamp
    return fft.rfft2(grid)


def decorrelation_filter(kernel: np.ndarray, s1sq: float, s2sq: float, shape: tuple[int, int],
                         score_psf: np.ndarray | None = None) -> np.ndarray:
    """phi (or phi_S when ``score_psf`` v is given) on the rfft grid of ``shape``."""
    kf = _centered_ft(kernel, shape)
    ks = float(kernel.sum())
    k2 = kf.real**2 + kf.imag**2
    total = s1sq + s2sq * ks**2
    if score_psf is None:
        return np.sqrt(total / (s1sq + s2sq * k2))
    vf = _centered_ft(score_psf, shape)
    v2 = vf.real**2 + vf.imag**2
    denom = s1sq * v2 + s2sq * k2
    tiny = 1e-12 * total
    return np.sqrt(total * v2 / np.maximum(denom, tiny))


def apply_filter(image: np.ndarray, kernel: np.ndarray, s1sq: float, s2sq: float,
                 score_psf: np.ndarray | None = None, workers: int | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Filter ``image`` with phi (or phi_S), zero-padded by the kernel size to avoid wrap-around; into ``out``
    (float32, the image's shape; it may be the image itself) when given."""
    ny, nx = image.shape
    pad = kernel.shape[0] + (0 if score_psf is None else score_psf.shape[0])
    shape = (fft.next_fast_len(ny + pad, real=True), fft.next_fast_len(nx + pad, real=True))
    phi = decorrelation_filter(kernel, s1sq, s2sq, shape, score_psf)
    workers = workers or default_workers()
    fi = fft.rfft2(image.astype(np.float32, copy=False), s=shape, workers=workers)
    fi *= phi.astype(np.float32, copy=False)  # in place: a full-size complex buffer fewer at the run's peak
    del phi
    filtered = fft.irfft2(fi, s=shape, workers=workers, overwrite_x=True)[:ny, :nx]
    if out is None:
        return np.ascontiguousarray(filtered, dtype=np.float32)
    out[...] = filtered
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
    out = np.roll(fft.irfft2(_centered_ft(big, (m, m)) * phi, s=(m, m)), (m // 2, m // 2), axis=(0, 1))
    return out[pad : pad + n, pad : pad + n]
