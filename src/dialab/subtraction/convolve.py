"""Convolution of images, variance and masks with a spatially varying kernel.

K(x, y) = sum_k T_k(x, y) K_k, so K * I = sum_k T_k (I * K_k): one forward FFT of the image and
one inverse per spatial term, never a per-pixel kernel loop.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import fft, ndimage

from .kernel_fit import SpatialKernel

#: Planes not spread by convolution: injected-source markers and detections describe positions, not defects.
NOT_SPREAD = ("INJECTED", "INJECTED_TEMPLATE", "DETECTED", "DETECTED_NEGATIVE")


def interpolate_masked(image: np.ndarray, masked: np.ndarray, sigma: float, fill: float = 0.0) -> np.ndarray:
    """A copy with masked pixels replaced by the Gaussian-weighted mean of the good pixels round them.

    Bad columns, saturated cores and cosmic rays must not be smeared by a convolution; pixels with
    no good neighbour within a few sigma (inside a NO_DATA strip) get ``fill``. Only boxes round the
    masked regions are filtered, so sparse defects stay cheap on large images.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    if not masked.any():
        return out
    pad = int(np.ceil(4 * sigma)) + 1
    labels, _ = ndimage.label(ndimage.binary_dilation(masked, iterations=pad))
    for sl in ndimage.find_objects(labels):
        sub_mask = masked[sl]
        good = (~sub_mask).astype(np.float32)
        weights = ndimage.gaussian_filter(good, sigma, mode="constant")
        values = ndimage.gaussian_filter(np.where(sub_mask, 0, out[sl]).astype(np.float32), sigma, mode="constant")
        with np.errstate(invalid="ignore", divide="ignore"):
            filled = np.where(weights > 1e-3, values / weights, fill)
        out[sl] = np.where(sub_mask, filled, out[sl])
    return out


def default_workers() -> int:
    return os.cpu_count() or 1


def fft_convolve_many(image: np.ndarray, kernels: np.ndarray, workers: int | None = None) -> np.ndarray:
    """'same'-size convolutions of ``image`` with each (odd, square) kernel; float32, zero padding."""
    ny, nx = image.shape
    if kernels.ndim == 2:
        kernels = kernels[None]
    size = kernels.shape[-1]
    h = size // 2
    shape = (fft.next_fast_len(ny + size - 1, real=True), fft.next_fast_len(nx + size - 1, real=True))
    workers = workers or default_workers()
    fi = fft.rfft2(image.astype(np.float32), s=shape, workers=workers)
    out = np.empty((len(kernels), ny, nx), dtype=np.float32)
    for k, ker in enumerate(kernels):
        fk = fft.rfft2(ker.astype(np.float32), s=shape, workers=workers)
        full = fft.irfft2(fi * fk, s=shape, workers=workers)
        out[k] = full[h : h + ny, h : h + nx]
    return out


def convolve_image(image: np.ndarray, kernel: SpatialKernel, workers: int | None = None) -> np.ndarray:
    """K(x, y) * image for the spatially varying kernel."""
    parts = fft_convolve_many(image, kernel.term_images(), workers)
    out = np.zeros(image.shape, dtype=np.float32)
    for part, (row, col) in zip(parts, kernel.spatial.factors(image.shape)):
        out += part * row[:, None] * col[None, :]
    return out


def convolve_variance(variance: np.ndarray, kernel: SpatialKernel, workers: int | None = None) -> np.ndarray:
    """variance * K^2, with K taken at the image centre (the kernel varies by a few percent at most)."""
    k2 = kernel.center_image**2
    return fft_convolve_many(variance, k2[None], workers)[0]


def kernel_footprint_radius(kernel_image: np.ndarray, fraction: float = 1e-3) -> int:
    """Half-width of the box holding every kernel pixel above ``fraction`` of the peak |K|."""
    h = kernel_image.shape[0] // 2
    yy, xx = np.nonzero(np.abs(kernel_image) > fraction * np.abs(kernel_image).max())
    return int(max(np.abs(yy - h).max(), np.abs(xx - h).max())) if len(yy) else 0


def convolve_mask(mask: np.ndarray, bits: dict[str, int], radius: int) -> np.ndarray:
    """Spread every defect plane over the kernel footprint (a (2r+1)^2 box); markers stay put."""
    out = mask.copy()
    if radius <= 0:
        return out
    for name, bit in bits.items():
        if name in NOT_SPREAD:
            continue
        plane = (mask & (1 << bit)) != 0
        if plane.any():
            grown = ndimage.maximum_filter(plane.view(np.uint8), size=2 * radius + 1, mode="constant") > 0
            out[grown] |= np.int32(1 << bit)
    return out
