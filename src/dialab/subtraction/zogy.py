"""ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016): the difference D, its PSF P_D, and the score
S_corr with the source-noise and astrometric-registration variance terms.

With N = F_n T * P_n and R = F_r T * P_r (F_n = 1: science counts), in Fourier space::

    den = sigma_n^2 F_r^2 |P_r|^2 + sigma_r^2 F_n^2 |P_n|^2
    D = (F_r P_r N - F_n P_n R) / sqrt(den) / F_D,   F_D = F_r F_n / sqrt(sigma_n^2 F_r^2 + sigma_r^2 F_n^2)
    P_D = F_r F_n P_r P_n / (F_D sqrt(den))
    S = k_n N - k_r R,   k_n = F_n F_r^2 conj(P_n) |P_r|^2 / den,   k_r = F_r F_n^2 conj(P_r) |P_n|^2 / den

D is here divided by F_D, so a transient of flux f (science counts) is f P_D on it: PSF photometry on D with
P_D measures f directly. S is the matched-filtered D; its variance is propagated per pixel from both inputs'
variance planes (so bright stars' photon noise is in it), and the registration term
sigma_x^2 ((d/dx k_n N)^2 + (d/dx k_r R)^2) + (the same in y) is added: S_corr = S / sqrt(V_S + V_ast).

Images of any shape are cut into tiles, each computed with the PSFs at its centre (with a margin of twice the
PSF size) on a zero-padded fast FFT size (no wrap-around), and blended with linear ramps across the tile
boundaries, weights summing to one: a spatially varying PSF is followed at the tile scale. Defects are
filled before the FFTs (``prepare_pair``) and the masks grown after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import fft

from ..background import clipped_stats
from ..exposure import Exposure
from ..imageops import PlaneSum, default_workers
from ..moments import adaptive_moments
from ..psf import GridPsf, ImagePsf, Psf
from .config import SubtractConfig
from .convolve import convolve_mask
from .flavors import check_subtraction, fit_kernel, matching_problem, merge_masks, prepare_pair, select_sources
from .noise import every_nth, noise_ratio
from .result import SubtractionDiagnostics, SubtractionResult

log = logging.getLogger(__name__)

#: Tile core size (pixels): the PSF is taken as constant over a tile, at the tile's centre.
TILE_PIX = 512
#: Width of the linear blend across tile boundaries (pixels).
BLEND_PIX = 64
#: Largest half-size of the P_D stamp.
MAX_PSF_HALF = 50


@dataclass(frozen=True)
class ZogyInputs:
    """Background-free, defect-filled images on one grid, their variance planes, PSFs and calibration."""

    science: np.ndarray
    template: np.ndarray
    science_variance: np.ndarray
    template_variance: np.ndarray
    science_psf: Psf
    template_psf: Psf
    flux_ratio: float  # F_r / F_n: template counts per science count
    sigma_n: float  # background noise of the science image
    sigma_r: float  # background noise of the template
    registration: tuple[float, float]  # sigma_x, sigma_y of the stars' position differences (pixels)


@dataclass
class _Planes:
    """Full-image sums of the tiles' weighted outputs."""

    difference: np.ndarray
    difference_variance: np.ndarray
    score: np.ndarray
    score_variance: np.ndarray


def _embed(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The stamp on a grid of ``shape`` with its centre at pixel (0, 0) (wrapped), for a zero-phase FFT."""
    out = np.zeros(shape)
    h = stamp.shape[0] // 2
    out[:stamp.shape[0], :stamp.shape[1]] = stamp
    return np.roll(out, (-h, -h), axis=(0, 1))


def _convolve_ft(image_ft: np.ndarray, kernel_ft: np.ndarray, shape, workers) -> np.ndarray:
    return fft.irfft2(image_ft * kernel_ft, s=shape, workers=workers)


def _denominator(pn: np.ndarray, pr: np.ndarray, z: ZogyInputs) -> np.ndarray:
    """sigma_n^2 F_r^2 |P_r|^2 + sigma_r^2 F_n^2 |P_n|^2 (F_n = 1), floored where both PSFs have no power
    left (a Gaussian's transform underflows), so the filters stay finite there."""
    den = z.sigma_n**2 * z.flux_ratio**2 * np.abs(pr) ** 2 + z.sigma_r**2 * np.abs(pn) ** 2
    return np.maximum(den, 1e-12 * den.max())


def _zogy_tile(n, r, vn, vr, pn_stamp, pr_stamp, z: ZogyInputs, workers: int):
    """D (science units), Var(D), S (science units: a source of flux f peaks at f), Var(S) incl. registration,
    and the PSF of D, for one tile padded to a fast FFT size."""
    ny, nx = n.shape
    size = pn_stamp.shape[0] + pr_stamp.shape[0]
    shape = (fft.next_fast_len(ny + size, real=True), fft.next_fast_len(nx + size, real=True))
    fr, fn = z.flux_ratio, 1.0
    pn = fft.rfft2(_embed(pn_stamp, shape), workers=workers)
    pr = fft.rfft2(_embed(pr_stamp, shape), workers=workers)
    den = _denominator(pn, pr, z)
    root = np.sqrt(den)
    f_d = fr * fn / np.sqrt(z.sigma_n**2 * fr**2 + z.sigma_r**2 * fn**2)
    n_ft = fft.rfft2(n, s=shape, workers=workers)
    r_ft = fft.rfft2(r, s=shape, workers=workers)
    d_n, d_r = fr * pr / (root * f_d), fn * pn / (root * f_d)
    k_n = fn * fr**2 * np.conj(pn) * np.abs(pr) ** 2 / den
    k_r = fr * fn**2 * np.conj(pr) * np.abs(pn) ** 2 / den
    f_s = float(fft.irfft2(k_n * pn, s=shape, workers=workers)[0, 0])  # S at a unit point source of N

    def squared(kernel_ft):
        return fft.rfft2(fft.irfft2(kernel_ft, s=shape, workers=workers) ** 2, workers=workers)

    cut = (slice(0, ny), slice(0, nx))
    vn_ft, vr_ft = fft.rfft2(vn, s=shape, workers=workers), fft.rfft2(vr, s=shape, workers=workers)
    d = _convolve_ft(n_ft, d_n, shape, workers) - _convolve_ft(r_ft, d_r, shape, workers)
    var_d = _convolve_ft(vn_ft, squared(d_n), shape, workers) + _convolve_ft(vr_ft, squared(d_r), shape, workers)
    s_n, s_r = _convolve_ft(n_ft, k_n, shape, workers), _convolve_ft(r_ft, k_r, shape, workers)
    var_s = _convolve_ft(vn_ft, squared(k_n), shape, workers) + _convolve_ft(vr_ft, squared(k_r), shape, workers)
    sx, sy = z.registration
    for plane in (s_n, s_r):
        gy, gx = np.gradient(plane)
        var_s += sx**2 * gx**2 + sy**2 * gy**2
    p_d = np.fft.fftshift(fft.irfft2(fr * fn * pr * pn / (f_d * root), s=shape, workers=workers))
    c0, c1 = shape[0] // 2, shape[1] // 2
    # P_D reaches as far as both PSFs together: cut at their summed reach, so its wings are not lost
    h = min(pn_stamp.shape[0] // 2 + pr_stamp.shape[0] // 2, MAX_PSF_HALF, c0, c1)
    psf_d = p_d[c0 - h : c0 + h + 1, c1 - h : c1 + h + 1]
    return (d[cut], var_d[cut], (s_n - s_r)[cut] / f_s, var_s[cut] / f_s**2, psf_d / psf_d.sum())


def _tile_weights(length: int, edges: np.ndarray, ramp: int) -> list[np.ndarray]:
    """Weights of the tiles whose cores are [edges[k], edges[k + 1]) along one axis: 1 in the core, linear ramps
    ``ramp`` pixels wide across each inner boundary; they sum to one everywhere."""
    x = np.arange(length, dtype=float) + 0.5
    out = []
    for k in range(len(edges) - 1):
        w = np.ones(length)
        if k > 0:
            w = np.minimum(w, np.clip((x - edges[k]) / ramp + 0.5, 0, 1))
        if k < len(edges) - 2:
            w = np.minimum(w, np.clip((edges[k + 1] - x) / ramp + 0.5, 0, 1))
        out.append(w)
    return out


def _edges(length: int, varying: bool) -> np.ndarray:
    """Tile core boundaries: one tile when the PSFs do not vary, else cores of about TILE_PIX."""
    n = int(np.ceil(length / TILE_PIX)) if varying else 1
    return np.round(np.linspace(0, length, n + 1)).astype(int)


def zogy_planes(z: ZogyInputs, workers: int | None = None) -> tuple[_Planes, Psf]:
    """D, Var(D), S, Var(S) over the whole image, tile by tile, and P_D (a GridPsf at the tile centres when the
    PSFs vary)."""
    workers = workers or default_workers()
    ny, nx = z.science.shape
    varying = isinstance(z.science_psf, GridPsf) or isinstance(z.template_psf, GridPsf)
    ey, ex = _edges(ny, varying), _edges(nx, varying)
    wy, wx = _tile_weights(ny, ey, BLEND_PIX), _tile_weights(nx, ex, BLEND_PIX)
    margin = 2 * max(z.science_psf.default_size, z.template_psf.default_size)
    out = _Planes(*(np.zeros((ny, nx), np.float32) for _ in range(4)))
    stamps, xs, ys = [], [], []
    for j in range(len(ey) - 1):
        rows = np.flatnonzero(wy[j] > 0)
        y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, ny)
        y = (ey[j] + ey[j + 1] - 1) / 2
        for i in range(len(ex) - 1):
            cols = np.flatnonzero(wx[i] > 0)
            x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, nx)
            x = (ex[i] + ex[i + 1] - 1) / 2
            box = (slice(y0, y1), slice(x0, x1))
            pn = z.science_psf.stamp(x=x, y=y) if varying else z.science_psf.stamp()
            pr = z.template_psf.stamp(x=x, y=y) if varying else z.template_psf.stamp()
            tile = _zogy_tile(z.science[box], z.template[box], z.science_variance[box], z.template_variance[box],
                              pn, pr, z, workers)
            weight = np.outer(wy[j][y0:y1], wx[i][x0:x1])
            for plane, value in zip((out.difference, out.difference_variance, out.score, out.score_variance), tile):
                plane[box] += weight * value
            stamps.append(tile[4])
            xs.append(x)
            ys.append(y)
    psf = GridPsf(np.array(stamps), np.array(xs), np.array(ys)) if len(stamps) > 1 else ImagePsf(stamps[0])
    # D is on the science's flux scale, its sources' PSF the science's through ZOGY's filters
    return out, psf.with_aperture_correction(z.science_psf.aperture_correction)


#: A filled defect is flagged as far out as D's filter for its image exceeds this fraction of its peak.
DEFECT_FRACTION = 1e-2


def defect_reach(z: ZogyInputs) -> tuple[int, int]:
    """How far (pixels) a filled defect of the science and of the template reaches into D: the half-width of the
    box where D's filter for each image exceeds ``DEFECT_FRACTION`` of its peak (at the PSFs of the image
    centre). The filter of the image with the wider PSF is nearly a delta function, so its defects stay where
    they are; the other's is about the PSF core. Truncated PSF stamps (an Airy pattern's or a Gaussian's cut at
    a few sigma) make these filters ring at a low level far out: the reach is capped at two FWHM of the wider
    PSF, beyond which a filled defect's leak is well below the noise."""
    size = 4 * max(z.science_psf.default_size, z.template_psf.default_size)
    shape = (fft.next_fast_len(size), fft.next_fast_len(size))
    pn = np.fft.fft2(_embed(z.science_psf.stamp(), shape))
    pr = np.fft.fft2(_embed(z.template_psf.stamp(), shape))
    root = np.sqrt(_denominator(pn, pr, z))
    reach = []
    for filt in (z.flux_ratio * pr / root, pn / root):
        kernel = np.abs(np.fft.fftshift(np.real(np.fft.ifft2(filt))))
        cy, cx = np.unravel_index(np.argmax(kernel), kernel.shape)
        yy, xx = np.nonzero(kernel > DEFECT_FRACTION * kernel.max())
        reach.append(int(max(np.abs(yy - cy).max(), np.abs(xx - cx).max())))
    cap = int(np.ceil(2 * max(z.science_psf.fwhm, z.template_psf.fwhm)))
    return min(reach[0], cap), min(reach[1], cap)


def registration_noise(science: np.ndarray, template: np.ndarray, positions: np.ndarray, sigma: float,
                       min_stars: int = 10) -> tuple[float, float]:
    """Robust scatter (pixels) of the stars' centre differences between the images, per axis: the residual
    registration error that makes bright stars leave dipoles (0 when too few stars measure it)."""
    h = int(np.ceil(4 * max(sigma, 1.0)))
    ny, nx = science.shape
    dx, dy = [], []
    for x, y in np.asarray(positions, int):
        if not (h <= x < nx - h and h <= y < ny - h):
            continue
        a = adaptive_moments(science[y - h : y + h + 1, x - h : x + h + 1], h, h, sigma)
        b = adaptive_moments(template[y - h : y + h + 1, x - h : x + h + 1], h, h, sigma)
        if a.converged and b.converged:
            dx.append(a.x - b.x)
            dy.append(a.y - b.y)
    if len(dx) < min_stars:
        return 0.0, 0.0
    return tuple(float(clipped_stats(np.asarray(v))[1]) for v in (dx, dy))


def _kernel_flux_ratio(pair, problem, sources, cfg: SubtractConfig) -> float:
    """The flux ratio science / template from an Alard-Lupton kernel fitted the way that convolves: the template
    matched to the science, or, when the science PSF is the sharper, the science matched to the template and the
    sum inverted (a deconvolving fit has no right answer: its sum came out 3-4% high on truth pairs)."""
    if not problem.deconvolving:
        return fit_kernel(problem, sources, cfg).kernel.kernel_sum
    flipped = replace(pair, convolved="science")
    flipped_cfg = cfg.model_copy(update={"flavor": "convolveScience"})
    flipped_problem = matching_problem(flipped, flipped_cfg)
    flipped_sources = select_sources(flipped, flipped_problem, flipped_cfg)
    return 1.0 / fit_kernel(flipped_problem, flipped_sources, flipped_cfg).kernel.kernel_sum


def zogy_subtract(science: Exposure, template: Exposure, cfg: SubtractConfig) -> SubtractionResult:
    """The ZOGY flavor: D (``difference``, PSF P_D, science flux scale) and S_corr (``score``: an image whose
    S/N is S_corr), the template in science units as ``matched_image``."""
    pair = prepare_pair(science, template, cfg)
    problem = matching_problem(pair, cfg)
    sources = select_sources(pair, problem, cfg)
    scale = sources.scale
    free = float("nan")  # the A&L kernel's sum, when it decides (too few clean stars for the ratio)
    if not (cfg.scale_from_stars and scale.overrides(problem.deconvolving)):
        free = _kernel_flux_ratio(pair, problem, sources, cfg)
    ratio = scale.scale if np.isnan(free) else free
    usable = ~pair.nodata
    sci = np.where(pair.nodata, np.float32(0), pair.science_image - pair.science_background.level)
    tpl = np.where(pair.nodata, np.float32(0), pair.template_image - pair.template_background.level)
    z = ZogyInputs(sci, tpl, pair.science_variance, pair.template_variance, pair.science_psf, pair.template_psf,
                   flux_ratio=1.0 / ratio,
                   sigma_n=float(np.sqrt(clipped_stats(every_nth(pair.science_variance, usable, 97))[0])),
                   sigma_r=float(np.sqrt(clipped_stats(every_nth(pair.template_variance, usable, 97))[0])),
                   registration=registration_noise(sci, tpl, sources.positions, pair.science_psf.sigma))
    for background in (pair.science_background, pair.template_background):
        background.release()  # read for the last time above: neither sky plane is held at the peak
    pair = replace(pair, science_image=None, template_image=None)  # nor the filled images
    planes, psf_d = zogy_planes(z, cfg.workers)
    return _zogy_result(pair, z, planes, psf_d, sources, ratio, free, cfg)


def _zogy_result(pair, z: ZogyInputs, planes: _Planes, psf_d: Psf, sources, ratio: float, free: float,
                 cfg: SubtractConfig) -> SubtractionResult:
    science, template = pair.science, pair.template
    planes_bits = science.mask_planes
    reach = max(z.science_psf.default_size, z.template_psf.default_size) // 2
    reach_n, reach_r = defect_reach(z)
    mask = merge_masks(convolve_mask(science.mask, planes_bits.bits, reach_n), planes_bits,
                       convolve_mask(template.mask, template.mask_planes.bits, reach_r), template.mask_planes)
    edge = np.zeros(mask.shape, bool)
    edge[:reach], edge[-reach:], edge[:, :reach], edge[:, -reach:] = True, True, True, True
    mask[edge] |= np.int32(planes_bits.bit("EDGE"))
    nodata = (mask & planes_bits.bit("NO_DATA")) != 0
    fill = float(np.median(planes.difference_variance[~nodata])) if (~nodata).any() else 1.0

    def exposure(image, variance, psf, header):
        return Exposure(image=np.where(nodata, 0, image).astype(np.float32), mask=mask.copy(),
                        variance=np.where(nodata | ~(variance > 0), fill, variance).astype(np.float32), psf=psf,
                        wcs=science.wcs, mask_planes=planes_bits, visit=science.visit, detector=science.detector,
                        band=science.band, mjd=science.mjd, exptime=science.exptime, magzero=science.magzero,
                        gain=science.gain, saturate=science.saturate, header=header)

    difference = exposure(planes.difference, planes.difference_variance, psf_d, science.header.copy())
    score_header = science.header.copy()
    score_header["SCORE"] = (True, "ZOGY S_corr: image / sqrt(variance) is the score")
    score = exposure(planes.score, planes.score_variance, psf_d, score_header)
    matched = Exposure(image=(z.template * ratio).astype(np.float32), mask=template.mask,
                       variance=PlaneSum((z.template_variance, ratio**2)).full(), psf=z.template_psf,
                       wcs=science.wcs, mask_planes=template.mask_planes, visit=template.visit,
                       detector=template.detector, band=template.band, mjd=template.mjd, magzero=science.magzero)
    scale = sources.scale
    diag = SubtractionDiagnostics(
        flavor="zogy", convolved="both", kernel_sum=float(ratio), n_candidates=len(sources.positions),
        n_used=int(scale.n_used), n_rejected=0, science_fwhm=pair.science_psf.fwhm,
        template_fwhm=pair.template_psf.fwhm, residual_mean=float("nan"), residual_rms=float("nan"),
        variance_scale_science=pair.variance_scale_science, variance_scale_template=pair.variance_scale_template,
        noise_ratio=noise_ratio(difference), variance_scale_difference=1.0, star_flux_ratio=scale.scale,
        scale_error=scale.error, scale_stars=scale.n_used, scale_method=scale.method,
        free_kernel_sum=float(free), bright_in_template=sources.counterparts[0], bright_sources=sources.counterparts[1])
    log.info("%s; registration noise %.3f, %.3f px", diag.summary(), *z.registration)
    check_subtraction(diag, science, template, cfg, science.path)
    return SubtractionResult(difference, matched, None, score, diag,
                             science_psf=pair.science_psf, template_psf=pair.template_psf,
                             kernel_positions=sources.positions, background_coeffs=np.zeros(0))
