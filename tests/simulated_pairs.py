"""Star-field image pairs with known PSFs and noise, for the subtraction and detection tests."""

from __future__ import annotations

import galsim
import numpy as np

from dialab.exposure import Exposure
from dialab.measurement import BAD_FLAGS
from dialab.psf import GaussianPsf
from dialab.simulate.render import draw_point_sources


def star_positions(shape, n, rng, flux_range=(1000.0, 4000.0), border=30):
    ny, nx = shape
    x = rng.uniform(border, nx - 1 - border, n)
    y = rng.uniform(border, ny - 1 - border, n)
    return x, y, rng.uniform(*flux_range, n)


def gaussian_exposure(shape, stars, sigma, noise, rng, background=None, extra=None) -> Exposure:
    """Stars drawn with a sampled Gaussian (the effective PSF), plus white noise of std ``noise``."""
    x, y, f = stars
    model = draw_point_sources(shape, x, y, f, lambda a, b: galsim.Gaussian(sigma=sigma), method="no_pixel")
    if extra is not None:
        model = model + extra
    if background is not None:
        model = model + background
    image = model + rng.normal(0.0, noise, shape)
    return Exposure(image=image, mask=np.zeros(shape, np.int32), variance=np.full(shape, noise**2),
                    psf=GaussianPsf(sigma_pix=sigma))


def source_free(exp: Exposure, stars, radius: float) -> np.ndarray:
    """Pixels farther than ``radius`` from every star and not masked."""
    ny, nx = exp.shape
    far = np.ones(exp.shape, bool)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y in zip(stars[0], stars[1]):
        x0, x1 = int(max(0, x - radius)), int(min(nx, x + radius + 1))
        y0, y1 = int(max(0, y - radius)), int(min(ny, y + radius + 1))
        sub = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 < radius**2
        far[y0:y1, x0:x1] &= ~sub
    return far & ~exp.plane("EDGE", "NO_DATA", "BAD", "SAT")


#: The flavor comparison's flag cut plus the cosmic-ray flag: what "a false detection after the cuts" means.
CUT_FLAGS = [*BAD_FLAGS, "pixelFlags_cr"]


def match_truth(cat, truth, radius: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """For each catalog row: is a truth position within ``radius`` px, and the index of the nearest one."""
    d = np.hypot(cat.x.to_numpy()[:, None] - truth.x.to_numpy()[None], cat.y.to_numpy()[:, None] - truth.y.to_numpy()[None])
    return d.min(axis=1) < radius, d.argmin(axis=1)
