"""A science/template pair of one star-and-galaxy field, with transients, for demos and tests.

The template is deeper, has its own (Moffat) PSF and sits on a WCS offset and slightly rotated
from the science grid; the science image carries a few transients (positive) and a few sources
that vanished (negative), recorded in a truth table.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
import pandas as pd

from ..exposure import Exposure
from ..psf import ImagePsf, MoffatPsf
from .observe import tan_wcs
from .render import add_noise, draw_point_sources, random_star_field


@dataclass(frozen=True)
class PairSpec:
    """What the pair looks like; FWHMs in pixels, magzero the AB magnitude of one count."""

    shape: tuple[int, int] = (1024, 1024)
    science_fwhm: float = 4.2
    template_fwhm: float = 3.4
    beta: float = 3.0
    n_stars: int = 1500
    n_galaxies: int = 300
    n_transients: int = 20
    sky: float = 800.0
    gain: float = 1.5
    read_noise_e: float = 6.0
    template_depth: float = 4.0  # template exposure time / science exposure time
    pixel_scale_arcsec: float = 0.168
    magzero: float = 31.0  # with the 800-count sky: ~19.8 mag per square arcsec


def effective_psf(fwhm: float, beta: float) -> ImagePsf:
    """The Moffat as the pixels see it (GalSim's pixel-integrated drawing), as a stamp."""
    size = MoffatPsf(fwhm_pix=fwhm, beta=beta).default_size
    stamp = galsim.Moffat(beta=beta, fwhm=fwhm).drawImage(nx=size, ny=size, scale=1.0).array
    return ImagePsf(stamp)


def simulate_pair(spec: PairSpec = PairSpec(), seed: int = 1) -> tuple[Exposure, Exposure, pd.DataFrame]:
    """Science exposure, template exposure (own WCS and PSF) and the truth table of transients."""
    rng = np.random.default_rng(seed)
    ny, nx = spec.shape
    pad = 40
    big = (ny + 2 * pad, nx + 2 * pad)  # the sky drawn on a larger canvas, cut per image
    x, y, flux = random_star_field(big, spec.n_stars, rng, flux_range=(300.0, 3e5), border_pix=0)
    gx, gy, gflux = random_star_field(big, spec.n_galaxies, rng, flux_range=(500.0, 5e4), border_pix=0)
    galaxies = [galsim.Exponential(half_light_radius=rng.uniform(0.8, 3.0))
                .shear(g1=rng.normal(0, 0.2), g2=rng.normal(0, 0.2)) for _ in range(len(gx))]
    ra, dec = 150.1, 2.2
    sci_wcs = tan_wcs(spec.shape, spec.pixel_scale_arcsec, ra, dec)
    tpl_wcs = tan_wcs(spec.shape, spec.pixel_scale_arcsec, ra, dec, rotation_deg=0.4, shift_pix=(7.3, -4.6))
    big_wcs = tan_wcs(big, spec.pixel_scale_arcsec, ra, dec)
    world = big_wcs.all_pix2world(np.column_stack([x, y]), 0)
    gworld = big_wcs.all_pix2world(np.column_stack([gx, gy]), 0)

    tx = rng.uniform(60, nx - 60, spec.n_transients)
    ty = rng.uniform(60, ny - 60, spec.n_transients)
    tflux = rng.uniform(1500.0, 15000.0, spec.n_transients) * np.where(rng.uniform(size=spec.n_transients) < 0.75,
                                                                           1, -1)
    truth = pd.DataFrame({"x": tx, "y": ty, "flux": tflux})
    truth[["ra", "dec"]] = sci_wcs.all_pix2world(np.column_stack([tx, ty]), 0)

    def render(wcs, fwhm, depth, transients):
        pix = wcs.all_world2pix(world, 0)
        gpix = wcs.all_world2pix(gworld, 0)
        psf = galsim.Moffat(beta=spec.beta, fwhm=fwhm)
        model = draw_point_sources(spec.shape, pix[:, 0], pix[:, 1], flux * depth, lambda a, b: psf)
        canvas = galsim.ImageF(nx, ny, scale=1.0)
        for (px, py), f, g in zip(gpix, gflux, galaxies):
            if -20 < px < nx + 20 and -20 < py < ny + 20:
                stamp = galsim.Convolve(g, psf).withFlux(f * depth).drawImage(
                    scale=1.0, center=galsim.PositionD(px + 1, py + 1))
                b = stamp.bounds & canvas.bounds
                if b.isDefined():
                    canvas[b] += stamp[b]
        model += canvas.array
        if transients is not None:
            pos = transients["flux"] > 0
            model += draw_point_sources(spec.shape, transients.x[pos], transients.y[pos],
                                        transients.flux[pos], lambda a, b: psf)
            # negative transients: sources present in the template that have since faded
        return model

    neg = truth[truth.flux < 0]
    tpl_extra = neg.assign(flux=-neg.flux)
    sci_model = render(sci_wcs, spec.science_fwhm, 1.0, truth)
    tpl_model = render(tpl_wcs, spec.template_fwhm, spec.template_depth, None)
    if len(tpl_extra):
        tp = tpl_wcs.all_world2pix(np.column_stack([tpl_extra.ra, tpl_extra.dec]), 0)
        tpl_model += draw_point_sources(spec.shape, tp[:, 0], tp[:, 1], tpl_extra.flux * spec.template_depth,
                                        lambda a, b: galsim.Moffat(beta=spec.beta, fwhm=spec.template_fwhm))
    sci_f = add_noise(sci_model, spec.sky, spec.gain, spec.read_noise_e, rng)
    tpl_f = add_noise(tpl_model, spec.sky * spec.template_depth, spec.gain, spec.read_noise_e, rng)
    # The template is a sky-subtracted coadd scaled to the science exposure's photometry.
    depth = np.float32(spec.template_depth)

    def exposure(f, wcs, fwhm, scale, sky, visit):
        return Exposure(image=(f.image - sky) / scale, mask=np.zeros(spec.shape, np.int32),
                        variance=f.variance / scale**2, psf=effective_psf(fwhm, spec.beta), wcs=wcs,
                        visit=visit, detector=0, band="r", mjd=60000.0 + visit / 1000, exptime=30.0 * scale,
                        magzero=spec.magzero, gain=spec.gain * scale)

    science = exposure(sci_f, sci_wcs, spec.science_fwhm, np.float32(1.0), spec.sky, 1)
    template = exposure(tpl_f, tpl_wcs, spec.template_fwhm, depth, spec.sky * spec.template_depth, 0)
    return science, template, truth
