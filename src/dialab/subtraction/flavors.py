"""The subtraction flavors, and which image each convolves.

* convolveTemplate:  D = N - K*R - B
* convolveScience:   D = (K*N + B - R) / sum(K)     (on the science flux scale; PSF of the template)
* auto:              convolveScience when the template PSF is wider on both axes, else convolveTemplate
* preconvolution:    S = v*N - K*R - B, v the science PSF; S is flux-conserving with PSF v * P_N and
                     already matched-filtered, so detection thresholds it directly.

``subtract`` runs in named steps, in the manner of LSST ip_diffim's subtractImages:

    prepare_pair -> matching_problem -> select_sources -> fit_kernel -> convolve_pair -> decorrelate -> finalize

Each step takes and returns plain dataclasses, so each can be run, inspected and tested alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..background import Background, clipped_stats, sky_background, sky_subtracted
from ..errors import BadInputError, BadSubtractionError, NoOverlapError
from ..exposure import Exposure, MaskPlanes, bits_present, bits_set
from ..imageops import Chebyshev2D, PlaneSum, convolve_full, fft_convolve, grow_mask, interpolate_masked
from ..moments import adaptive_moments
from ..photometry import with_aperture_correction
from ..psf import Psf, light_radius, map_stamps, measure_psf
from ..stars import psf_filter_sigma
from ..timing import timed
from .basis import (
    MAX_DELTA_SIZE,
    KernelBasis,
    alard_lupton_basis,
    delta_basis,
    delta_core_size,
    delta_kernel_size,
    laplacian_penalty,
)
from .config import FLAVORS, Flavor, SubtractConfig  # noqa: F401 (the flavor names live with the configuration)
from .convolve import NOT_SPREAD, convolve_image, convolve_mask, convolve_variance, kernel_footprint_radius
from .decorrelation import apply_filter, filter_stamp
from .kernel_fit import BRIGHT_SNR, KernelFit, Penalty, fit_matching_kernel, select_kernel_candidates
from .model_kernel import model_basis, model_kernel_terms, psf_matching_kernel
from .noise import every_nth, image_variance_scale, noise_correlation, noise_ratio
from .photometric_scale import FLUX_RATIO_SYSTEMATIC, PhotometricScale, sources_flux_ratio
from .result import SubtractionDiagnostics, SubtractionResult

log = logging.getLogger(__name__)


def psf_covariance(psf: Psf, x: float | None = None, y: float | None = None) -> np.ndarray:
    """Adaptive second-moment matrix [[ixx, ixy], [ixy, iyy]] of the PSF, pixels^2."""
    p = psf.stamp(x=x, y=y)
    c = p.shape[0] // 2
    m = adaptive_moments(p, c, c, max(psf.sigma, 0.5))
    return np.array([[m.ixx, m.ixy], [m.ixy, m.iyy]])


#: Widening (of the matrix of second moments' difference, relative to its trace) below which two PSFs count as
#: crossing: each sharper than the other along some direction.
CROSSING_TOLERANCE = 0.02


def _widening(wider: Psf, narrower: Psf) -> tuple[float, float, float]:
    """The principal values of C_wider - C_narrower (lowest first) and the tolerance below which a negative one
    counts: how far ``narrower`` must widen along each axis to become ``wider``."""
    a, b = psf_covariance(wider), psf_covariance(narrower)
    low, high = np.linalg.eigvalsh(a - b)
    return float(low), float(high), CROSSING_TOLERANCE * float(np.trace(a + b))


def deconvolves(target_psf: Psf, convolved_psf: Psf) -> bool:
    """Whether matching the convolved image to the target narrows its PSF along some direction (C_target -
    C_convolved not positive semi-definite, beyond the crossing tolerance): no kernel then exists, only a fit."""
    low, _, tolerance = _widening(target_psf, convolved_psf)
    return low < -tolerance


def choose_convolved(science_psf: Psf, template_psf: Psf, flavor: str) -> str:
    """Which image the kernel convolves. auto convolves the science image only when the template PSF is wider in
    every direction (C_template - C_science positive definite): then convolving the template would be a
    deconvolution. When neither is wider in every direction (a trailed or astigmatic PSF against a round one),
    every matching kernel deconvolves along some direction: that is logged."""
    low, high, tolerance = _widening(template_psf, science_psf)
    if low < -tolerance and high > tolerance:
        log.warning("the PSFs cross: each is sharper than the other along some direction (second moments differ "
                    "by %+.2f and %+.2f px^2 along their principal axes), so no kernel convolves one into the other "
                    "without deconvolving: expect residuals at bright sources", low, high)
    if flavor in ("convolveTemplate", "preconvolution", "zogy"):
        return "template"  # zogy convolves both; the template is the one whose counts are rescaled
    return "science" if flavor == "convolveScience" or low > 0 else "template"


def flavor_used(flavor: str, convolved: str) -> str:
    """The flavor a run actually used: auto resolves to convolveScience or convolveTemplate."""
    if flavor != "auto":
        return flavor
    return "convolveScience" if convolved == "science" else "convolveTemplate"

@dataclass(frozen=True)
class PreparedPair:
    """Both images as the subtraction uses them: backgrounds and PSFs (given or measured), variances scaled to
    the measured pixel noise, NO_DATA at the sky level and, in an image to be convolved, defects filled."""

    science: Exposure
    template: Exposure
    science_background: Background
    template_background: Background
    science_psf: Psf
    template_psf: Psf
    science_image: np.ndarray
    template_image: np.ndarray
    science_variance: PlaneSum  # the exposure's variance times its scale, scaled as it is read
    template_variance: PlaneSum
    variance_scale_science: float
    variance_scale_template: float
    nodata: np.ndarray
    convolved: str  # "template" or "science": which image the kernel convolves


@dataclass(frozen=True)
class MatchingProblem:
    """What the kernel fit solves: target ~ K * convolved + B. For preconvolution the target is the science
    image filtered by its own reflected PSF, ``prefilter``."""

    target_image: np.ndarray
    target_variance: np.ndarray | PlaneSum
    target_psf: Psf
    convolved_image: np.ndarray
    convolved_variance: PlaneSum
    convolved_psf: Psf
    basis: KernelBasis
    prefilter: np.ndarray | None = None
    model_kernel: np.ndarray | None = None  # the kernel the PSF models imply (delta and psf-models bases)
    convolved_correlation: np.ndarray | None = None  # the convolved image's pixel noise correlation

    @property
    def half_stamp(self) -> int:
        """Kernel stamps' half-size: 1.5 kernel boxes for the smooth Alard-Lupton basis; for a pixel basis the
        box plus 3 sigma of the broader PSF, as a kernel pixel is constrained only by data within the
        source's reach of it (a larger stamp adds cost, not information)."""
        if self.basis.name == "alard-lupton":
            return self.basis.size
        return self.basis.half + max(3, int(np.ceil(3 * max(self.target_psf.sigma, self.convolved_psf.sigma))))

    @property
    def deconvolving(self) -> bool:
        """The target's PSF is the sharper: no kernel matches the convolved image to it."""
        return deconvolves(self.target_psf, self.convolved_psf)


@dataclass(frozen=True)
class KernelSources:
    """Where the kernel is fitted, and the stars' total-flux ratio that the kernel sum should match."""

    positions: np.ndarray  # (n, 2) x, y
    scale: PhotometricScale
    counterparts: tuple[int, int] = (0, 0)  # bright science sources seen in the template, of all (KernelCandidates)


@dataclass(frozen=True)
class ConvolvedPair:
    """The convolved image matched to the target (background added), the raw difference and the masks."""

    matched: np.ndarray | None  # None unless SubtractConfig.keep_matched
    matched_variance: np.ndarray | None  # also None when decorrelating (the difference's variance is not a sum)
    difference: np.ndarray
    mask: np.ndarray  # both images' defects, the convolved one's spread over the kernel footprint
    convolved_mask: np.ndarray | None


@dataclass(frozen=True)
class Decorrelated:
    """The difference with white noise (when asked), its variance plane and the PSF of new sources on it."""

    image: np.ndarray
    variance: np.ndarray
    psf: Psf


def _check_inputs(science: Exposure, template: Exposure, min_overlap: float) -> None:
    if science.shape != template.shape:
        raise BadInputError(f"template shape {template.shape} differs from science shape {science.shape}; "
                            "warp the template onto the science grid first", template.path)
    frac = (~template.plane("NO_DATA") & ~science.plane("NO_DATA")).mean()
    if frac == 0:
        raise NoOverlapError(f"{template.path or 'template'} does not overlap {science.path or 'science image'}")
    if frac < min_overlap:
        raise NoOverlapError(f"{template.path or 'template'} covers only {100 * frac:.1f}% of "
                             f"{science.path or 'the science image'} (need {100 * min_overlap:.0f}%)")


def _filled(exp: Exposure, nodata: np.ndarray, background: Background, psf: Psf, convolved: bool) -> np.ndarray:
    """The image with NO_DATA at the sky level and, when it is to be convolved, BAD/SAT/CR pixels
    interpolated over (a convolution must not smear its defects)."""
    if not convolved:
        if exp.image.dtype == np.float32 and not nodata.any():
            view = exp.image.view()  # nothing to fill: the exposure's own pixels, read-only, not a full-size copy
            view.flags.writeable = False
            return view
        return np.where(nodata, background.level, exp.image).astype(np.float32, copy=False)
    defects = exp.plane("BAD", "SAT", "CR") | nodata
    base = np.where(nodata, background.level, exp.image) if nodata.any() else exp.image  # interpolate_masked copies
    return interpolate_masked(base, defects & ~nodata, max(psf.sigma, 1.0))


def prepare_pair(science: Exposure, template: Exposure, cfg: SubtractConfig) -> PreparedPair:
    """Step 1: check the overlap, estimate backgrounds, PSFs and variance scales, choose the convolved image."""
    _check_inputs(science, template, cfg.min_overlap_fraction)
    sci_bg, tpl_bg = sky_background(science), sky_background(template)
    sci_psf = science.psf if science.psf is not None else measure_psf(science)
    tpl_psf = template.psf if template.psf is not None else measure_psf(template)
    if cfg.aperture_correction:  # before any model is convolved or filtered: they inherit it
        sci_psf, tpl_psf = with_aperture_correction(science, sci_psf), with_aperture_correction(template, tpl_psf)
    s_scale = image_variance_scale(science) if cfg.rescale_variance else 1.0
    t_scale = image_variance_scale(template) if cfg.rescale_variance else 1.0
    nodata = science.plane("NO_DATA") | template.plane("NO_DATA")
    convolved = choose_convolved(sci_psf, tpl_psf, cfg.flavor)
    science_convolved = convolved == "science" or cfg.flavor in ("preconvolution", "zogy")
    return PreparedPair(
        science, template, sci_bg, tpl_bg, sci_psf, tpl_psf,
        _filled(science, nodata, sci_bg, sci_psf, science_convolved),
        _filled(template, nodata, tpl_bg, tpl_psf, convolved == "template"),
        PlaneSum((science.variance, s_scale)), PlaneSum((template.variance, t_scale)), s_scale, t_scale,
        nodata, convolved)


def _convolved_stamp(stamp: np.ndarray, kernel: np.ndarray, normalize: bool = False) -> np.ndarray:
    """stamp * kernel, cut to 1.5x the larger of the two sizes; ``normalize`` rescales it to unit sum.

    The convolution is broader than either: cut to the stamp's size, a measured PSF convolved with itself
    (preconvolution's target) lost 1.6% of its light, and the renormalised cut put its peak, and so every score
    flux, that much high. At 1.5x it keeps 99.9%; the whole convolution (2x) would double the cost of every
    later use of the model.
    """
    out = convolve_full(stamp, kernel)
    c, h = out.shape[0] // 2, min(3 * max(stamp.shape[0], kernel.shape[0]) // 4, out.shape[0] // 2)
    out = out[c - h : c + h + 1, c - h : c + h + 1]
    return out / out.sum() if normalize else out


def preconvolution_filter(psf: Psf) -> np.ndarray:
    """Preconvolution's filter: the science PSF, reflected, cut to a kernel's largest box (``MAX_DELTA_SIZE``) and
    renormalised. The kernel must carry the filter's wings into the template (K ~ v * the matching kernel): beyond
    its reach they stay in the target only, the fitted sum falls short by their light and every star leaves a
    halo. The NIRCam WebbPSF models (211 px, 10% of their light beyond 12 px) put the kernel sum at 0.931 against
    convolveTemplate's 0.990; cut to 31 px, 0.984. A filter a little short of the PSF's far wings costs the score
    a trifle of its S/N."""
    return psf.stamp(min(psf.default_size, MAX_DELTA_SIZE))[::-1, ::-1].copy()


def matching_problem(pair: PreparedPair, cfg: SubtractConfig) -> MatchingProblem:
    """Step 2: which image is the target and which is convolved (the flavor), and the kernel basis."""
    science = (pair.science_image, pair.science_variance, pair.science_psf)
    template = (pair.template_image, pair.template_variance, pair.template_psf)
    v = None
    if cfg.flavor == "preconvolution":
        v = preconvolution_filter(pair.science_psf)
        target = (fft_convolve(pair.science_image, v, cfg.workers),
                  fft_convolve(pair.science_variance, v**2, cfg.workers),
                  map_stamps(pair.science_psf, lambda st, x, y: _convolved_stamp(st, v)))
        conv = template
    else:
        target, conv = (science, template) if pair.convolved == "template" else (template, science)
    correlation = noise_correlation(pair.science if pair.convolved == "science" and v is None else pair.template) \
        if cfg.correct_convolved_noise else None
    if cfg.kernel_basis == "alard-lupton":
        basis = alard_lupton_basis(target[2].sigma, conv[2].sigma, tuple(cfg.kernel_degrees))
        return MatchingProblem(*target, *conv, basis, v, None, correlation)
    size = cfg.kernel_size or delta_kernel_size(target[2].sigma, conv[2].sigma,
                                                max(light_radius(target[2].stamp()), light_radius(conv[2].stamp())))
    size |= 1
    pixels = delta_basis(size)  # the model kernel is solved in it, pixel by pixel
    model = psf_matching_kernel(target[2], conv[2], pixels)
    basis = (delta_basis(size, delta_core_size(target[2].sigma, conv[2].sigma)) if cfg.kernel_basis == "delta"
             else model_basis(model))
    return MatchingProblem(*target, *conv, basis, v, model, correlation)


#: Memory for the kernel stamps' normal matrices of a pixel basis (about 8 (n + 10)^2 bytes each).
STAMP_MATRIX_BUDGET = 300e6


def max_kernel_stamps(basis: KernelBasis, cfg: SubtractConfig) -> int:
    """The configured cap, lowered for a large pixel basis so the stamps' normal matrices fit the budget."""
    per_stamp = 8.0 * (basis.n + 10) ** 2
    return max(cfg.min_candidates, min(cfg.max_candidates, int(STAMP_MATRIX_BUDGET / per_stamp)))


def select_sources(pair: PreparedPair, problem: MatchingProblem, cfg: SubtractConfig) -> KernelSources:
    """Step 3: unsaturated sources seen in both images (compact ones only with ``kernel_sources: compact``), and
    the stars' flux ratio from the compact ones."""
    basis = problem.basis
    candidates = select_kernel_candidates(pair.science, pair.template, problem.half_stamp + basis.half,
                                          (cfg.candidate_snr_min, cfg.candidate_snr_max), max_kernel_stamps(basis, cfg),
                                          sigma_pix=psf_filter_sigma(pair.science_psf),
                                          compact_only=cfg.kernel_sources == "compact", max_compact=cfg.max_candidates)
    # v has unit sum, so the preconvolved target has the science image's fluxes: they are measured on the
    # science image itself (a narrower PSF, fewer neighbours in reach, uncorrelated noise)
    sci_side = (sky_subtracted(pair.science_image, pair.science_background), pair.science_variance, pair.science_psf)
    tpl_side = (sky_subtracted(pair.template_image, pair.template_background), pair.template_variance,
                pair.template_psf)
    target_side, conv_side = (tpl_side, sci_side) if pair.convolved == "science" else (sci_side, tpl_side)
    return KernelSources(candidates.positions, sources_flux_ratio(*target_side, *conv_side, candidates.compact),
                         candidates.counterparts)


#: The highest spatial order ``spatial_order: auto`` tries.
MAX_SPATIAL_ORDER = 2


def _pixel_penalty(problem: MatchingProblem, cfg: SubtractConfig) -> Penalty:
    """A delta kernel's penalty: smoothness, and a pull towards the PSF models' kernel (its spatial variation
    included) only where that kernel convolves: a deconvolving one rings, and pulled the kernel sum of a sharper
    science image's convolveTemplate fit to 0.26-0.54 (hsc-sprint-mini)."""
    if not (cfg.kernel_prior and not problem.deconvolving):
        return Penalty(laplacian_penalty(problem.basis), relative=cfg.regularization)
    ny, nx = problem.target_image.shape
    terms = model_kernel_terms(problem.target_psf, problem.convolved_psf, delta_basis(problem.basis.size),
                               Chebyshev2D(highest_spatial_order(cfg), nx, ny), problem.model_kernel)
    return Penalty(laplacian_penalty(problem.basis, terms[0]), relative=cfg.regularization,
                   variation=tuple(laplacian_penalty(problem.basis, t, variation=True) for t in terms[1:]))


def fit_kernel(problem: MatchingProblem, sources: KernelSources, cfg: SubtractConfig) -> KernelFit:
    """Step 4: the spatially varying kernel and differential background, the sum held at the stars' ratio
    when a free fit disagrees with it (see ``kernel_fit``)."""
    scale = sources.scale
    penalty = _pixel_penalty(problem, cfg) if problem.basis.name == "delta" else None
    return fit_matching_kernel(
        problem.target_image, problem.target_variance, problem.convolved_image, problem.convolved_variance,
        sources.positions, problem.basis, problem.half_stamp, highest_spatial_order(cfg), cfg.background_order,
        cfg.max_rejection_rounds, cfg.residual_mean_max, cfg.residual_rms_max, min_candidates=cfg.min_candidates,
        kernel_sum=scale.scale if cfg.scale_from_stars and scale.overrides(problem.deconvolving) else None,
        kernel_sum_error=float(np.hypot(scale.error, FLUX_RATIO_SYSTEMATIC * scale.scale)), penalty=penalty,
        noise_correlation=problem.convolved_correlation, correct_noise=cfg.correct_convolved_noise,
        choose_order=cfg.spatial_order == "auto")


def highest_spatial_order(cfg: SubtractConfig) -> int:
    """The kernel's spatial order, or the highest one tried when it is chosen from the stamps (a prior's variation
    for it holds those of the lower orders: the spatial terms are ordered by degree)."""
    return MAX_SPATIAL_ORDER if cfg.spatial_order == "auto" else cfg.spatial_order


def merge_masks(science_mask: np.ndarray, planes: MaskPlanes, template_mask: np.ndarray,
                template_planes: MaskPlanes, template_spread: int = 0, copy: bool = True) -> np.ndarray:
    """The science mask OR the template's, with the template's INJECTED marked INJECTED_TEMPLATE and SAT also
    as SAT_TEMPLATE (its DETECTED planes left out). ``template_spread``: the template's defect planes spread over
    a box of that half-width first (``convolve_mask`` of the template, without its full-size copy); ``copy``
    False writes into ``science_mask``."""
    out = science_mask.copy() if copy else science_mask
    present = bits_present(template_mask)
    for name, bit in template_planes.bits.items():
        if name in ("DETECTED", "DETECTED_NEGATIVE") or not present & (1 << bit):
            continue
        sel = bits_set(template_mask, 1 << bit)
        if not sel.any():
            continue
        if template_spread > 0 and name not in NOT_SPREAD:
            sel = grow_mask(sel, template_spread)
        target = planes.bit("INJECTED_TEMPLATE" if name == "INJECTED" else name)
        if name == "SAT":
            target |= planes.bit("SAT_TEMPLATE")
        np.bitwise_or(out, out.dtype.type(target), out=out, where=sel)  # no gathered copy of the selected pixels
    return out


def convolve_pair(pair: PreparedPair, problem: MatchingProblem, fit: KernelFit, cfg: SubtractConfig) -> ConvolvedPair:
    """Step 5: K * convolved + B, its variance, the raw difference target - matched, and the merged mask.

    Without ``cfg.keep_matched`` the difference is written over the matched image, whose variance is convolved
    only when the difference's variance is their sum (not decorrelating)."""
    kernel = fit.kernel
    matched = convolve_image(problem.convolved_image, kernel, cfg.workers)
    fit.add_background(matched)  # in place: no third full-size buffer
    matched_var = convolve_variance(problem.convolved_variance, kernel, cfg.workers) \
        if cfg.keep_matched or not cfg.decorrelate else None
    radius = kernel_footprint_radius(kernel.center_image)
    science, template = pair.science, pair.template
    # without the matched image its spread mask is not kept: the merged mask is the one full-size mask made
    if pair.convolved == "template":
        conv_mask = convolve_mask(template.mask, template.mask_planes.bits, radius) if cfg.keep_matched else None
        mask = merge_masks(science.mask, science.mask_planes, template.mask if conv_mask is None else conv_mask,
                           template.mask_planes, template_spread=radius if conv_mask is None else 0)
    else:
        conv_mask = convolve_mask(science.mask, science.mask_planes.bits, radius)
        mask = merge_masks(conv_mask, science.mask_planes, template.mask, template.mask_planes, copy=cfg.keep_matched)
    if not cfg.keep_matched:
        return ConvolvedPair(None, matched_var, np.subtract(problem.target_image, matched, out=matched), mask, None)
    return ConvolvedPair(matched, matched_var, problem.target_image - matched, mask, conv_mask)


def decorrelate(pair: PreparedPair, problem: MatchingProblem, fit: KernelFit, convolved: ConvolvedPair,
                cfg: SubtractConfig) -> Decorrelated:
    """Step 6: whiten the difference's noise (DMTN-021) and find the PSF of new sources on it.

    The variance planes: the unconvolved input's, and the convolved one's as it is after decorrelation
    (k_s^2 var) or before it (var * K^2). When decorrelating, ``convolved.difference`` is overwritten by the result.
    """
    kernel, ks, v = fit.kernel, fit.kernel.kernel_sum, problem.prefilter
    usable = ~pair.nodata
    # every 97th usable pixel, a block of rows at a time (no full-size gather of the usable pixels)
    s1sq = float(clipped_stats(every_nth(problem.target_variance if v is None else pair.science_variance, usable,
                                         97))[0])
    s2sq = float(clipped_stats(every_nth(problem.convolved_variance, usable, 97))[0])
    # The PSF of new (science) sources on the difference: the target's, or the science PSF through the kernel
    # when the science image is the convolved one. (The kernel's Gaussian basis cannot rebuild the template's
    # extended wings, so a PSF fit with the template PSF would miss their share of a new source's flux: 7% for
    # Moffat beta = 3 PSFs.)
    if pair.convolved == "science":
        source_psf = map_stamps(pair.science_psf, lambda st, x, y: _convolved_stamp(
            st, kernel.center_image if x is None else kernel.image_at(x, y), normalize=True))
    else:
        source_psf = problem.target_psf
    if not cfg.decorrelate:
        variance = PlaneSum((problem.target_variance, 1), (convolved.matched_variance, 1)).full()
        return Decorrelated(convolved.difference, variance, source_psf)
    kimg = kernel.center_image
    # in place: the raw difference becomes the decorrelated one (no later step reads it), a full-size buffer fewer
    image = apply_filter(convolved.difference, kimg, s1sq, s2sq, v, cfg.workers, out=convolved.difference)
    if v is None:
        variance = PlaneSum((problem.convolved_variance, ks**2), (problem.target_variance, 1)).full()
    else:
        variance = fft_convolve(PlaneSum((pair.science_variance, 1), (problem.convolved_variance, ks**2)), v**2,
                                cfg.workers)
    return Decorrelated(image, variance, map_stamps(source_psf, lambda st, x, y: filter_stamp(st, kimg, s1sq, s2sq, v)))


def finalize(pair: PreparedPair, problem: MatchingProblem, sources: KernelSources, fit: KernelFit,
             convolved: ConvolvedPair, decorrelated: Decorrelated, cfg: SubtractConfig) -> SubtractionResult:
    """Step 7: the science flux scale, EDGE and NO_DATA, the exposures, the diagnostics and their checks."""
    science, ks = pair.science, fit.kernel.kernel_sum
    diff, var = decorrelated.image, decorrelated.variance
    matched, matched_var = convolved.matched, convolved.matched_variance
    if pair.convolved == "science":  # in place: the buffers are the steps' own, no full-size copies at the peak
        diff /= np.float32(-ks)  # D = (K*N + B - R) / k_s: science flux scale
        var /= np.float32(ks**2)
        if matched is not None:
            fit.add_background(matched, -1.0)  # the convolved science alone, on its own flux scale
            matched /= np.float32(ks)
            matched_var /= np.float32(ks**2)
    mask = convolved.mask
    h = fit.kernel.size // 2
    edge = np.int32(science.mask_planes.bit("EDGE"))
    mask[:h] |= edge
    mask[-h:] |= edge
    mask[:, :h] |= edge
    mask[:, -h:] |= edge
    difference = Exposure(image=diff, mask=mask, variance=var, psf=decorrelated.psf, wcs=science.wcs,
                          mask_planes=science.mask_planes, visit=science.visit, detector=science.detector,
                          band=science.band, mjd=science.mjd, exptime=science.exptime, magzero=science.magzero,
                          gain=science.gain, saturate=science.saturate, header=science.header.copy())
    nodata_out = difference.plane("NO_DATA")
    diff[nodata_out] = 0  # the step's own buffers, changed in place: no full-size copies at the peak
    unusable = nodata_out | ~np.isfinite(var)
    if unusable.any():
        var[unusable] = np.nanmedian(var)
    del nodata_out, unusable  # before noise_ratio's own
    matched_exp = None if matched is None else _matched_exposure(pair, problem, convolved)
    if cfg.flavor == "preconvolution":
        difference.header["SCORE"] = (True, "PSF-filtered difference (preconvolution score)")
    measured_ratio = noise_ratio(difference)
    diff_scale = 1.0
    if cfg.rescale_difference_variance and np.isfinite(measured_ratio) and measured_ratio > 0:
        diff_scale = measured_ratio**2  # what the inputs' variances missed (e.g. correlated noise)
        difference.variance *= np.float32(diff_scale)
    diag = SubtractionDiagnostics(
        flavor=flavor_used(cfg.flavor, pair.convolved), convolved=pair.convolved, kernel_sum=ks,
        n_candidates=fit.n_candidates, n_used=fit.n_used, n_rejected=fit.n_rejected,
        science_fwhm=pair.science_psf.fwhm, template_fwhm=pair.template_psf.fwhm, residual_mean=fit.residual_mean,
        residual_rms=fit.residual_rms, variance_scale_science=pair.variance_scale_science,
        variance_scale_template=pair.variance_scale_template, noise_ratio=measured_ratio,
        variance_scale_difference=diff_scale, star_flux_ratio=sources.scale.scale, scale_error=sources.scale.error,
        scale_stars=sources.scale.n_used, scale_method=sources.scale.method, free_kernel_sum=fit.free_sum,
        kernel_basis=problem.basis.name, kernel_size=problem.basis.size, regularization=fit.regularization,
        kernel_spatial_order=fit.kernel.spatial.order, deconvolving=problem.deconvolving,
        bright_in_template=sources.counterparts[0], bright_sources=sources.counterparts[1])
    log.info("%s", diag.summary())
    check_subtraction(diag, science, pair.template, cfg, science.path)
    return SubtractionResult(difference, matched_exp, fit.kernel, difference if cfg.flavor == "preconvolution" else None,
                             diag, science_psf=pair.science_psf, template_psf=pair.template_psf,
                             kernel_positions=fit.positions, background_coeffs=fit.background_coeffs,
                             background_model=fit.background)


def _matched_exposure(pair: PreparedPair, problem: MatchingProblem, convolved: ConvolvedPair) -> Exposure:
    """The convolved input on the target's PSF and the science flux scale, with its own spread mask."""
    science = pair.science
    conv_exp = pair.template if pair.convolved == "template" else science
    return Exposure(image=convolved.matched, mask=convolved.convolved_mask, variance=convolved.matched_variance,
                    psf=problem.target_psf if pair.convolved == "template" else pair.template_psf,
                    wcs=science.wcs, mask_planes=conv_exp.mask_planes, visit=conv_exp.visit,
                    detector=conv_exp.detector, band=conv_exp.band, mjd=conv_exp.mjd, magzero=science.magzero)


#: The counterpart check (``check_subtraction``): with at least MIN_BRIGHT_CHECKED bright science sources, fewer than
#: this fraction of them in the template means another field. A template of the same field rolled by a few hundred
#: pixels shows 5% of them (chance neighbours); real pairs (DECam, pyDIA, NIRCam, properimage, HSC-like) 75-100%, a
#: truth pair with 400 transients per Mpix (a third of its bright sources) 50%.
MIN_BRIGHT_CHECKED = 10
MIN_COUNTERPART_FRACTION = 0.25


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
    seen, bright = diag.bright_in_template, diag.bright_sources
    if bright >= MIN_BRIGHT_CHECKED and seen < MIN_COUNTERPART_FRACTION * bright:
        problems.append(f"only {seen} of the science image's {bright} bright sources (S/N >= {BRIGHT_SNR:g}) show in "
                        "the template: is the template of this field?")
    if diag.residual_rms > cfg.max_stamp_residual_rms:
        problems.append(f"kernel stamps' residual rms is {diag.residual_rms:.2f} sigma (at most "
                        f"{cfg.max_stamp_residual_rms:g}): the kernel cannot match the images")
    if problems:
        raise BadSubtractionError("bad subtraction: " + "; ".join(problems), source)


def subtract_alard_lupton(science: Exposure, template: Exposure, config: SubtractConfig | None = None) -> SubtractionResult:
    """PSF-matched (Alard & Lupton) difference of ``science`` minus ``template`` in the configured flavor
    (convolveTemplate, convolveScience, auto or preconvolution); arguments, result and errors as for
    :func:`dialab.subtract`, which calls it.

    Runs the named steps ``prepare_pair -> matching_problem -> select_sources -> fit_kernel -> convolve_pair
    -> decorrelate -> finalize``.
    """
    cfg = config or SubtractConfig()
    with timed("prepare_pair"):
        pair = prepare_pair(science, template, cfg)
    # each full-size input of a step is dropped once no later step reads it: fewer buffers alive at the peak
    for background in (pair.science_background, pair.template_background):
        background.release()  # the skies: later steps read stamps and windows of them from their meshes
    with timed("matching_problem"):
        problem = matching_problem(pair, cfg)
    with timed("select_sources"):
        sources = select_sources(pair, problem, cfg)
    pair = replace(pair, science_image=None, template_image=None)  # the problem holds those it convolves
    with timed("fit_kernel"):
        fit = fit_kernel(problem, sources, cfg)
    with timed("convolve_pair"):
        convolved = convolve_pair(pair, problem, fit, cfg)
    problem = replace(problem, target_image=None, convolved_image=None)
    if cfg.decorrelate and problem.prefilter is not None:  # the score's variance is the science's, filtered anew
        problem = replace(problem, target_variance=None)
    with timed("decorrelate"):
        decorrelated = decorrelate(pair, problem, fit, convolved, cfg)
    pair = replace(pair, science_variance=None, template_variance=None)
    problem = replace(problem, target_variance=None, convolved_variance=None)
    convolved = replace(convolved, difference=None)
    with timed("finalize"):
        return finalize(pair, problem, sources, fit, convolved, decorrelated, cfg)
