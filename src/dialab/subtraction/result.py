"""What a subtraction returns: the difference, the matched image, the kernel and its diagnostics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..exposure import Exposure
from ..imageops import Chebyshev2D
from ..psf import Psf
from .kernel import SpatialKernel


@dataclass(frozen=True)
class SubtractionDiagnostics:
    flavor: str
    convolved: str  # "template" or "science"
    kernel_sum: float
    n_candidates: int
    n_used: int
    n_rejected: int
    science_fwhm: float
    template_fwhm: float
    residual_mean: float
    residual_rms: float
    variance_scale_science: float
    variance_scale_template: float
    noise_ratio: float  # robust std of D / sqrt(variance) before the difference's variance is rescaled
    variance_scale_difference: float
    star_flux_ratio: float = float("nan")  # the stars' total-flux ratio (target / convolved)
    scale_error: float = float("nan")  # its error
    scale_stars: int = 0  # stars whose fluxes agree with that ratio
    scale_method: str = "weighted"  # how the stars' fluxes were measured: "weighted" or "aperture"
    free_kernel_sum: float = float("nan")  # the sum of a free least-squares fit (held at the ratio when it disagrees)
    kernel_basis: str = "alard-lupton"
    kernel_size: int = 0
    regularization: float = 0.0  # delta basis: the penalty strength, relative to the data's
    kernel_spatial_order: int = 0  # the Chebyshev order of the kernel's variation over the image (given or chosen)
    deconvolving: bool = False  # the convolved image's PSF was the broader along some direction: no exact kernel
    bright_sources: int = 0  # usable science sources of S/N >= 100 (kernel_fit.BRIGHT_SNR) ...
    bright_in_template: int = 0  # ... and those with a template counterpart (another field's template shows few)

    @property
    def sum_source(self) -> str:
        """What set the kernel sum: the free fit, or the stars' flux ratio it was held at (and how measured)."""
        if self.kernel_sum == self.free_kernel_sum:
            return "free fit"
        return f"stars ({self.scale_method})"  # held at their ratio (zogy: its flux ratio is theirs)

    def summary(self) -> str:
        basis = "" if self.kernel_basis == "alard-lupton" else (
            f", {self.kernel_basis} kernel {self.kernel_size}x{self.kernel_size}"
            + (f" regularization {self.regularization:.2g}" if self.kernel_basis == "delta" else ""))
        apertures = " in common apertures" if self.scale_method == "aperture" else ""
        return (f"flavor {self.flavor} (convolved {self.convolved}{', deconvolving' if self.deconvolving else ''})"
                f"{basis}, kernel sum {self.kernel_sum:.4f} "
                f"(set by the {self.sum_source}; free fit {self.free_kernel_sum:.4f}, stars' flux ratio{apertures} "
                f"{self.star_flux_ratio:.4f} +- {self.scale_error:.4f} from {self.scale_stars} stars), "
                f"candidates {self.n_used}/{self.n_candidates} used, PSF FWHM science {self.science_fwhm:.2f} "
                f"template {self.template_fwhm:.2f} px, noise ratio {self.noise_ratio:.3f}")


@dataclass(frozen=True)
class SubtractionResult:
    """The difference (on the science flux scale), the matched image, the kernel and diagnostics.

    For preconvolution ``difference`` is the score-like image S (PSF v * P_N) and ``score`` is it too.
    ``science_psf`` and ``template_psf`` are the PSFs the subtraction used (given or measured);
    ``kernel_positions`` the (x, y) of the stamps the kernel was fitted on; ``background_coeffs`` the
    differential background's Chebyshev coefficients in ``background_model`` (None: no background fitted).
    """

    difference: Exposure
    matched_image: Exposure | None  # None when SubtractConfig.keep_matched is off
    kernel: SpatialKernel | None  # None for zogy (no matching kernel)
    score: Exposure | None
    diagnostics: SubtractionDiagnostics
    science_psf: Psf
    template_psf: Psf
    kernel_positions: np.ndarray
    background_coeffs: np.ndarray
    background_model: Chebyshev2D | None = None

    @property
    def background(self) -> np.ndarray:
        """The differential background B, full size: evaluated when asked (nothing in a run needs it, and a
        full-size plane held with the result is 4 bytes per pixel more at the peak)."""
        if self.background_model is None:
            return np.zeros(self.difference.shape, np.float32)
        return self.background_model.evaluate(self.background_coeffs, self.difference.shape)
