"""Convolution of images, variance and masks with a spatially varying kernel.

K(x, y) = sum_k T_k(x, y) K_k, so K * I = sum_k T_k (I * K_k): one forward FFT of the image and
one inverse per spatial term, never a per-pixel kernel loop.
"""

from __future__ import annotations

import numpy as np

from ..exposure import bits_present, bits_set
from ..imageops import default_workers, fft_convolve, fft_convolve_sum, grow_mask  # noqa: F401
from .kernel import SpatialKernel

#: Planes not spread by convolution: injected-source markers and detections describe positions, not defects.
NOT_SPREAD = ("INJECTED", "INJECTED_TEMPLATE", "DETECTED", "DETECTED_NEGATIVE")


def convolve_image(image: np.ndarray, kernel: SpatialKernel, workers: int | None = None) -> np.ndarray:
    """K(x, y) * image for the spatially varying kernel."""
    return fft_convolve_sum(image, kernel.term_images(), kernel.spatial.factors(image.shape), workers)


def convolve_variance(variance: np.ndarray, kernel: SpatialKernel, workers: int | None = None) -> np.ndarray:
    """variance * K^2, with K taken at the image centre (the kernel varies by a few percent at most)."""
    k2 = kernel.center_image**2
    return fft_convolve(variance, k2, workers)


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
    present = bits_present(mask)
    for name, bit in bits.items():
        if name in NOT_SPREAD or not present & (1 << bit):
            continue
        plane = bits_set(mask, 1 << bit)
        if plane.any():
            np.bitwise_or(out, out.dtype.type(1 << bit), out=out, where=grow_mask(plane, radius))
    return out
