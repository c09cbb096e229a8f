"""The subtraction's configuration: flavor, kernel basis, candidate selection, rejection and checks."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .methods import BASES, FLAVORS, BasisName, Flavor, parse_method

__all__ = ["BASES", "FLAVORS", "Flavor", "SubtractConfig", "parse_method"]


class SubtractConfig(BaseModel):
    """PSF-matching subtraction (defaults follow LSST ip_diffim)."""

    model_config = ConfigDict(extra="forbid")

    flavor: Flavor = Field("convolveTemplate", description="which image is convolved (see dialab.subtraction.flavors)")
    kernel_basis: BasisName = Field("alard-lupton", description="the matching kernel's basis: 'alard-lupton' "
                                    "(Gaussians times polynomials), 'delta' (one free value per kernel pixel, "
                                    "regularized; for PSFs with spikes, asymmetries or sharp cores) or "
                                    "'psf-models' (the kernel the two PSF models imply, only its sum fitted)")
    kernel_degrees: tuple[int, ...] = Field((4, 2, 2), description="polynomial degree of each basis Gaussian")
    kernel_size: int | None = Field(None, ge=3, description="side of a delta or psf-models kernel box, odd "
                                    "(default: 10 sigma of the broader PSF, within 11-31)")
    regularization: float | None = Field(None, ge=0, description="delta basis: Laplacian penalty strength in "
                                         "units of the data's (trace ratio); default: chosen by cross-validation "
                                         "over the kernel stamps")
    kernel_prior: bool = Field(True, description="delta basis: penalise the kernel's departure from the shape the "
                                                 "two PSF models imply where that kernel convolves (off, or where it would "
                                                 "deconvolve: from smoothness alone)")
    spatial_order: Literal[0, 1, 2, "auto"] = Field(1, description="Chebyshev order of the kernel's spatial variation "
                                                    "('auto': 0-2, the one that best predicts held-out stamps)")
    background_order: int = Field(2, ge=0, le=3, description="Chebyshev order of the differential background")
    correct_convolved_noise: bool = Field(True, description="take the convolved image's expected noise power (with "
                                          "its measured pixel correlation) out of the kernel fit's normal "
                                          "equations (corrected least squares): against the regression dilution "
                                          "that shrinks the kernel's shape, which leaves 1-4% residuals at bright "
                                          "sources")
    decorrelate: bool = Field(True, description="whiten the difference's noise (DMTN-021)")
    keep_matched: bool = Field(True, description="return the matched image (the convolved input on the target's "
                               "PSF: forced photometry measures the template on it); off when only the difference "
                               "is wanted (dialab subtract): 12 bytes per pixel fewer at the peak, and one variance "
                               "convolution fewer when decorrelating")
    rescale_variance: bool = Field(True, description="scale the input variances to their measured pixel noise "
                                   "(not in crowded images)")
    rescale_difference_variance: bool = Field(False, description="also scale the difference's variance plane to its "
                                              "measured noise; off: the propagated variance is kept, so a failed "
                                              "subtraction shows (detection calibrates its filtered noise itself)")
    max_candidates: int = Field(400, ge=3, description="most kernel stamps used (spread over the image when more "
                                                       "qualify: the fit's time grows with their number)")
    min_candidates: int = Field(3, ge=1, description="fewest kernel stamps accepted")
    kernel_sources: Literal["all", "compact"] = Field("all", description="which sources carry kernel stamps: 'all' "
                                                      "(galaxies and blends too: the kernel is fitted where the "
                                                      "brightest, most extended residuals would be) or 'compact' "
                                                      "(point-like, isolated where enough are); the stars' flux "
                                                      "ratio always uses the compact ones")
    candidate_snr_min: float = Field(10.0, description="lowest S/N of a kernel source")
    candidate_snr_max: float = Field(500.0, description="highest S/N of a kernel source")
    max_rejection_rounds: int = Field(3, ge=0, description="rounds of stamp rejection after the spatial fit")
    residual_mean_max: float = Field(0.25, description="reject a stamp whose normalised residual |mean| exceeds this "
                                     "and 10% of its own signal's (kernel_fit.RESIDUAL_SIGNAL_FRACTION)")
    residual_rms_max: float = Field(1.5, description="reject a stamp whose normalised residual rms exceeds this and "
                                    "whose residual in excess of the noise exceeds 30% of its own signal's rms")
    min_overlap_fraction: float = Field(0.25, description="least fraction of science pixels the template covers")
    aperture_correction: bool = Field(True, description="PSF fluxes to total: the inputs' PSFs carry the aperture "
                                      "correction of their bright stars (photometry.aperture_correction)")
    scale_from_stars: bool = Field(True, description="hold the kernel sum at the stars' total-flux ratio (errors "
                                   "in both images); off: the sum is a free parameter of the least-squares fit "
                                   "(ZOGY: its flux scale is that of an Alard-Lupton fit)")
    max_scale_deviation: float | None = Field(0.3, gt=0, description="largest fractional difference of the kernel "
                                              "sum from the zeropoint ratio when both images have MAGZERO (None: "
                                              "not checked)")
    max_stamp_residual_rms: float = Field(10.0, gt=0, description="largest median normalised residual rms of the kernel "
                                          "stamps after the fit (about 1 for a good subtraction, a few at high S/N)")
    workers: int | None = Field(None, ge=1, description="FFT threads (default: all cores)")
