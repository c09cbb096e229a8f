"""Matching injected fakes to diaSources, and forced photometry at the fakes' true positions."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from .exposure import Exposure
from .lazy import lazy_module
from .measurement import pixel_scale_arcsec
from .photometry import forced_psf_flux
from .sky import ARCSEC_PER_RADIAN, chord, unit_vectors

pd = lazy_module("pandas")


def match_one_to_one(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``b`` (or -1) and distance for every point of ``a``, one-to-one, among pairs closer than
    ``radius``; ``a`` and ``b`` are (n, d) coordinates (pixels, or unit vectors on the sky).

    An optimal assignment, not greedy: it makes as many pairs as it can and, among those choices,
    the one with the smallest summed distance. Only pairs within the radius are ever considered
    (a k-d tree), so large catalogs stay cheap.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    n = len(a)
    idx = np.full(n, -1, dtype=np.int64)
    dist = np.full(n, np.nan)
    if n == 0 or len(b) == 0:
        return idx, dist
    pairs = cKDTree(a).sparse_distance_matrix(cKDTree(b), radius, output_type="coo_matrix")
    if pairs.nnz == 0:
        return idx, dist
    rows, row_index = np.unique(pairs.row, return_inverse=True)
    cols, col_index = np.unique(pairs.col, return_inverse=True)
    # Pairs beyond the radius cost so much that the most pairs within it are made first.
    big = 1e6 * (radius + 1)
    cost = np.full((len(rows), len(cols)), big)
    cost[row_index, col_index] = pairs.data
    r, c = linear_sum_assignment(cost)
    real = cost[r, c] < big
    idx[rows[r[real]]] = cols[c[real]]
    dist[rows[r[real]]] = cost[r[real], c[real]]
    return idx, dist


def match_sky(ra1, dec1, ra2, dec2, radius_arcsec: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one sky match (see match_one_to_one) on unit vectors: index into the second list (or -1)
    and great-circle distance in arcsec for each position of the first; right at the poles and RA 0/360."""
    idx, d = match_one_to_one(unit_vectors(ra1, dec1), unit_vectors(ra2, dec2), chord(radius_arcsec))
    return idx, 2.0 * np.arcsin(d / 2.0) * ARCSEC_PER_RADIAN


def match_fakes(fakes: pd.DataFrame, sources: pd.DataFrame, difference: Exposure,
                radius_arcsec: float = 0.5, edge_pix: int = 50) -> pd.DataFrame:
    """Match fakes to diaSources one-to-one and measure forced photometry at the fakes' true positions.

    Parameters
    ----------
    fakes : pandas.DataFrame
        The truth table.
    sources : pandas.DataFrame
        The diaSources of the same difference.
    difference : Exposure
    radius_arcsec : float
        Largest fake-source distance of a match.
    edge_pix : int
        Fakes closer to the border are marked ``near_edge`` (excluded from efficiency).

    Returns
    -------
    pandas.DataFrame
        The truth table with diaSourceId (0 if not found), distance (arcsec), forced_psfFlux,
        forced_psfFluxErr, forced_snr and near_edge.
    """
    scale = pixel_scale_arcsec(difference)
    out = fakes.copy()
    found = sources[["x", "y"]].to_numpy(float) if len(sources) else np.zeros((0, 2))
    idx, dist = match_one_to_one(fakes[["x", "y"]].to_numpy(float), found, radius_arcsec / scale)
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
