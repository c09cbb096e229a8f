"""The matching kernel the PSF models imply: K with P_target ~ K * P_convolved, solved on the two PSF stamps
in the delta basis with a Laplacian penalty, so that it never amplifies noise where P_convolved has no
power (a plain Fourier division would).

It serves twice: as the shape a delta-basis fit is regularized towards (``laplacian_penalty(basis, prior)``),
and, with ``kernel_basis: psf-models``, as the kernel itself, the stars then fitting only its sum (the
photometric scale) and the differential background.
"""

from __future__ import annotations

import numpy as np

from ..psf import Psf
from .basis import KernelBasis, laplacian_penalty

#: Penalty strength of the model kernel, in units of trace(A^T A) / trace(R): the PSF stamps are noise-free,
#: so it only has to keep the solution smooth where the convolved PSF carries no information.
MODEL_STRENGTH = 1e-4


def psf_matching_kernel(target_psf: Psf, convolved_psf: Psf, basis: KernelBasis) -> np.ndarray:
    """The unit-sum kernel K, on the box of the delta ``basis`` (``basis.delta_basis``), minimising
    ``sum (P_t - K * P_c)^2 + lambda sum (Laplacian K)^2`` at the image centre."""
    m = max(target_psf.default_size, convolved_psf.default_size, basis.size) | 1
    target = target_psf.stamp(m)
    conv = np.pad(convolved_psf.stamp(m), basis.half)
    a = basis.convolve_valid(conv).reshape(basis.n, -1)
    normal = a @ a.T
    R = laplacian_penalty(basis)
    lam = MODEL_STRENGTH * np.trace(normal) / np.trace(R)
    coeffs = np.linalg.solve(normal + lam * R, a @ target.ravel())
    kernel = np.tensordot(coeffs, basis.images(), axes=1)
    return kernel / kernel.sum()


def model_basis(kernel: np.ndarray) -> KernelBasis:
    """A one-function basis, the given unit-sum kernel (held as the sum of its singular-value terms, which
    are separable as every basis function is): a fit in it fits only the kernel sum."""
    u, s, vt = np.linalg.svd(kernel)
    keep = s > 1e-12 * s[0]
    factors_y = (u[:, keep] * s[keep]).T
    factors_x = vt[keep]
    transform = np.ones((1, int(keep.sum()))) / float(kernel.sum())
    return KernelBasis((), (), kernel.shape[0], factors_x, factors_y, transform, name="psf-models")
