"""Adaptive (Gaussian-weighted) second moments, the size measure of PSFs and sources.

For a Gaussian profile the adaptive moments equal the profile's covariance exactly, so the sigma
they give is dialab's PSF sigma (FWHM = 2.3548 sigma); for other profiles they are the moments of the
best-matching elliptical Gaussian (Bernstein & Jarvis 2002), finite even for Moffat wings.
They are GalSim's HSM implementation (Hirata & Seljak 2003), which also takes a bad-pixel mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
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


_FAILED = Moments(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"), False)


def adaptive_moments(stamp: np.ndarray, x0: float, y0: float, sigma_guess: float = 2.0,
                     bad: np.ndarray | None = None) -> Moments:
    """Adaptive moments of the profile near (x0, y0) in ``stamp`` (``bad`` pixels ignored); a failed
    measurement (no flux, no convergence) has NaN entries and ``converged`` False."""
    image = galsim.Image(np.ascontiguousarray(stamp, dtype=np.float64), xmin=0, ymin=0)
    badpix = None if bad is None else galsim.Image(np.ascontiguousarray(bad, dtype=np.int32), xmin=0, ymin=0)
    try:
        r = galsim.hsm.FindAdaptiveMom(image, badpix=badpix, guess_sig=float(sigma_guess), strict=False,
                                       guess_centroid=galsim.PositionD(float(x0), float(y0)))
    except (galsim.GalSimError, ValueError):
        return _FAILED
    if r.moments_status != 0 or not r.moments_sigma > 0:
        return _FAILED
    # HSM reports det(C)^(1/4) and the distortion e = (ixx - iyy, 2 ixy) / (ixx + iyy): rebuild C from them.
    e1, e2 = r.observed_shape.e1, r.observed_shape.e2
    scale = r.moments_sigma**2 / np.sqrt(max(1.0 - e1 * e1 - e2 * e2, 1e-12))
    return Moments(float(r.moments_centroid.x), float(r.moments_centroid.y), float(scale * (1 + e1)),
                   float(scale * (1 - e1)), float(scale * e2), True)
