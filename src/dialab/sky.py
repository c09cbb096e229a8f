"""Positions on the sphere: matching, offsets, means and padded regions that hold at the poles and across
RA 0/360 (a flat ``dRA cos(Dec)`` projection breaks at both).

A leaf module: coordinates in degrees in, arcseconds or degrees out.
"""

from __future__ import annotations

import numpy as np

ARCSEC_PER_RADIAN = 180.0 / np.pi * 3600.0


def unit_vectors(ra, dec) -> np.ndarray:
    """(n, 3) Cartesian unit vectors of (ra, dec) in degrees."""
    a, d = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    return np.column_stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)]).reshape(-1, 3)


def lonlat(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of (n, 3) vectors (need not be unit length); ra in [0, 360)."""
    v = np.asarray(vectors, float).reshape(-1, 3)
    ra = np.rad2deg(np.arctan2(v[:, 1], v[:, 0])) % 360.0
    dec = np.rad2deg(np.arctan2(v[:, 2], np.hypot(v[:, 0], v[:, 1])))
    return ra, dec


def chord(radius_arcsec: float) -> float:
    """The straight-line distance between unit vectors ``radius_arcsec`` apart on the sphere."""
    return float(2.0 * np.sin(radius_arcsec / ARCSEC_PER_RADIAN / 2.0))


def separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distances (arcsec), accurate at every separation (the chord, converted)."""
    c = np.linalg.norm(unit_vectors(ra1, dec1) - unit_vectors(ra2, dec2), axis=1)
    return 2.0 * np.arcsin(np.clip(c / 2.0, 0.0, 1.0)) * ARCSEC_PER_RADIAN


def tangent_offsets(ra, dec, ra0, dec0) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (xi, eta) offsets (arcsec) of (ra, dec) on the plane tangent at (ra0, dec0): east and north,
    exact for small fields anywhere on the sky (``ra0``/``dec0`` may be arrays, one centre per point)."""
    a, d = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    a0, d0 = np.deg2rad(np.asarray(ra0, float)), np.deg2rad(np.asarray(dec0, float))
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cos_c
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cos_c
    return xi * ARCSEC_PER_RADIAN, eta * ARCSEC_PER_RADIAN


def from_tangent(xi, eta, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of gnomonic offsets (arcsec) from (ra0, dec0): the inverse of tangent_offsets."""
    x, y = np.asarray(xi, float) / ARCSEC_PER_RADIAN, np.asarray(eta, float) / ARCSEC_PER_RADIAN
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    # The point is the tangent point plus x east and y north, projected back onto the sphere.
    centre = unit_vectors(ra0, dec0)[0]
    east = np.array([-np.sin(a0), np.cos(a0), 0.0])
    north = np.array([-np.sin(d0) * np.cos(a0), -np.sin(d0) * np.sin(a0), np.cos(d0)])
    return lonlat(centre[None] + x.reshape(-1, 1) * east[None] + y.reshape(-1, 1) * north[None])


def mean_position(ra, dec) -> tuple[float, float]:
    """The direction of the summed unit vectors: a mean that holds across RA 0/360 and at the poles."""
    r, d = lonlat(unit_vectors(ra, dec).sum(axis=0))
    return float(r[0]), float(d[0])


def running_mean(ra, dec, n, new_ra, new_dec) -> tuple[np.ndarray, np.ndarray]:
    """Mean positions of ``n`` points at (ra, dec) after adding one more at (new_ra, new_dec) each."""
    n = np.asarray(n, float).reshape(-1, 1)
    return lonlat(n * unit_vectors(ra, dec) + unit_vectors(new_ra, new_dec))
