"""Adaptive (Gaussian-weighted) second moments, the size measure of PSFs and sources.

For a Gaussian profile the adaptive moments equal the profile's covariance exactly, so the
sigma they give is the sigma of DESIGN section 4; for other profiles they are the moments of the
best-matching elliptical Gaussian (Bernstein & Jarvis 2002), finite even for Moffat wings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Centroid (pixels, stamp coordinates) and covariance (pixels^2) of a profile."""

    x: float
    y: float
    ixx: float
    iyy: float
    ixy: float
    converged: bool

    @property
    def sigma(self) -> float:
        """Determinant radius det(C)^(1/4), pixels."""
        det = self.ixx * self.iyy - self.ixy**2
        return float(det**0.25) if det > 0 else float("nan")

    @property
    def ellipticity(self) -> float:
        """|e| = sqrt((ixx-iyy)^2 + (2 ixy)^2) / (ixx + iyy)."""
        return float(np.hypot(self.ixx - self.iyy, 2 * self.ixy) / (self.ixx + self.iyy))


def _inv2(a: float, b: float, c: float) -> tuple[float, float, float] | None:
    """Inverse of the symmetric 2x2 matrix [[a, b], [b, c]] (None when not positive definite)."""
    det = a * c - b * b
    if not (det > 0 and a > 0):
        return None
    return c / det, -b / det, a / det


def adaptive_moments(
    stamp: np.ndarray,
    x0: float,
    y0: float,
    sigma_guess: float = 2.0,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> Moments:
    """Iterate a matched elliptical Gaussian weight on ``stamp`` starting at (x0, y0)."""
    ny, nx = stamp.shape
    xx = np.arange(nx, dtype=float)[None, :]
    yy = np.arange(ny, dtype=float)[:, None]
    cxx, cxy, cyy = sigma_guess**2, 0.0, sigma_guess**2
    xc, yc = float(x0), float(y0)
    converged = False
    for _ in range(max_iter):
        inv = _inv2(cxx, cxy, cyy)
        if inv is None:
            break
        ixx, ixy, iyy = inv
        dx, dy = xx - xc, yy - yc
        r2 = ixx * dx * dx + 2 * ixy * dx * dy + iyy * dy * dy
        w = np.exp(-0.5 * np.clip(r2, 0.0, 200.0)) * stamp
        total = w.sum()
        if not (np.isfinite(total) and total > 0):
            break
        mx = float((w * dx).sum() / total)
        my = float((w * dy).sum() / total)
        mxx = float((w * dx * dx).sum() / total) - mx * mx
        myy = float((w * dy * dy).sum() / total) - my * my
        mxy = float((w * dx * dy).sum() / total) - mx * my
        winv = _inv2(mxx, mxy, myy)
        if winv is None:
            break
        # Deconvolve the weight: for a Gaussian source this is the exact covariance.
        new = _inv2(winv[0] - ixx, winv[1] - ixy, winv[2] - iyy)
        nxx, nxy, nyy = new if new is not None else (2 * mxx, 2 * mxy, 2 * myy)
        # The weighted mean is pulled toward the weight centre by M_w C_source^-1.
        sx = nxx * (winv[0] * mx + winv[1] * my) + nxy * (winv[1] * mx + winv[2] * my)
        sy = nxy * (winv[0] * mx + winv[1] * my) + nyy * (winv[1] * mx + winv[2] * my)
        step = float(np.hypot(sx, sy))
        if step > 1.0:
            sx, sy = sx / step, sy / step
        xc += sx
        yc += sy
        change = max(abs(nxx - cxx), abs(nyy - cyy), abs(nxy - cxy)) / (cxx + cyy) + min(step, 1.0)
        if change > 0.5:
            nxx, nxy, nyy = 0.5 * (nxx + cxx), 0.5 * (nxy + cxy), 0.5 * (nyy + cyy)
        cxx, cxy, cyy = nxx, nxy, nyy
        if not (0 < cxx < nx * nx and 0 < cyy < ny * ny):
            break
        if change < tol:
            converged = True
            break
    return Moments(float(xc), float(yc), float(cxx), float(cyy), float(cxy), converged)
