"""Matching injected fakes to diaSources, and forced photometry at the fakes' true positions."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .exposure import Exposure
from .measurement import forced_psf_flux, pixel_scale_arcsec


def match_one_to_one(ax: np.ndarray, ay: np.ndarray, bx: np.ndarray, by: np.ndarray,
                     radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index into b (or -1) and distance for every a: one-to-one, minimising the summed distance
    of pairs closer than ``radius`` (an optimal assignment, not greedy)."""
    n, m = len(ax), len(bx)
    idx = np.full(n, -1)
    dist = np.full(n, np.nan)
    if n == 0 or m == 0:
        return idx, dist
    d = np.hypot(ax[:, None] - bx[None, :], ay[:, None] - by[None, :])
    big = 1e6 * (radius + 1)
    cost = np.where(d <= radius, d, big)
    # a dummy column per a lets it stay unmatched at a cost above any real pair
    cost = np.hstack([cost, np.full((n, n), radius * 1.0001 + 1e-9)])
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows, cols):
        if c < m and d[r, c] <= radius:
            idx[r] = c
            dist[r] = d[r, c]
    return idx, dist


def match_fakes(fakes: pd.DataFrame, sources: pd.DataFrame, difference: Exposure,
                radius_arcsec: float = 0.5, edge_pix: int = 50) -> pd.DataFrame:
    """The truth table with diaSourceId (0 if not found), distance (arcsec), forced photometry at the
    true position on the difference, and ``near_edge`` (excluded from efficiency)."""
    scale = pixel_scale_arcsec(difference)
    out = fakes.copy()
    idx, dist = match_one_to_one(fakes.x.to_numpy(float), fakes.y.to_numpy(float),
                                 sources.x.to_numpy(float) if len(sources) else np.zeros(0),
                                 sources.y.to_numpy(float) if len(sources) else np.zeros(0),
                                 radius_arcsec / scale)
    ids = sources.diaSourceId.to_numpy() if len(sources) else np.zeros(0, np.int64)
    out["diaSourceId"] = np.where(idx >= 0, ids[np.maximum(idx, 0)] if len(ids) else 0, 0).astype(np.int64)
    out["distance"] = dist * scale
    phot = forced_psf_flux(difference, out.x.to_numpy(float), out.y.to_numpy(float))
    out["forced_psfFlux"] = phot.psfFlux.to_numpy()
    out["forced_psfFluxErr"] = phot.psfFluxErr.to_numpy()
    out["forced_snr"] = out.forced_psfFlux / out.forced_psfFluxErr
    ny, nx = difference.shape
    out["near_edge"] = ((out.x < edge_pix) | (out.y < edge_pix) | (out.x > nx - 1 - edge_pix)
                        | (out.y > ny - 1 - edge_pix))
    return out
