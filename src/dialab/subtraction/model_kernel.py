"""The matching kernel the PSF models imply: K with P_target ~ K * P_convolved, solved on the two PSF stamps
in the delta basis with a Laplacian penalty, so that it never amplifies noise where P_convolved has no
power (a plain Fourier division would).

It serves twice: as the shape a delta-basis fit is regularized towards (``laplacian_penalty(basis, prior)``),
and, with ``kernel_basis: psf-models``, as the kernel itself, the stars then fitting only its sum (the
photometric scale) and the differential background.
"""

from __future__ import annotations

import numpy as np

from ..imageops import Chebyshev2D, convolve_full
from ..psf import Psf
from .basis import KernelBasis, laplacian_penalty

#: Penalty strength of the model kernel, in units of trace(A^T A) / trace(R): the PSF stamps are noise-free,
#: so it only has to keep the solution smooth where the convolved PSF carries no information.
MODEL_STRENGTH = 1e-4


def psf_matching_kernel(target_psf: Psf, convolved_psf: Psf, basis: KernelBasis) -> np.ndarray:
    """The unit-sum kernel K, on the box of the single-pixel delta ``basis`` (``basis.delta_basis``), minimising
    ``sum (P_t - K * P_c)^2 + lambda sum (Laplacian K)^2`` at the image centre, the sum over the whole plane.

    Pixel k of K shifts P_c by its offset u_k, so the normal matrix of the raw pixels is P_c's autocorrelation
    at u_j - u_i and the right-hand side P_t's correlation with P_c at u_k: two FFTs of the stamps, where
    products of the shifted stamps took 2.5 s for a 25-px box on 211-px WebbPSF models.
    """
    m = max(target_psf.default_size, convolved_psf.default_size, basis.size) | 1
    target, conv = target_psf.stamp(m), convolved_psf.stamp(m)
    flipped = conv[::-1, ::-1]
    auto, cross = convolve_full(conv, flipped), convolve_full(target, flipped)  # lag d at index m - 1 + d
    L, h = basis.size, basis.half
    v, u = np.divmod(np.arange(L * L), L)  # raw pixel k of the basis at kernel offset (v - h, u - h)
    normal_raw = auto[m - 1 + v[None, :] - v[:, None], m - 1 + u[None, :] - u[:, None]]
    T = basis.transform
    normal = T @ normal_raw @ T.T
    R = laplacian_penalty(basis)
    lam = MODEL_STRENGTH * np.trace(normal) / np.trace(R)
    coeffs = np.linalg.solve(normal + lam * R, T @ cross[m - 1 + v - h, m - 1 + u - h])
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


#: Where the spatial model's terms are sampled: the centre and the four edge midpoints for a linear model, a 3 x 3
#: grid for a quadratic one (fractions of the image's extent).
SPATIAL_SAMPLES = {1: ((0.5, 0.5), (0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0)),
                   2: tuple((fx, fy) for fy in (0.0, 0.5, 1.0) for fx in (0.0, 0.5, 1.0))}


def model_kernel_terms(target_psf: Psf, convolved_psf: Psf, basis: KernelBasis, spatial: Chebyshev2D,
                       centre: np.ndarray | None = None) -> np.ndarray:
    """The PSF models' kernel as a field over the image, in the terms of the kernel fit's spatial model:
    (n_terms, size, size), term 0 of unit sum and the others of zero sum; only term 0 (the centre's kernel) when
    neither model varies. A prior that knows only the centre's kernel pulls every spatial term towards no
    variation; strongly penalised, the fitted kernel was then the centre's everywhere, and stars at the edges of a
    CCD whose PSF widens by 6% kept 1-2% of their flux."""
    centre = psf_matching_kernel(target_psf, convolved_psf, basis) if centre is None else centre
    if spatial.order == 0 or target_psf.at(0.0, 0.0) is target_psf and convolved_psf.at(0.0, 0.0) is convolved_psf:
        return centre[None]  # no variation to pull towards: the spatial terms keep smoothness alone
    nx, ny = spatial.width, spatial.height
    samples = SPATIAL_SAMPLES[min(spatial.order, 2)]
    xs = np.array([fx * (nx - 1) for fx, _ in samples])
    ys = np.array([fy * (ny - 1) for _, fy in samples])
    kernels = np.array([centre if (fx, fy) == (0.5, 0.5) else
                        psf_matching_kernel(target_psf.at(x, y), convolved_psf.at(x, y), basis)
                        for (fx, fy), x, y in zip(samples, xs, ys)])
    design = spatial.terms(xs, ys).T  # (samples, n_terms)
    coeffs, *_ = np.linalg.lstsq(design, kernels.reshape(len(kernels), -1), rcond=None)
    return coeffs.reshape(spatial.n_terms, *centre.shape)
