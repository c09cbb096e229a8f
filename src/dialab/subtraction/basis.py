"""Alard-Lupton kernel basis: Gaussians times polynomials (Alard & Lupton 1998).

Every raw basis function is separable, g_i(x) x^p * g_i(y) y^q, which is what makes per-stamp
convolution cheap (two 1-d passes). The orthonormalised basis is a fixed linear map of the raw
one: basis 0 has sum 1 and the others sum 0 and unit L2 norm, so the kernel sum is coefficient 0
and stays constant when the other coefficients vary over the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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

    @property
    def n(self) -> int:
        return self.transform.shape[0]

    @property
    def half(self) -> int:
        return self.size // 2

    def raw_images(self) -> np.ndarray:
        return np.einsum("ky,kx->kyx", self.factors_y, self.factors_x)

    def images(self) -> np.ndarray:
        """Orthonormalised basis images, shape (n, size, size)."""
        return np.einsum("jk,kyx->jyx", self.transform, self.raw_images())


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
