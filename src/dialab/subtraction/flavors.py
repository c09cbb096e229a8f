"""The subtraction flavors and ``subtract``: PSF matching of a science image and a template.

* convolveTemplate:  D = N - K*R - B
* convolveScience:   D = (K*N + B - R) / sum(K)     (on the science flux scale; PSF of the template)
* auto:              convolveScience when the template PSF is wider on both axes, else convolveTemplate
* preconvolution:    S = v*N - K*R - B, v the science PSF; S is flux-conserving with PSF v * P_N and
                     already matched-filtered, so detection thresholds it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from ..background import clipped_stats, estimate_background
from ..errors import BadInputError, BadSubtractionError, NoOverlapError
from ..exposure import Exposure, MaskPlanes
from ..moments import adaptive_moments
from ..psf import GridPsf, ImagePsf, Psf, measure_psf
from .basis import alard_lupton_basis
from .convolve import (
    convolve_image,
    convolve_mask,
    convolve_variance,
    fft_convolve_many,
    interpolate_masked,
    kernel_footprint_radius,
)
from .decorrelation import apply_filter, filter_stamp
from .kernel_fit import KernelFit, SpatialKernel, fit_matching_kernel, select_kernel_candidates
from .photometric_scale import FLUX_RATIO_SYSTEMATIC, measure_photometric_scale

log = logging.getLogger(__name__)

Flavor = Literal["convolveTemplate", "convolveScience", "auto", "preconvolution"]
FLAVORS: tuple[str, ...] = ("convolveTemplate", "convolveScience", "auto", "preconvolution")


class SubtractConfig(BaseModel):
    """PSF-matching subtraction (defaults follow LSST ip_diffim)."""

    model_config = ConfigDict(extra="forbid")

    flavor: Flavor = Field("convolveTemplate", description="which image is convolved (see module docstring)")
    kernel_degrees: tuple[int, ...] = Field((4, 2, 2), description="polynomial degree of each basis Gaussian")
    spatial_order: int = Field(1, ge=0, le=2, description="Chebyshev order of the kernel's spatial variation")
    background_order: int = Field(2, ge=0, le=3, description="Chebyshev order of the differential background")
    decorrelate: bool = Field(True, description="whiten the difference's noise (DMTN-021)")
    rescale_variance: bool = Field(True, description="scale the input variances to their measured pixel noise "
                                   "(not in crowded images)")
    rescale_difference_variance: bool = Field(False, description="also scale the difference's variance plane to its "
                                              "measured noise; off: the propagated variance is kept, so a failed "
                                              "subtraction shows (detection calibrates its filtered noise itself)")
    max_candidates: int = Field(1000, ge=3, description="most kernel stamps used")
    min_candidates: int = Field(3, ge=1, description="fewest kernel stamps accepted")
    candidate_snr_min: float = Field(10.0, description="lowest S/N of a kernel source")
    candidate_snr_max: float = Field(500.0, description="highest S/N of a kernel source")
    max_rejection_rounds: int = Field(3, ge=0, description="rounds of stamp rejection after the spatial fit")
    residual_mean_max: float = Field(0.25, description="reject a stamp whose normalised residual |mean| exceeds")
    residual_rms_max: float = Field(1.5, description="reject a stamp whose normalised residual rms exceeds")
    min_overlap_fraction: float = Field(0.25, description="least fraction of science pixels the template covers")
    scale_from_stars: bool = Field(True, description="hold the kernel sum at the stars' total-flux ratio (errors "
                                   "in both images); off: the sum is a free parameter of the least-squares fit")
    max_scale_deviation: float | None = Field(0.3, gt=0, description="largest fractional difference of the kernel "
                                              "sum from the zeropoint ratio when both images have MAGZERO (None: "
                                              "not checked)")
    max_stamp_residual_rms: float = Field(10.0, gt=0, description="largest mean normalised residual rms of the kernel "
                                          "stamps after the fit (about 1 for a good subtraction, a few at high S/N)")
    workers: int | None = Field(None, description="FFT threads (default: all cores)")


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
    free_kernel_sum: float = float("nan")  # the sum of a free least-squares fit (held at the ratio when it disagrees)

    def summary(self) -> str:
        return (f"flavor {self.flavor} (convolved {self.convolved}), kernel sum {self.kernel_sum:.4f} "
                f"(free fit {self.free_kernel_sum:.4f}, stars' flux ratio {self.star_flux_ratio:.4f} "
                f"+- {self.scale_error:.4f} from {self.scale_stars} stars), "
                f"candidates {self.n_used}/{self.n_candidates} used, PSF FWHM science {self.science_fwhm:.2f} "
                f"template {self.template_fwhm:.2f} px, noise ratio {self.noise_ratio:.3f}")


@dataclass(frozen=True)
class SubtractionResult:
    """The difference (on the science flux scale), the matched image, the kernel and diagnostics.

    For preconvolution ``difference`` is the score-like image S (PSF v * P_N) and ``score`` is it too.
    """

    difference: Exposure
    matched_image: Exposure
    kernel: SpatialKernel
    background: np.ndarray
    score: Exposure | None
    diagnostics: SubtractionDiagnostics
    extras: dict = field(default_factory=dict)


def psf_axes(psf: Psf, x: float | None = None, y: float | None = None) -> tuple[float, float]:
    """Adaptive second moments (ixx, iyy) of the PSF, pixels^2."""
    p = psf.stamp(x=x, y=y)
    c = p.shape[0] // 2
    m = adaptive_moments(p, c, c, max(psf.sigma, 0.5))
    return m.ixx, m.iyy


def variance_scale(exp: Exposure, bg=None, block: int = 4) -> float:
    """(measured / recorded)^2 pixel noise in source-free unmasked pixels.

    Sources are found on 4x4-binned S/N (noise 4x lower, so noise peaks are not mistaken for
    sources and the pixel distribution is not clipped); their blocks and the neighbouring ones
    are excluded. Crowded images (under 30% free) keep their variance.
    """
    usable = ~exp.plane("BAD", "SAT", "NO_DATA", "EDGE", "CR")
    bg = bg or estimate_background(exp.image, ~usable)
    resid = exp.image - bg.level
    ny, nx = (exp.shape[0] // block) * block, (exp.shape[1] // block) * block
    resid, usable = resid[:ny, :nx], usable[:ny, :nx]
    var = exp.variance[:ny, :nx]

    def binned(a):
        return a.reshape(ny // block, block, nx // block, block).sum(axis=(1, 3))

    snr = binned(np.where(usable, resid, 0)) / np.sqrt(np.maximum(binned(np.where(usable, var, 0)), 1e-30))
    sources = ndimage.maximum_filter((np.abs(snr) > 3.0).view(np.uint8), size=3, mode="constant") > 0
    sources = np.repeat(np.repeat(sources, block, axis=0), block, axis=1)
    if (usable & ~sources).sum() < 0.3 * usable.sum():
        log.info("%s: too crowded to measure the pixel noise; variance kept", exp.path)
        return 1.0
    usable &= ~sources
    idx = np.flatnonzero(usable)
    idx = idx[:: max(1, len(idx) // 2_000_000)]
    z = resid.ravel()[idx] / np.sqrt(np.maximum(var.ravel()[idx], 1e-30))
    _, sigma = clipped_stats(z)
    return float(sigma**2) if np.isfinite(sigma) and sigma > 0 else 1.0


def noise_ratio(exp: Exposure, block: int = 64) -> float:
    """Robust std of image / sqrt(variance) in usable pixels, source pixels clipped: 1 when honest.

    A smooth residual background (box medians, spline-interpolated) is removed first: on a
    PSF-filtered score image a leftover sky gradient can be many times the pixel noise, and it
    must not be taken for noise (the variance plane is rescaled by this ratio).
    """
    from ..background import _fill, _upsample

    usable = ~exp.plane("BAD", "SAT", "NO_DATA", "EDGE", "CR", "DETECTED", "DETECTED_NEGATIVE")
    z = np.where(usable, exp.image / np.sqrt(np.maximum(exp.variance, 1e-30)), np.nan).astype(np.float32)
    ny, nx = (exp.shape[0] // block) * block, (exp.shape[1] // block) * block
    if ny >= 2 * block and nx >= 2 * block:
        z, usable = z[:ny, :nx], usable[:ny, :nx]
        boxes = z.reshape(ny // block, block, nx // block, block).swapaxes(1, 2).reshape(-1, block * block)
        enough = np.isfinite(boxes[:, ::4]).sum(axis=1) >= 0.25 * boxes[:, ::4].shape[1]
        if enough.any():
            level = np.full(len(boxes), np.nan)
            level[enough] = clipped_stats(boxes[enough, ::4], axis=1)[0]
            z = z - _upsample(_fill(level.reshape(ny // block, nx // block)), ny, nx)
    values = z[usable]
    return float(clipped_stats(values[:: max(1, values.size // 2_000_000)])[1]) if values.size else float("nan")


def choose_convolved(science_psf: Psf, template_psf: Psf, flavor: str) -> str:
    """Which image the kernel convolves: DESIGN's auto rule compares both axes' second moments."""
    if flavor in ("convolveTemplate", "preconvolution"):
        return "template"
    if flavor == "convolveScience":
        return "science"
    sxx, syy = psf_axes(science_psf)
    txx, tyy = psf_axes(template_psf)
    return "science" if (txx > sxx and tyy > syy) else "template"


def _convolved_psf(psf: Psf, kernel_at, normalize: bool = False) -> Psf:
    """The PSF convolved with ``kernel_at(x, y)`` (a stamp) at each grid node (x, y = None for a
    non-varying PSF), cut to the larger of the two sizes; ``normalize`` rescales each stamp to unit sum."""
    from scipy.signal import fftconvolve

    def one(stamp, k):
        out = fftconvolve(stamp, k, mode="full")
        c, h = out.shape[0] // 2, max(stamp.shape[0], k.shape[0]) // 2
        out = out[c - h : c + h + 1, c - h : c + h + 1]
        return out / out.sum() if normalize else out

    if isinstance(psf, GridPsf):
        return GridPsf(np.array([one(st, kernel_at(x, y)) for st, x, y in zip(psf.stamps, psf.xs, psf.ys)]),
                       psf.xs, psf.ys)
    return ImagePsf(one(psf.stamp(), kernel_at(None, None)))


def _filtered_psf(psf: Psf, kernel: np.ndarray, s1sq: float, s2sq: float, v: np.ndarray | None) -> Psf:
    if isinstance(psf, GridPsf):
        return GridPsf(np.array([filter_stamp(s, kernel, s1sq, s2sq, v) for s in psf.stamps]), psf.xs, psf.ys)
    return ImagePsf(filter_stamp(psf.stamp(), kernel, s1sq, s2sq, v))


def _check_inputs(science: Exposure, template: Exposure, min_overlap: float) -> None:
    if science.shape != template.shape:
        raise BadInputError(f"template shape {template.shape} differs from science shape {science.shape}; "
                            "warp the template onto the science grid first", template.path)
    covered = ~template.plane("NO_DATA") & ~science.plane("NO_DATA")
    frac = covered.mean()
    if frac == 0:
        raise NoOverlapError(f"{template.path or 'template'} does not overlap {science.path or 'science image'}")
    if frac < min_overlap:
        raise NoOverlapError(f"{template.path or 'template'} covers only {100 * frac:.1f}% of "
                             f"{science.path or 'the science image'} (need {100 * min_overlap:.0f}%)")


def _merge_masks(science: Exposure, template_mask: np.ndarray, template_planes: MaskPlanes) -> np.ndarray:
    """Science mask OR the template's, with the template's INJECTED marked INJECTED_TEMPLATE and SAT also
    as SAT_TEMPLATE."""
    planes = science.mask_planes
    out = science.mask.copy()
    for name, bit in template_planes.bits.items():
        sel = (template_mask & (1 << bit)) != 0
        if not sel.any() or name in ("DETECTED", "DETECTED_NEGATIVE"):
            continue
        target = "INJECTED_TEMPLATE" if name == "INJECTED" else name
        out[sel] |= np.int32(planes.bit(target))
        if name == "SAT":
            out[sel] |= np.int32(planes.bit("SAT_TEMPLATE"))
    return out


def _prepared(exp: Exposure, nodata: np.ndarray, background, psf, convolved: bool) -> np.ndarray:
    """The image as the subtraction uses it: NO_DATA at the sky level, and when it is to be
    convolved, BAD/SAT/CR pixels interpolated over."""
    if not convolved:
        return np.where(nodata, background.level, exp.image).astype(np.float32)
    defects = exp.plane("BAD", "SAT", "CR") | nodata
    return interpolate_masked(np.where(nodata, background.level, exp.image), defects & ~nodata, max(psf.sigma, 1.0))


def check_subtraction(diag: SubtractionDiagnostics, science: Exposure, template: Exposure, cfg: SubtractConfig,
                      source: object = None) -> None:
    """Raise BadSubtractionError when the fit shows the images do not match (garbage in must not exit 0)."""
    problems = []
    scale_ok = np.isfinite(diag.star_flux_ratio) and diag.scale_stars >= 10
    if scale_ok and not diag.star_flux_ratio > 3 * diag.scale_error:
        problems.append(f"the stars' fluxes do not match between the images (flux ratio {diag.star_flux_ratio:.3g} "
                        f"+- {diag.scale_error:.2g} from {diag.scale_stars} stars): is the template of this field?")
    if cfg.max_scale_deviation is not None and np.isfinite(science.magzero) and np.isfinite(template.magzero):
        target, conv = (template, science) if diag.convolved == "science" and diag.flavor != "preconvolution" \
            else (science, template)
        expected = 10 ** (0.4 * (target.magzero - conv.magzero))
        if abs(diag.kernel_sum / expected - 1) > cfg.max_scale_deviation:
            problems.append(f"kernel sum {diag.kernel_sum:.4g} is far from the zeropoint ratio {expected:.4g} "
                            f"(MAGZERO {science.magzero:.3f} science, {template.magzero:.3f} template)")
    if diag.residual_rms > cfg.max_stamp_residual_rms:
        problems.append(f"kernel stamps' residual rms is {diag.residual_rms:.2f} sigma (at most "
                        f"{cfg.max_stamp_residual_rms:g}): the kernel cannot match the images")
    if problems:
        raise BadSubtractionError("bad subtraction: " + "; ".join(problems), source)


def subtract(science: Exposure, template: Exposure, config: SubtractConfig | None = None) -> SubtractionResult:
    """PSF-matched difference of ``science`` minus ``template`` (same pixel grid)."""
    cfg = config or SubtractConfig()
    _check_inputs(science, template, cfg.min_overlap_fraction)
    sci_bg = estimate_background(science.image, science.plane("NO_DATA", "BAD", "SAT"))
    tpl_bg = estimate_background(template.image, template.plane("NO_DATA", "BAD", "SAT"))
    sci_psf = science.psf if science.psf is not None else measure_psf(science, background=sci_bg)
    tpl_psf = template.psf if template.psf is not None else measure_psf(template, background=tpl_bg)
    s_scale = variance_scale(science, sci_bg) if cfg.rescale_variance else 1.0
    t_scale = variance_scale(template, tpl_bg) if cfg.rescale_variance else 1.0
    sci_var = science.variance * np.float32(s_scale)
    tpl_var = template.variance * np.float32(t_scale)
    nodata = science.plane("NO_DATA") | template.plane("NO_DATA")
    convolved = choose_convolved(sci_psf, tpl_psf, cfg.flavor)
    # An image that gets convolved must not smear its defects: fill them from their surroundings.
    sci_img = _prepared(science, nodata, sci_bg, sci_psf, convolved == "science" or cfg.flavor == "preconvolution")
    tpl_img = _prepared(template, nodata, tpl_bg, tpl_psf, convolved == "template")

    flavor_used = cfg.flavor if cfg.flavor != "auto" else ("convolveScience" if convolved == "science"
                                                            else "convolveTemplate")
    v = None
    if cfg.flavor == "preconvolution":
        v = sci_psf.stamp()[::-1, ::-1].copy()
        target_img = fft_convolve_many(sci_img, v[None], cfg.workers)[0]
        target_var = fft_convolve_many(sci_var, (v**2)[None], cfg.workers)[0]
        target_psf = _convolved_psf(sci_psf, lambda x, y: v)
        conv_img, conv_var, conv_psf = tpl_img, tpl_var, tpl_psf
    elif convolved == "template":
        target_img, target_var, target_psf = sci_img, sci_var, sci_psf
        conv_img, conv_var, conv_psf = tpl_img, tpl_var, tpl_psf
    else:
        target_img, target_var, target_psf = tpl_img, tpl_var, tpl_psf
        conv_img, conv_var, conv_psf = sci_img, sci_var, sci_psf

    basis = alard_lupton_basis(target_psf.sigma, conv_psf.sigma, tuple(cfg.kernel_degrees))
    half_stamp = basis.size
    positions = select_kernel_candidates(science, template, half_stamp + basis.half,
                                         (cfg.candidate_snr_min, cfg.candidate_snr_max), cfg.max_candidates,
                                         sigma_pix=max(sci_psf.sigma, 1.0), background=sci_bg)
    # v has unit sum, so the preconvolved target has the science image's fluxes: they are measured on the
    # science image itself (a narrower PSF, fewer neighbours in reach, uncorrelated noise)
    sci_side = (sci_img - sci_bg.level, sci_var, sci_psf)
    tpl_side = (tpl_img - tpl_bg.level, tpl_var, tpl_psf)
    target_side, conv_side = (tpl_side, sci_side) if convolved == "science" and v is None else (sci_side, tpl_side)
    scale = measure_photometric_scale(*target_side, *conv_side, positions)
    fit: KernelFit = fit_matching_kernel(
        target_img, target_var, conv_img, conv_var, positions, basis, half_stamp, cfg.spatial_order,
        cfg.background_order, cfg.max_rejection_rounds, cfg.residual_mean_max, cfg.residual_rms_max,
        min_candidates=cfg.min_candidates,
        kernel_sum=scale.scale if cfg.scale_from_stars and scale.trusted else None,
        kernel_sum_error=float(np.hypot(scale.error, FLUX_RATIO_SYSTEMATIC * scale.scale)))
    kernel = fit.kernel
    ks = kernel.kernel_sum
    background = fit.background_image(science.shape)
    matched = convolve_image(conv_img, kernel, cfg.workers) + background
    matched_var = convolve_variance(conv_var, kernel, cfg.workers)
    radius = kernel_footprint_radius(kernel.center_image)

    conv_exp = template if convolved == "template" else science
    conv_mask = convolve_mask(conv_exp.mask, conv_exp.mask_planes.bits, radius)
    if convolved == "template":
        mask = _merge_masks(science, conv_mask, template.mask_planes)
    else:
        mask = _merge_masks(Exposure(science.image, conv_mask, science.variance,
                                     mask_planes=science.mask_planes), template.mask, template.mask_planes)
    diff = target_img - matched
    # Variance planes: the unconvolved input's, and the convolved one's as it is after decorrelation
    # (k_s^2 var) or before it (var * K^2).
    s1sq = float(clipped_stats(target_var[~nodata][::97])[0]) if v is None else float(
        clipped_stats(sci_var[~nodata][::97])[0])
    s2sq = float(clipped_stats(conv_var[~nodata][::97])[0])
    # The PSF of new (science) sources on the difference: the target's, or the science PSF through
    # the kernel when the science image is the convolved one.
    # (The kernel's Gaussian basis cannot rebuild the template's extended wings, so a PSF fit with the
    # template PSF would miss their share of a new source's flux: 7% for Moffat beta = 3 PSFs.)
    source_psf = (_convolved_psf(sci_psf, lambda x, y: kernel.center_image if x is None else kernel.image_at(x, y),
                                 normalize=True) if convolved == "science" and v is None else target_psf)
    if cfg.decorrelate:
        kimg = kernel.center_image
        diff = apply_filter(diff, kimg, s1sq, s2sq, v, cfg.workers)
        if v is None:
            var = target_var + np.float32(ks**2) * conv_var
        else:
            var = fft_convolve_many(sci_var + np.float32(ks**2) * conv_var, (v**2)[None], cfg.workers)[0]
        out_psf = _filtered_psf(source_psf, kimg, s1sq, s2sq, v)
    else:
        var = target_var + matched_var
        out_psf = source_psf
    if convolved == "science" and cfg.flavor != "preconvolution":
        diff = diff / np.float32(-ks)  # D = (K*N + B - R) / k_s: science flux scale
        var = var / np.float32(ks**2)
        matched = (matched - background) / np.float32(ks)
        matched_var = matched_var / np.float32(ks**2)
    h = kernel.size // 2
    mask[:h] |= science.mask_planes.bit("EDGE")
    mask[-h:] |= science.mask_planes.bit("EDGE")
    mask[:, :h] |= science.mask_planes.bit("EDGE")
    mask[:, -h:] |= science.mask_planes.bit("EDGE")
    nodata_out = (mask & science.mask_planes.bit("NO_DATA")) != 0
    diff = np.where(nodata_out, 0, diff).astype(np.float32)
    var = np.where(nodata_out | ~np.isfinite(var), np.nanmedian(var), var).astype(np.float32)

    difference = Exposure(image=diff, mask=mask, variance=var, psf=out_psf, wcs=science.wcs,
                          mask_planes=science.mask_planes, visit=science.visit, detector=science.detector,
                          band=science.band, mjd=science.mjd, exptime=science.exptime, magzero=science.magzero,
                          gain=science.gain, saturate=science.saturate, header=science.header.copy())
    matched_exp = Exposure(image=matched, mask=conv_mask, variance=matched_var,
                           psf=target_psf if convolved == "template" else tpl_psf, wcs=science.wcs,
                           mask_planes=conv_exp.mask_planes, visit=conv_exp.visit, detector=conv_exp.detector,
                           band=conv_exp.band, mjd=conv_exp.mjd, magzero=science.magzero)
    if cfg.flavor == "preconvolution":
        difference.header["SCORE"] = (True, "PSF-filtered difference (preconvolution score)")
    measured_ratio = noise_ratio(difference)
    diff_scale = 1.0
    if cfg.rescale_difference_variance and np.isfinite(measured_ratio) and measured_ratio > 0:
        diff_scale = measured_ratio**2  # what the inputs' variances missed (e.g. correlated noise)
        difference.variance *= np.float32(diff_scale)
    diag = SubtractionDiagnostics(
        flavor=flavor_used, convolved=convolved, kernel_sum=ks, n_candidates=fit.n_candidates,
        n_used=fit.n_used, n_rejected=fit.n_rejected, science_fwhm=sci_psf.fwhm, template_fwhm=tpl_psf.fwhm,
        residual_mean=fit.residual_mean, residual_rms=fit.residual_rms, variance_scale_science=s_scale,
        variance_scale_template=t_scale, noise_ratio=measured_ratio, variance_scale_difference=diff_scale,
        star_flux_ratio=scale.scale, scale_error=scale.error, scale_stars=scale.n_used, free_kernel_sum=fit.free_sum)
    log.info("%s", diag.summary())
    check_subtraction(diag, science, template, cfg, science.path)
    return SubtractionResult(difference, matched_exp, kernel, background,
                             difference if cfg.flavor == "preconvolution" else None, diag,
                             extras={"kernel_positions": fit.positions, "science_psf": sci_psf,
                                     "template_psf": tpl_psf, "background_coeffs": fit.background_coeffs,
                                     "background_model": fit.background})
