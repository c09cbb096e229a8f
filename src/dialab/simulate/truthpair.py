"""A science/template pair whose every calibration number is known: the yardstick of the measurements.

Both images share one pixel grid (no warp, so nothing but the measurement is tested). The PSF is a
Kolmogorov atmosphere through an Airy telescope, its FWHM varying linearly across the CCD and a
little elliptical; compact bright galaxies outnumber stars at the kernel candidates' magnitudes, as
in any deep high-latitude field. The template has its own PSF, depth and zeropoint, so the true
kernel sum (science counts per template count for one source) is ``flux_ratio``. Transients of
known flux sit in the science image only.
"""

from __future__ import annotations

import galsim
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ..exposure import Exposure
from ..psf import GridPsf
from .render import add_noise, random_star_field


class TruthPairSpec(BaseModel):
    """A science/template pair on one pixel grid whose every calibration number is known: the yardstick of PSF,
    kernel-sum and flux measurements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, int] = Field((1024, 1024), description="(ny, nx) pixels; science and template share the grid")
    science_fwhm: float = Field(4.0, gt=0, description="science PSF FWHM (pixels) at the image centre")
    template_fwhm: float = Field(3.4, gt=0, description="template PSF FWHM (pixels) at the image centre")
    fwhm_gradient: float = Field(0.06, ge=0, lt=1, description="fractional FWHM change from centre to left/right edge")
    ellipticity: float = Field(0.04, ge=0, lt=0.5, description="PSF shear g1 (g2 is minus half of it)")
    n_stars: int = Field(120, ge=0, description="stars, log-uniform in flux")
    n_galaxies: int = Field(400, ge=0, description="compact exponential galaxies, sizes comparable to the PSF")
    n_transients: int = Field(60, ge=0, description="point sources in the science image only")
    sky: float = Field(600.0, ge=0, description="science sky counts per pixel (subtracted, its noise kept)")
    gain: float = Field(2.0, gt=0, description="electrons per count")
    read_noise_e: float = Field(5.0, ge=0, description="read noise, electrons")
    depth: float = Field(3.0, gt=0, description="template exposure relative to the science")
    flux_ratio: float = Field(0.8, gt=0, description="science counts per template count of one source: the true "
                              "kernel sum of convolveTemplate")
    magzero: float = Field(30.0, description="AB magnitude of one science count")
    airy_lam_over_diam: float = Field(0.9, gt=0, description="the telescope's diffraction scale lambda/D, pixels")


def psf_profile(spec: TruthPairSpec, fwhm: float, x: float) -> galsim.GSObject:
    """The PSF at column ``x``: Kolmogorov (FWHM scaled across the CCD) through the Airy pattern, sheared."""
    nx = spec.shape[1]
    scale = 1.0 + spec.fwhm_gradient * (2.0 * x / (nx - 1) - 1.0)
    atmosphere = galsim.Kolmogorov(fwhm=fwhm * scale)
    optics = galsim.Airy(lam_over_diam=spec.airy_lam_over_diam, obscuration=0.3)
    return galsim.Convolve(atmosphere, optics).shear(g1=spec.ellipticity, g2=-0.5 * spec.ellipticity)


def true_psf(spec: TruthPairSpec, fwhm: float, nodes: int = 5, size: int = 41) -> GridPsf:
    """The effective (pixel-integrated) PSF on a grid of ``nodes`` x 3 positions."""
    ny, nx = spec.shape
    xs = np.linspace(0, nx - 1, nodes)
    ys = np.linspace(0, ny - 1, 3)
    stamps, cx, cy = [], [], []
    for y in ys:
        for x in xs:
            stamps.append(psf_profile(spec, fwhm, x).drawImage(nx=size, ny=size, scale=1.0).array)
            cx.append(x)
            cy.append(y)
    return GridPsf(np.array(stamps), np.array(cx), np.array(cy))


def light_within(spec: TruthPairSpec, x, y, radius: float, fwhm: float | None = None) -> np.ndarray:
    """Share of a point source's light at each (x, y) in the pixels whose centres lie within ``radius`` of it
    (as an aperture sum counts them): the truth that aperture-corrected PSF fluxes are calibrated to.
    ``fwhm``: the PSF's at the centre (default the science's)."""
    c = int(np.ceil(radius)) + 2
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1]
    out = []
    for xi, yi in zip(np.atleast_1d(x), np.atleast_1d(y)):
        dx, dy = xi - round(xi), yi - round(yi)
        stamp = psf_profile(spec, fwhm or spec.science_fwhm, xi).drawImage(nx=2 * c + 1, ny=2 * c + 1, scale=1.0,
                                                                           offset=(dx, dy)).array
        out.append(stamp[(xx - dx) ** 2 + (yy - dy) ** 2 <= radius**2].sum())
    return np.array(out)


def _draw(canvas: galsim.ImageF, profile: galsim.GSObject, x: float, y: float) -> None:
    stamp = profile.drawImage(scale=1.0, center=galsim.PositionD(x + 1, y + 1))
    bounds = stamp.bounds & canvas.bounds
    if bounds.isDefined():
        canvas[bounds] += stamp[bounds]


def simulate_truth_pair(spec: TruthPairSpec | None = None, seed: int = 1
                        ) -> tuple[Exposure, Exposure, pd.DataFrame, pd.DataFrame]:
    """Science, template (PSFs attached: the true ones), the transients' truth and the static sources' truth.

    Counts: a source of true flux F has F counts in the science image and F / flux_ratio in the template.
    """
    spec = spec or TruthPairSpec()
    rng = np.random.default_rng(seed)
    ny, nx = spec.shape
    sx, sy, sflux = random_star_field(spec.shape, spec.n_stars, rng, flux_range=(3e3, 3e5), border_pix=5)
    gx, gy, gflux = random_star_field(spec.shape, spec.n_galaxies, rng, flux_range=(3e3, 1e5), border_pix=5)
    # compact galaxies: half-light radii comparable to the PSF, so they crowd the stellar locus from above
    ghlr = rng.uniform(0.4, 2.5, len(gx)) * spec.science_fwhm / 4.0
    gshear = rng.normal(0, 0.15, (len(gx), 2))
    tx = rng.uniform(60, nx - 60, spec.n_transients)
    ty = rng.uniform(60, ny - 60, spec.n_transients)
    tflux = 10 ** rng.uniform(np.log10(800.0), np.log10(3e4), spec.n_transients)

    def render(fwhm: float, counts_per_flux: float, transients: bool) -> np.ndarray:
        canvas = galsim.ImageF(nx, ny, scale=1.0)
        for x, y, f in zip(sx, sy, sflux):
            _draw(canvas, psf_profile(spec, fwhm, x).withFlux(f * counts_per_flux), x, y)
        for x, y, f, r, (g1, g2) in zip(gx, gy, gflux, ghlr, gshear):
            gal = galsim.Exponential(half_light_radius=r).shear(g1=g1, g2=g2)
            _draw(canvas, galsim.Convolve(gal, psf_profile(spec, fwhm, x)).withFlux(f * counts_per_flux), x, y)
        if transients:
            for x, y, f in zip(tx, ty, tflux):
                _draw(canvas, psf_profile(spec, fwhm, x).withFlux(f * counts_per_flux), x, y)
        return canvas.array.astype(np.float64)

    sci_field = add_noise(render(spec.science_fwhm, 1.0, True), spec.sky, spec.gain, spec.read_noise_e, rng)
    # the template: depth x the exposure, then scaled to its own zeropoint (counts per flux 1 / flux_ratio)
    tpl_counts = 1.0 / spec.flux_ratio
    tpl_raw = add_noise(render(spec.template_fwhm, spec.depth, False), spec.sky * spec.depth, spec.gain,
                        spec.read_noise_e, rng)
    scale = tpl_counts / spec.depth

    def exposure(image, variance, fwhm, magzero, visit):
        return Exposure(image=image.astype(np.float32), mask=np.zeros(spec.shape, np.int32),
                        variance=variance.astype(np.float32), psf=true_psf(spec, fwhm), visit=visit, detector=0,
                        band="r", mjd=60000.0 + visit, exptime=30.0, magzero=magzero, gain=spec.gain)

    science = exposure(sci_field.image - spec.sky, sci_field.variance, spec.science_fwhm, spec.magzero, 1)
    template = exposure((tpl_raw.image - spec.sky * spec.depth) * scale, tpl_raw.variance * scale**2,
                        spec.template_fwhm, spec.magzero + 2.5 * np.log10(tpl_counts), 0)
    transients = pd.DataFrame({"x": tx, "y": ty, "flux": tflux})
    static = pd.DataFrame({"x": np.r_[sx, gx], "y": np.r_[sy, gy], "flux": np.r_[sflux, gflux],
                           "star": np.r_[np.ones(len(sx), bool), np.zeros(len(gx), bool)]})
    return science, template, transients, static
