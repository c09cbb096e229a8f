"""The photometric scale of a matching kernel (its sum), measured from the stars' fluxes in both images.

A least-squares kernel fit treats the convolved image as noiseless; its noise attenuates the fitted kernel
(regression dilution), and a kernel that cannot reach the broader PSF's wings misses their share of the
flux: on simulated pairs of known flux ratio the free sum was 1-3.6% off. The ratio is measured apart:
each star's flux in each image from a sum weighted by the other image's PSF (so that both sums see the
same PSF and any neighbour's light alike), the ratio from the brightest and faintest thirds of the stars
(linear in both images, so unbiased by either's noise, with an intercept for residual backgrounds), with
heavy blends left out. The kernel fit then
keeps its own sum where it agrees with the ratio and is held at the ratio where it does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..background import sky_background, sky_subtracted
from ..imageops import aperture_sum, stamp_index
from ..psf import encircled_fraction, resize_stamp
from ..stars import find_stars, psf_filter_sigma


@dataclass(frozen=True)
class PhotometricScale:
    """Flux ratio target / convolved of point sources, with its error and the stars behind it."""

    scale: float
    error: float
    n_stars: int
    n_used: int
    chi2_dof: float
    method: str = "weighted"  # the stars' fluxes: "weighted" (PSF-calibrated) or "aperture" (one common aperture)

    @property
    def trusted(self) -> bool:
        """Enough stars agree, precisely enough, that the ratio and its scatter-based error can override a kernel
        fit (whose own sum is off by about 1% where it is off at all)."""
        return self.overrides(deconvolving=False)

    def overrides(self, deconvolving: bool) -> bool:
        """Whether the ratio may override a kernel fit's sum: ``trusted``, or, against a fit that deconvolves (the
        target's PSF the sharper), good to ``MAX_TRUSTED_ERROR_DECONVOLVING``."""
        limit = MAX_TRUSTED_ERROR_DECONVOLVING if deconvolving else MAX_TRUSTED_ERROR
        return bool(np.isfinite(self.scale) and self.n_used >= MIN_TRUSTED_STARS
                    and self.error <= limit * abs(self.scale))

    @property
    def consistent_fraction(self) -> float:
        """Fraction of the stars whose fluxes agree with the scale: low when the images show different skies."""
        return self.n_used / self.n_stars if self.n_stars else 0.0


#: Width of the flux weights (the other image's PSF smoothed by a Gaussian), in sigmas of the broader PSF: wide enough
#: that errors of the PSF models' cores barely enter, narrow enough to keep most of a weighted fit's precision.
WEIGHT_SIGMAS = 2.5


#: Fractional systematic error of the ratio, added to its own (scatter-based) error in quadrature before the kernel
#: fit compares its free sum with it (``kernel_fit.SUM_HOLD_SIGMAS``). Given PSF models are unit-sum stamps: the
#: light beyond each stamp is left out of its image's flux scale, and where the two differ (Kolmogorov x Airy
#: stamps of 41 px, FWHM 3 to 4 px: 1.43% and 1.64%), the ratio carries it (0.1-0.2% on truth pairs).
FLUX_RATIO_SYSTEMATIC = 0.001

#: Fewest agreeing stars for the ratio to override a kernel fit: with fewer, its error (from their own scatter)
#: is itself too uncertain (a crowded 512^2 test field: 9 stars, 2.8 "sigma" off; an HSC-like 1024^2 CCD with
#: fakes: 18 stars, which put a free convolveScience sum of 0.80 right at 1.043 +- 0.014, truth 1.044).
MIN_TRUSTED_STARS = 12

#: Largest fractional error of a ratio that may override a kernel fit's sum (a template whose measured PSF was 20%
#: too broad gave 8.9 +- 5.7%, and the sum was held at it).
MAX_TRUSTED_ERROR = 0.008

#: The same against a kernel fit that deconvolves: such a fit has no right answer, and its free sum came out 3.3-4.5%
#: high on truth pairs whose science PSF was 25% sharper, so a ratio good to 3% is the better scale.
MAX_TRUSTED_ERROR_DECONVOLVING = 0.03


def aperture_fluxes(image: np.ndarray, variance: np.ndarray, positions: np.ndarray,
                    radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Aperture sums and errors at (x, y) on a background-subtracted image; NaN where the aperture leaves it.

    No local sky annulus: in a crowded field neighbours fill it, and its mean is then far noisier than the
    smooth background model, while a median is not linear (see the module docstring).
    """
    ny, nx = image.shape
    flux = np.full(len(positions), np.nan)
    err = np.full(len(positions), np.nan)
    for i, (x, y) in enumerate(np.asarray(positions, float)):
        if radius <= x < nx - 1 - radius and radius <= y < ny - 1 - radius:
            flux[i], err[i] = aperture_sum(image, variance, x, y, radius)
    return flux, err


def _rank(f_t, e_t, f_c, e_c, r0: float) -> np.ndarray:
    """Ranking variable for the thirds: both fluxes combined so that its noise moves f_t and r0 f_c alike
    (cov(noise_t, rank) = r0 cov(noise_c, rank)), which keeps the noise of the ranking out of the slope."""
    return (r0 * e_c**2 * f_t + e_t**2 * f_c) / (e_t**2 + r0**2 * e_c**2)


def _bartlett_slope(f_t, e_t, f_c, e_c, r0: float) -> tuple[float, float, float]:
    """Slope, offset and the thirds' separation of f_t = r f_c + c from the means of the brightest and faintest
    thirds (Bartlett 1949).

    Linear in both images, so neither image's noise dilutes it (a regression of f_t on f_c is biased low by the
    errors of f_c), and a constant offset in either image (a background model that took up the sources'
    faint wings, more for the broader PSF) goes into c, not r.
    """
    order = np.argsort(_rank(f_t, e_t, f_c, e_c, r0))
    k = max(len(order) // 3, 1)
    lo, hi = order[:k], order[-k:]
    dc = float(f_c[hi].mean() - f_c[lo].mean())
    r = float((f_t[hi].mean() - f_t[lo].mean()) / dc) if dc > 0 else r0
    return r, float(f_t.mean() - r * f_c.mean()), dc


def fit_flux_ratio(f_target: np.ndarray, e_target: np.ndarray, f_conv: np.ndarray, e_conv: np.ndarray,
                   clip: float = 5.0, rounds: int = 5) -> PhotometricScale:
    """r in f_target = r f_conv + c from the stars that agree with it (``_bartlett_slope``).

    Stars farther than ``clip`` robust spreads from the line (variables, transients, blends) are left out.
    The error comes from the stars' own scatter about the line (which includes what their photon errors
    miss: neighbours, PSF-model errors).
    """
    ok = np.isfinite(f_target) & np.isfinite(f_conv) & (e_target > 0) & (e_conv > 0)
    n_stars = int(ok.sum())
    if n_stars < 6:
        return PhotometricScale(float("nan"), float("nan"), n_stars, 0, float("nan"))
    used = ok.copy()
    r = float(np.median(f_target[ok] / f_conv[ok]))
    c = 0.0
    for _ in range(rounds):
        r, c, _ = _bartlett_slope(f_target[used], e_target[used], f_conv[used], e_conv[used], r)
        z = (f_target - r * f_conv - c) / np.sqrt(e_target**2 + r**2 * e_conv**2)
        spread = max(1.4826 * float(np.median(np.abs(z[used] - np.median(z[used])))), 1.0)
        new = ok & (np.abs(z - np.median(z[used])) < clip * spread)
        if new.sum() < 6 or (new == used).all():
            break
        used = new
    r, c, dc = _bartlett_slope(f_target[used], e_target[used], f_conv[used], e_conv[used], r)
    resid = f_target[used] - r * f_conv[used] - c
    z = resid / np.sqrt(e_target[used] ** 2 + r**2 * e_conv[used] ** 2)
    chi2_dof = float(np.sum(z**2) / max(int(used.sum()) - 2, 1))
    # error of the grouped slope: the residual scatter over the thirds' separation
    k = max(int(used.sum()) // 3, 1)
    error = float(np.std(resid) * np.sqrt(2.0 / k) / dc) if dc > 0 else float("nan")
    return PhotometricScale(r, error, n_stars, int(used.sum()), chi2_dof)


#: Most neighbour light under a star's weight, as a fraction of its own flux, for the star to measure the ratio.
#: The cross-convolved weights let neighbours into both images' sums alike, so they no longer bias the ratio;
#: only heavy blends are left out, whose light beyond the core leans on the PSF models' wings. (With one Gaussian
#: weight for both images the limit was 3%, and it kept half as many stars: 178 against 341 of a 2048^2 truth pair.)
MAX_NEIGHBOUR_LIGHT_WEIGHTED = 0.2


def _uncrowded(weighted, weighted_err, core, core_err, tolerance: float = MAX_NEIGHBOUR_LIGHT_WEIGHTED) -> np.ndarray:
    """Stars whose weighted flux agrees with their core's (each calibrated to total with the PSF) within
    ``tolerance`` of it and three errors: no heavy blend under the weight."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(weighted - core) < tolerance * np.abs(core) + 3 * np.hypot(weighted_err, core_err)


def _centroids(target_img, conv_img, positions: np.ndarray, sigma: float, h: int) -> np.ndarray:
    """Sub-pixel centres from the Gaussian-weighted first moment of the two images' sum (two iterations)."""
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    out = np.asarray(positions, float).copy()
    ny, nx = target_img.shape
    for i, (x, y) in enumerate(np.asarray(positions, int)):
        if not (h <= x < nx - h and h <= y < ny - h):
            continue
        cut = target_img[y - h : y + h + 1, x - h : x + h + 1] + conv_img[y - h : y + h + 1, x - h : x + h + 1]
        dx = dy = 0.0
        for _ in range(2):
            w = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sigma**2)) * cut
            total = w.sum()
            if not total > 0:
                break
            dx, dy = float(np.clip((w * xx).sum() / total, -1, 1)), float(np.clip((w * yy).sum() / total, -1, 1))
        out[i] = (x + dx, y + dy)
    return out


def _smoothed(stamps: np.ndarray, sigma: float, h: int) -> np.ndarray:
    """Each (n, s, s) stamp convolved with a unit-peak Gaussian of ``sigma``, on a (2h + 1)^2 grid of the same
    centre: two products with one sampled Gaussian matrix (separable)."""
    n = stamps.shape[1] // 2
    out_off, in_off = np.arange(-h, h + 1, dtype=float), np.arange(-n, n + 1, dtype=float)
    g = np.exp(-((out_off[:, None] - in_off[None, :]) ** 2) / (2 * sigma**2))
    return np.einsum("ab,kbc,dc->kad", g, stamps, g, optimize=True)


def cross_weighted_fluxes(target_img, target_var, target_psf, conv_img, conv_var, conv_psf, centres: np.ndarray,
                          sigma_g: float, h: int):
    """Fluxes of point sources in two images, each weighted by the *other* image's PSF (at the source's sub-pixel
    phase) smoothed by a Gaussian of ``sigma_g``, flipped: each sum is the cross-convolved image
    (I_t * P_c * G, and I_c * P_t * G) at the source, and both share the PSF P_t * P_c * G.

    So the light of every source under the weight, the star's own and any neighbour's or galaxy's, enters both
    sums alike (a separate weight per image let a crowded field's neighbours into the broader image's sum more:
    +0.2-0.3% on the stars' ratio of a noise-free field of 1500 stars per Mpix), and a blur both PSF models miss
    (drizzling, jitter) cancels. Both sums are divided by the same sum(W_t P_t), which puts them on the scale of
    total fluxes without changing their ratio. Returns (target flux, error, convolved flux, error), NaN where the
    window leaves either image.
    """
    ny, nx = target_img.shape
    centres = np.asarray(centres, float).reshape(-1, 2)
    out = np.full((4, len(centres)), np.nan)
    x, y = centres[:, 0], centres[:, 1]
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix >= h) & (ix < nx - h) & (iy >= h) & (iy < ny - h)
    if not inside.any():
        return tuple(out)
    x, y, ix, iy = x[inside], y[inside], ix[inside], iy[inside]
    dx, dy = x - ix, y - iy
    p_t = target_psf.draw_many(dx, dy, x, y).astype(float)
    p_c = conv_psf.draw_many(dx, dy, x, y).astype(float)
    w_t = _smoothed(p_c, sigma_g, h)[:, ::-1, ::-1]
    w_c = _smoothed(p_t, sigma_g, h)[:, ::-1, ::-1]
    norm = np.einsum("kij,kij->k", w_t, resize_stamp(p_t, 2 * h + 1))
    at, _ = stamp_index(ix, iy, h, target_img.shape)  # every window lies on the image
    for row, (img, var, w) in enumerate(((target_img, target_var, w_t), (conv_img, conv_var, w_c))):
        out[2 * row, inside] = np.einsum("kij,kij->k", w, img[at]) / norm
        out[2 * row + 1, inside] = np.sqrt(np.einsum("kij,kij,kij->k", w, w, var[at])) / norm
    return tuple(out)


def measure_photometric_scale(target_img, target_var, target_psf, conv_img, conv_var, conv_psf,
                              positions: np.ndarray) -> PhotometricScale:
    """Total-flux ratio target / convolved of the point sources at ``positions`` (the kernel candidates).

    Each star's flux in each image is a sum weighted by the other image's PSF (``cross_weighted_fluxes``, of width
    about ``WEIGHT_SIGMAS`` x the broader PSF's sigma, at the star's sub-pixel centre), so neither the two PSFs'
    difference nor the neighbours' light enters the ratio; a residual background offset goes into the fit's
    intercept. Stars with much neighbour light under the weight (``_uncrowded``) are left out.
    """
    sigma_b = max(target_psf.sigma, conv_psf.sigma)
    h = int(np.ceil(4 * WEIGHT_SIGMAS * sigma_b))
    centres = _centroids(target_img, conv_img, positions, sigma_b, h)
    sigma_g = sigma_b * np.sqrt(WEIGHT_SIGMAS**2 - 1)  # with the PSF's own width: WEIGHT_SIGMAS x sigma_b
    ft, et, fc, ec = cross_weighted_fluxes(target_img, target_var, target_psf, conv_img, conv_var, conv_psf, centres,
                                           sigma_g, h)
    keep = np.ones(len(positions), bool)
    for img, var, psf, fw, ew in ((target_img, target_var, target_psf, ft, et), (conv_img, conv_var, conv_psf, fc, ec)):
        core = max(psf.fwhm, 1.5)
        f_core, e_core = aperture_fluxes(img, var, centres, core)
        ee = encircled_fraction(psf.stamp(), core)
        keep &= _uncrowded(fw, ew, f_core / ee, e_core / ee)
    # crowded stars would bias the ratio: in a field with too few others it stays unknown (the kernel fit decides)
    return fit_flux_ratio(*(np.where(keep, a, np.nan) for a in (ft, et, fc, ec)))


#: Radius of the common aperture, in FWHM of the broader PSF: Kolmogorov x Airy PSFs of FWHM ratio 1.33 differ in
#: encircled energy by 1.2-1.5% at 2 FWHM, 0.3-0.35% at 4, 0.2-0.23% at 5 and 0.13-0.17% at 6; a wider aperture
#: gathers more sky noise and more neighbours.
APERTURE_FWHM = 5.0

#: Most light of neighbours in a source's common aperture, as a fraction of its own (from its core flux and the
#: PSF's encircled energy): neighbours carry the same flux ratio, but the part of their light that the two PSFs
#: spread across the aperture's edge does not, and in a field where every aperture holds several (a dense star
#: field's edge, a cluster) that biased the ratio by 0.8%.
MAX_NEIGHBOUR_LIGHT = 0.5


def aperture_flux_ratio(target_img, target_var, target_psf, conv_img, conv_var, conv_psf,
                        positions: np.ndarray) -> PhotometricScale:
    """Flux ratio target / convolved from each source's flux in one common aperture (``APERTURE_FWHM`` x the broader
    FWHM) in both background-subtracted images: no PSF model's normalisation enters, only the two PSFs' encircled
    energies at that radius. For PSFs measured from the stars, whose stamps miss 2-6% of the light (a different
    share in each image), this is the ratio to trust; sources with more than ``MAX_NEIGHBOUR_LIGHT`` of their
    own light from neighbours in the aperture are left out."""
    sigma = max(target_psf.sigma, conv_psf.sigma)
    radius = APERTURE_FWHM * max(target_psf.fwhm, conv_psf.fwhm)
    centres = _centroids(target_img, conv_img, positions, sigma, int(np.ceil(4 * sigma)))
    ft, et = aperture_fluxes(target_img, target_var, centres, radius)
    core = max(target_psf.fwhm, 1.5)
    own = aperture_fluxes(target_img, target_var, centres, core)[0] / encircled_fraction(target_psf.stamp(), core)
    with np.errstate(invalid="ignore", divide="ignore"):
        alone = (own > 0) & (ft - own < MAX_NEIGHBOUR_LIGHT * own)
    fit = fit_flux_ratio(np.where(alone, ft, np.nan), et, *aperture_fluxes(conv_img, conv_var, centres, radius))
    return dataclasses.replace(fit, method="aperture")


def sources_flux_ratio(target_img, target_var, target_psf, conv_img, conv_var, conv_psf,
                       positions: np.ndarray) -> PhotometricScale:
    """The flux ratio to hold a kernel sum at: PSF-calibrated weighted fluxes (``measure_photometric_scale``, the
    more precise) when both PSFs are given models, common apertures (``aperture_flux_ratio``) when either was
    measured from the stars (``Psf.from_stars``), whose normalisation put the weighted ratio 1-2% off on plain
    FITS pairs."""
    measured = target_psf.from_stars or conv_psf.from_stars
    ratio = aperture_flux_ratio if measured else measure_photometric_scale
    return ratio(target_img, target_var, target_psf, conv_img, conv_var, conv_psf, positions)


def exposure_flux_ratio(target, conv) -> PhotometricScale:
    """Flux ratio target / conv of the stars of two exposures on one pixel grid, both with PSFs: counts of one
    image per count of the other, for when their zeropoints are not both known."""
    bgs = [sky_background(e) for e in (target, conv)]
    stars = find_stars(target, psf_filter_sigma(target.psf), 20.0)
    stars = stars.select(stars.clean)
    positions = np.column_stack([np.round(stars.x), np.round(stars.y)]).astype(int)
    return sources_flux_ratio(sky_subtracted(target.image, bgs[0]), target.variance, target.psf,
                              sky_subtracted(conv.image, bgs[1]), conv.variance, conv.psf, positions)
