"""The photometric scale of a matching kernel (its sum), measured from stars with errors in both images.

A least-squares kernel fit treats the convolved image as noiseless; its noise attenuates the fitted
kernel (regression dilution: 1-3% low when the convolved image is the noisier one), and a kernel that
cannot reach the broader PSF's wings misses their share of the flux. The scale is therefore measured
apart, as the ratio of the stars' total fluxes, by maximum likelihood for a line through the origin
with errors in both coordinates, and the kernel's shape is fitted with its sum held at that value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar


@dataclass(frozen=True)
class PhotometricScale:
    """Flux ratio target / convolved of point sources, with its error and the stars behind it."""

    scale: float
    error: float
    n_stars: int
    n_used: int
    chi2_dof: float

    @property
    def consistent_fraction(self) -> float:
        """Fraction of the stars whose fluxes agree with the scale: low when the images show different skies."""
        return self.n_used / self.n_stars if self.n_stars else 0.0


def _aperture_geometry(radius: float, sky_width: float = 6.0) -> tuple[int, np.ndarray, np.ndarray]:
    """Half-size of the cut, the aperture (r <= radius) and the sky annulus (radius + 2 .. + sky_width)."""
    r_out = radius + 2.0 + sky_width
    h = int(np.ceil(r_out))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r2 = xx**2 + yy**2
    return h, r2 <= radius**2, (r2 >= (radius + 2.0) ** 2) & (r2 <= r_out**2)


def aperture_fraction(stamp: np.ndarray, radius: float) -> float:
    """The fraction of a point source's total flux that ``aperture_fluxes`` measures: the PSF's encircled
    fraction, less the wing light that the annulus mean takes for sky (as far as the stamp reaches)."""
    h, inner, annulus = _aperture_geometry(radius)
    n = stamp.shape[0] // 2
    full = np.zeros((2 * h + 1, 2 * h + 1))
    m = min(n, h)
    full[h - m : h + m + 1, h - m : h + m + 1] = stamp[n - m : n + m + 1, n - m : n + m + 1]
    full /= stamp.sum()
    return float(full[inner].sum() - inner.sum() * full[annulus].mean())


def aperture_fluxes(image: np.ndarray, variance: np.ndarray, positions: np.ndarray, radius: float,
                    sky_width: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Circular-aperture fluxes and errors at integer (x, y), the sky the mean of an annulus beyond the aperture."""
    h, inner, annulus = _aperture_geometry(radius, sky_width)
    flux = np.full(len(positions), np.nan)
    err = np.full(len(positions), np.nan)
    ny, nx = image.shape
    for i, (x, y) in enumerate(np.asarray(positions, int)):
        if x < h or y < h or x >= nx - h or y >= ny - h:
            continue
        cut = image[y - h : y + h + 1, x - h : x + h + 1]
        var = variance[y - h : y + h + 1, x - h : x + h + 1]
        # the annulus *mean*: every step must be linear in the image, so that the ratio of two images' fluxes
        # is their flux ratio whatever their noise (a median of neighbours' light plus noise depends on the noise)
        sky = cut[annulus].mean()
        n = inner.sum()
        flux[i] = cut[inner].sum() - n * sky
        err[i] = np.sqrt(var[inner].sum() + n**2 * var[annulus].sum() / annulus.sum() ** 2)
    return flux, err


def fit_flux_ratio(f_target: np.ndarray, e_target: np.ndarray, f_conv: np.ndarray, e_conv: np.ndarray,
                   clip: float = 4.0, rounds: int = 5) -> PhotometricScale:
    """Maximum-likelihood r in f_target = r f_conv with Gaussian errors on both, outliers clipped.

    chi2(r) = sum (f_t - r f_c)^2 / (e_t^2 + r^2 e_c^2): unlike a regression of f_t on f_c, it is not
    biased by the errors of f_c.
    """
    # no cut on either flux: selecting on a noisy flux would bias the ratio itself
    ok = np.isfinite(f_target) & np.isfinite(f_conv) & (e_target > 0) & (e_conv > 0)
    n_stars = int(ok.sum())
    if n_stars < 3:
        return PhotometricScale(float("nan"), float("nan"), n_stars, 0, float("nan"))
    used = ok.copy()
    r = float(np.median(f_target[ok] / f_conv[ok]))
    for _ in range(rounds):
        ft, et, fc, ec = f_target[used], e_target[used], f_conv[used], e_conv[used]

        def chi2(s, ft=ft, et=et, fc=fc, ec=ec):
            return float(np.sum((ft - s * fc) ** 2 / (et**2 + s**2 * ec**2)))

        lo, hi = (0.2 * r, 5 * r) if r > 0 else (-10.0, 10.0)
        r = float(minimize_scalar(chi2, bounds=(min(lo, hi), max(lo, hi)), method="bounded",
                                  options={"xatol": 1e-7 * max(abs(r), 1e-3)}).x)
        z = (f_target - r * f_conv) / np.sqrt(e_target**2 + r**2 * e_conv**2)
        # a robust scale of the pulls: real stars scatter beyond their photon noise (PSF wings, blends)
        spread = max(1.4826 * float(np.median(np.abs(z[used]))), 1.0)
        new = ok & (np.abs(z) < clip * spread)
        if new.sum() < 3 or (new == used).all():
            break
        used = new
    z = (f_target - r * f_conv) / np.sqrt(e_target**2 + r**2 * e_conv**2)
    dof = max(int(used.sum()) - 1, 1)
    chi2_dof = float(np.sum(z[used] ** 2) / dof)
    fisher = np.sum(f_conv[used] ** 2 / (e_target[used] ** 2 + r**2 * e_conv[used] ** 2))
    error = float(np.sqrt(max(chi2_dof, 1.0) / fisher))
    return PhotometricScale(r, error, n_stars, int(used.sum()), chi2_dof)


def measure_photometric_scale(target_img, target_var, target_psf, conv_img, conv_var, conv_psf,
                              positions: np.ndarray) -> PhotometricScale:
    """Total-flux ratio target / convolved of the point sources at ``positions`` (the kernel candidates).

    Apertures of 3 FWHM of the broader PSF, each corrected to total flux with its own PSF (encircled
    fraction, wing light in the sky annulus), so that a difference in PSF wings does not enter the ratio.
    """
    fwhm = max(target_psf.fwhm, conv_psf.fwhm)
    radius = 3.0 * fwhm
    ft, et = aperture_fluxes(target_img, target_var, positions, radius)
    fc, ec = aperture_fluxes(conv_img, conv_var, positions, radius)
    ee_t = aperture_fraction(target_psf.stamp(), radius)
    ee_c = aperture_fraction(conv_psf.stamp(), radius)
    return fit_flux_ratio(ft / ee_t, et / ee_t, fc / ee_c, ec / ee_c)
