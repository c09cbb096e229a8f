"""Kernel bases: Alard-Lupton Gaussians times polynomials (Alard & Lupton 1998), or one delta function per
kernel pixel (Bramich 2008; in blocks beyond a broad kernel's core), for PSFs no sum of Gaussians can match
(diffraction spikes, sharp cores).

Every raw basis function is separable, g_i(x) x^p * g_i(y) y^q (a delta function is too), which is what
makes per-stamp convolution cheap. The fitted basis is a fixed linear map of the raw one: basis 0 has
sum 1 and the others sum 0, so the kernel sum is coefficient 0 and stays constant when the other
coefficients vary over the image. The Alard-Lupton functions 1.. are orthonormalised (a well-conditioned
fit); the delta basis is kept as (pixel - centre) differences (Bramich et al. 2013), whose fit a Laplacian
penalty regularizes (``laplacian_penalty``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MIN_KERNEL_SIZE = 21
MAX_KERNEL_SIZE = 35


@dataclass(frozen=True)
class KernelBasis:
    """Raw separable factors and the map ``transform`` from raw to orthonormalised functions.

    ``factors_x[k]``, ``factors_y[k]`` are the 1-d factors of raw function k;
    basis image j = sum_k transform[j, k] * outer(factors_y[k], factors_x[k]).
    """

    sigmas: tuple[float, ...]
    degrees: tuple[int, ...]
    size: int
    factors_x: np.ndarray
    factors_y: np.ndarray
    transform: np.ndarray
    name: str = "alard-lupton"

    @property
    def n(self) -> int:
        return self.transform.shape[0]

    @property
    def half(self) -> int:
        return self.size // 2

    def raw_images(self) -> np.ndarray:
        return np.einsum("ky,kx->kyx", self.factors_y, self.factors_x)

    @cached_property
    def _images(self) -> np.ndarray:
        out = np.tensordot(self.transform, self.raw_images(), axes=1)  # a matrix product: BLAS, not a loop
        out.flags.writeable = False
        return out

    def images(self) -> np.ndarray:
        """The fitted basis images, shape (n, size, size) (read-only, computed once)."""
        return self._images

    def convolve_valid(self, cut: np.ndarray) -> np.ndarray:
        """'valid' convolution of ``cut`` with every basis function: (n, m, m) for an (m + size - 1)^2 cut."""
        L = self.size
        if self.name == "delta":
            # the convolution with the delta at kernel pixel (p, q) is the cut shifted by (p, q) - centre
            windows = sliding_window_view(cut, (L, L))[:, :, ::-1, ::-1]
            m = windows.shape[0]
            # one contiguous copy, a row per kernel pixel (a 2-d slice of the cut each): 5x faster than copying
            # the windows pixel by pixel, which took most of a 25-px kernel's stamp building
            raw = np.ascontiguousarray(np.moveaxis(windows, (2, 3), (0, 1))).reshape(L * L, m * m)
            if self.n < L * L:  # blocks of pixels: each function's convolution a sum of shifted cuts
                return (self._sparse_transform @ raw).reshape(self.n, m, m)
            c = (L * L) // 2
            out = raw[_delta_order(L)]
            out[1:] -= raw[c]
            return out.reshape(self.n, m, m)
        along_x = sliding_window_view(cut, L, axis=1) @ self.factors_x[:, ::-1].T  # (M, m, n_raw): [y', x, k]
        # the pass along y: one banded (m, M) matrix per raw function, a batched matrix product (BLAS)
        raw = np.matmul(self._along_y(cut.shape[0]), along_x.transpose(2, 0, 1))  # (n_raw, m, m): [k, y, x]
        return np.tensordot(self.transform, raw, axes=1)

    @cached_property
    def _sparse_transform(self):
        from scipy.sparse import csr_matrix

        return csr_matrix(self.transform)

    @cached_property
    def _banded(self) -> dict:
        return {}

    def _along_y(self, M: int) -> np.ndarray:
        """(n_raw, m, M) matrices T with T[k, y, y + l] = factors_y[k, L - 1 - l]: T[k] @ column is the 'valid'
        convolution of the column with factor k (kept per cut size)."""
        if M not in self._banded:
            L, m = self.size, M - self.size + 1
            T = np.zeros((self.factors_y.shape[0], m, M))
            rows = np.arange(m)
            for lag in range(L):
                T[:, rows, rows + lag] = self.factors_y[:, L - 1 - lag, None]
            self._banded[M] = T
        return self._banded[M]


def _delta_order(size: int) -> np.ndarray:
    """Raw pixel indices in basis order: the centre first, then every other pixel in raster order."""
    c = (size * size) // 2
    return np.concatenate([[c], np.delete(np.arange(size * size), c)])


@lru_cache(maxsize=4)  # read-only once made: a fit, its prior and the models' kernel share one (images: a matrix product)
def delta_basis(size: int, core: int | None = None) -> KernelBasis:
    """One function per kernel pixel: basis 0 the delta at the centre, basis j the delta at pixel p_j minus it
    (sum 0), so that the kernel sum is coefficient 0 as in the Alard-Lupton basis.

    With ``core`` (odd, smaller than ``size``) only the central ``core`` x ``core`` pixels are free one by one; beyond
    it the pixels are grouped in ``DELTA_BLOCK`` x ``DELTA_BLOCK`` blocks of one value each (the mixed-resolution
    delta basis of Bramich et al. 2013): where a matching kernel is smooth, a half to three quarters as many parameters,
    fewer for the stamps of a broad PSF to constrain and for the fit to solve."""
    if size % 2 == 0 or size < 3:
        raise ValueError(f"delta kernel size must be odd and >= 3, not {size}")
    n = size * size
    order = _delta_order(size)
    eye = np.eye(size)
    factors_y = eye[np.arange(n) // size]
    factors_x = eye[np.arange(n) % size]
    if core is None or core >= size:
        transform = np.zeros((n, n))
        transform[np.arange(n), order] = 1.0
        transform[1:, order[0]] = -1.0
    else:
        groups = _pixel_groups(size, core)
        transform = np.zeros((groups.max() + 1, n))
        transform[groups.ravel(), np.arange(n)] = 1.0
        transform[1:, order[0]] -= transform[1:].sum(axis=1)
    return KernelBasis((), (), size, factors_x, factors_y, transform, name="delta")


#: Smallest side of a delta kernel's central box of single-pixel functions: a box up to this size is all single
#: pixels; a larger one (a broad PSF's: up to 31 px, 961 pixels) has blocks beyond its core. On hsc-sprint-mini's
#: broader-science units (FWHM 4.3-6.5 px, boxes of 25-31 px) the stamps' matrix budget held 40-90 stamps, too few
#: for three spatial terms of 625-961 values each. (With a 15-px core, blocks at the edge of a 17-px box made the
#: deconvolving convolveTemplate fits of sharper-science truth pairs leave 10-13 false detections per 4 Mpix, not 2-7.)
DELTA_CORE = 21


def delta_core_size(sigma_target: float, sigma_convolved: float) -> int:
    """The central box of single pixels: the matching kernel (of width sqrt(abs(s_t^2 - s_c^2))) to 5 of its sigmas,
    odd, at least ``DELTA_CORE``, and no more than the PSFs' cores need (``_core_box``): a box widened to reach
    bright wings has blocks there. (To 4 sigmas, preconvolution's kernel, whose target carries the PSF's wings
    twice, left 19 and 18 good contaminants in two hsc-sprint-mini units where single pixels left 6 and 9.)"""
    s = math.sqrt(abs(sigma_target**2 - sigma_convolved**2))
    return min(max(int(math.ceil(2 * 5 * s)) | 1, DELTA_CORE), _core_box(sigma_target, sigma_convolved))


#: Side of the blocks of a mixed-resolution delta basis (odd: blocks centred on multiples of it from the kernel's centre).
DELTA_BLOCK = 3


def _pixel_groups(size: int, core: int) -> np.ndarray:
    """(size, size) function index of each kernel pixel: 0 the centre, then each pixel of the central ``core`` box,
    then each block of ``DELTA_BLOCK`` pixels beyond it (cut by the box's edges), in raster order."""
    h, c = size // 2, core // 2
    v, u = np.mgrid[-h : h + 1, -h : h + 1]
    inner = (np.abs(u) <= c) & (np.abs(v) <= c)
    block = np.rint(v / DELTA_BLOCK).astype(int) * (2 * size + 1) + np.rint(u / DELTA_BLOCK).astype(int)
    key = np.where(inner, (v + h) * size + (u + h) - 10 * size * size, block)  # inner pixels first, raster order
    key[h, h] = key.min() - 1  # the centre first of all
    return np.unique(key, return_inverse=True)[1].reshape(size, size)


def laplacian_penalty(basis: KernelBasis, prior: np.ndarray | None = None, variation: bool = False) -> np.ndarray:
    """R with a^T R a = sum over kernel pixels of (discrete Laplacian of K - a_0 prior)^2, the kernel taken as
    zero outside its box (so its edges are pulled to zero too): the smoothness penalty of Becker et al. (2012)
    without a prior; with a unit-sum ``prior`` kernel, a pull towards that shape at the fitted kernel sum. With
    ``variation``, K is a spatial term of the kernel (its coefficients 1.. are that term's, coefficient 0 the
    kernel sum) and ``prior`` that term's zero-sum share of the models' kernel, which the fitted sum scales."""
    if prior is not None and basis.n < basis.size**2:  # blocks: the prior as they can hold it, or the penalty
        prior = _in_span(basis, prior)  # would pull the kernel sum down to shrink a difference no kernel can close
    imgs = np.pad(basis.images(), ((0, 0), (1, 1), (1, 1)))
    if variation:
        imgs[0] = np.pad(-prior, 1)
    elif prior is not None:
        imgs[0, 1:-1, 1:-1] -= prior / prior.sum()
    lap = (imgs[:, :-2, 1:-1] + imgs[:, 2:, 1:-1] + imgs[:, 1:-1, :-2] + imgs[:, 1:-1, 2:]
           - 4 * imgs[:, 1:-1, 1:-1]).reshape(basis.n, -1)
    return lap @ lap.T


def _in_span(basis: KernelBasis, image: np.ndarray) -> np.ndarray:
    """The least-squares representation of a kernel image in the basis (a mixed-resolution delta basis: its block means)."""
    flat = basis.images().reshape(basis.n, -1)
    coeffs, *_ = np.linalg.lstsq(flat.T, image.ravel(), rcond=None)
    return (coeffs @ flat).reshape(image.shape)


#: Largest side of a delta kernel's box.
MAX_DELTA_SIZE = 31


def _core_box(sigma_target: float, sigma_convolved: float) -> int:
    """The box that holds the matching kernel (of width sqrt(|s_t^2 - s_c^2|)) and the differences of the PSFs'
    cores, which reach a few sigma of the broader PSF: 5 sigma, odd, within [11, ``MAX_DELTA_SIZE``]."""
    s = max(sigma_target, sigma_convolved, math.sqrt(abs(sigma_target**2 - sigma_convolved**2)))
    return min(max(int(math.ceil(2 * 5 * s)) | 1, 11), MAX_DELTA_SIZE)


def delta_kernel_size(sigma_target: float, sigma_convolved: float, reach: float = 0.0) -> int:
    """A delta kernel's box: the cores' box (``_core_box``), widened to ``reach`` pixels from the centre (the PSFs'
    radius of 90% of their light, ``psf.light_radius``) when their wings hold that much light further out than
    5 sigma (Airy rings, diffraction spikes: a kernel that cannot reach a spike cannot turn it), within
    ``MAX_DELTA_SIZE``. On the NIRCam pair (WebbPSF models, 90% of the light within 12 px, 11 sigma) the residual
    power on the sources fell from 0.75 to 0.27 (13 to 27 px); on Gaussian, Moffat and Kolmogorov PSFs (90% within
    2.2-3.4 sigma) nothing changes."""
    n = max(_core_box(sigma_target, sigma_convolved), 2 * int(math.ceil(reach)) + 1)
    return min(n, MAX_DELTA_SIZE)


def basis_sigmas(sigma_target: float, sigma_convolved: float, n_gauss: int = 3) -> tuple[float, ...]:
    """Gaussian widths: the first max(0.7, sigma_K / 2) (0.4 when deconvolving), then x2 each."""
    sigma_k = math.sqrt(abs(sigma_target**2 - sigma_convolved**2))
    first = max(0.7, sigma_k / 2) if sigma_target >= sigma_convolved else 0.4
    return tuple(first * 2**i for i in range(n_gauss))


def kernel_size(sigmas: tuple[float, ...]) -> int:
    """6 x the largest basis sigma, odd, within [21, 35]."""
    n = int(math.ceil(6 * max(sigmas)))
    n = min(max(n, MIN_KERNEL_SIZE), MAX_KERNEL_SIZE)
    return n if n % 2 else n + 1


def alard_lupton_basis(sigma_target: float, sigma_convolved: float,
                       degrees: tuple[int, ...] = (4, 2, 2), size: int | None = None) -> KernelBasis:
    """Basis for matching an image of PSF sigma ``sigma_convolved`` to one of ``sigma_target`` (pixels)."""
    sigmas = basis_sigmas(sigma_target, sigma_convolved, len(degrees))
    size = kernel_size(sigmas) if size is None else size
    h = size // 2
    u = np.arange(-h, h + 1, dtype=float)
    fx, fy = [], []
    for s, deg in zip(sigmas, degrees):
        g = np.exp(-0.5 * (u / s) ** 2)
        for total in range(deg + 1):
            for q in range(total + 1):
                p = total - q
                fx.append(g * (u / h) ** p)  # u / h keeps the polynomial terms of order unity
                fy.append(g * (u / h) ** q)
    fx = np.array(fx)
    fy = np.array(fy)
    raw = np.einsum("ky,kx->kyx", fy, fx).reshape(len(fx), -1)
    n = len(raw)
    transform = np.eye(n)
    sums = raw.sum(axis=1)
    transform[0] /= sums[0]
    for j in range(1, n):
        transform[j] -= sums[j] * transform[0]
    # Orthonormalise functions 1..n-1 (Gram-Schmidt on the sum-zero functions): a well-conditioned fit.
    images = transform @ raw
    for j in range(1, n):
        for i in range(1, j):
            transform[j] -= (images[j] @ images[i]) * transform[i]
            images[j] = transform[j] @ raw
        norm = np.sqrt(images[j] @ images[j])
        transform[j] /= norm
        images[j] /= norm
    return KernelBasis(sigmas, tuple(degrees), size, fx, fy, transform)
