"""Rendering point sources with GalSim, with honest Poisson and read noise.

The profile at each position comes from a callable, so spatially varying PSFs are drawn
exactly; drawing uses GalSim's default pixel integration (real stars include the pixel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import galsim
import numpy as np


@dataclass(frozen=True)
class RenderedField:
    """Noisy image, its noiseless model and the per-pixel variance (counts, counts^2)."""

    image: np.ndarray
    model: np.ndarray
    variance: np.ndarray


def draw_point_sources(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                       profile_at: Callable[[float, float], galsim.GSObject],
                       method: str = "auto") -> np.ndarray:
    """Noiseless image of point sources at 0-based pixel positions (x, y)."""
    ny, nx = shape
    canvas = galsim.ImageF(nx, ny, scale=1.0)
    for xi, yi, fi in zip(x, y, flux):
        prof = profile_at(float(xi), float(yi)).withFlux(float(fi))
        stamp = prof.drawImage(scale=1.0, method=method, center=galsim.PositionD(xi + 1, yi + 1))
        bounds = stamp.bounds & canvas.bounds
        if bounds.isDefined():
            canvas[bounds] += stamp[bounds]
    return canvas.array.astype(np.float64)


def add_noise(model: np.ndarray, sky: float | np.ndarray, gain: float, read_noise_e: float,
              rng: np.random.Generator) -> RenderedField:
    """Poisson (in electrons) plus Gaussian read noise on model + sky; the sky is kept in the image."""
    total = np.maximum(model + sky, 0.0)
    electrons = rng.poisson(total * gain).astype(np.float64)
    electrons += rng.normal(0.0, read_noise_e, size=model.shape)
    image = electrons / gain
    variance = total / gain + (read_noise_e / gain) ** 2
    return RenderedField(image.astype(np.float32), (model + sky).astype(np.float32), variance.astype(np.float32))


def random_star_field(shape: tuple[int, int], n_stars: int, rng: np.random.Generator,
                      flux_range: tuple[float, float] = (2e3, 2e5), border_pix: int = 20,
                      min_separation_pix: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions uniform over the image and fluxes from a power law dN/dF ~ F^-2 (Euclidean counts).

    With ``min_separation_pix`` later stars too close to earlier ones are dropped.
    """
    ny, nx = shape
    x = rng.uniform(border_pix, nx - 1 - border_pix, n_stars)
    y = rng.uniform(border_pix, ny - 1 - border_pix, n_stars)
    lo, hi = flux_range
    u = rng.uniform(0, 1, n_stars)
    flux = 1.0 / (1.0 / lo - u * (1.0 / lo - 1.0 / hi))
    if min_separation_pix > 0:
        keep = np.ones(n_stars, bool)
        for i in range(n_stars):
            if keep[i]:
                d = np.hypot(x[i + 1 :] - x[i], y[i + 1 :] - y[i])
                keep[i + 1 :] &= d >= min_separation_pix
        x, y, flux = x[keep], y[keep], flux[keep]
    return x, y, flux
