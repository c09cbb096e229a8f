"""The PSF-matching kernel as a model: K(x, y) = sum_j a_j(x, y) B_j, a Gaussian basis with Chebyshev
coefficients of the position. Fitting it lives in ``kernel_fit``; applying it in ``convolve``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..imageops import Chebyshev2D
from .basis import KernelBasis


@dataclass(frozen=True)
class SpatialKernel:
    """The fitted kernel K(x, y) = sum_j a_j(x, y) B_j, evaluable anywhere in the image."""

    basis: KernelBasis
    coeffs: np.ndarray  # (n_basis, n_spatial_terms); row 0 is non-zero only in term 0
    spatial: Chebyshev2D

    @property
    def size(self) -> int:
        return self.basis.size

    @property
    def kernel_sum(self) -> float:
        return float(self.coeffs[0, 0])

    def image_at(self, x: float, y: float) -> np.ndarray:
        a = self.coeffs @ self.spatial.terms(x, y)
        return np.tensordot(a, self.basis.images(), axes=1)

    def term_images(self) -> np.ndarray:
        """K_k = sum_j coeffs[j, k] B_j, so that K(x, y) = sum_k T_k(x, y) K_k."""
        return np.einsum("jk,jyx->kyx", self.coeffs, self.basis.images())

    @property
    def center_image(self) -> np.ndarray:
        return self.image_at((self.spatial.width - 1) / 2, (self.spatial.height - 1) / 2)
