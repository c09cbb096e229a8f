"""The subtraction flavors, and which image each convolves.

* convolveTemplate:  D = N - K*R - B
* convolveScience:   D = (K*N + B - R) / sum(K)     (on the science flux scale; PSF of the template)
* auto:              convolveScience when the template PSF is wider on both axes, else convolveTemplate
* preconvolution:    S = v*N - K*R - B, v the science PSF; S is flux-conserving with PSF v * P_N and
                     already matched-filtered, so detection thresholds it directly.
"""

from __future__ import annotations

from ..moments import adaptive_moments
from ..psf import Psf
from .config import FLAVORS, Flavor  # noqa: F401 (the flavor names live with the configuration)


def psf_axes(psf: Psf, x: float | None = None, y: float | None = None) -> tuple[float, float]:
    """Adaptive second moments (ixx, iyy) of the PSF, pixels^2."""
    p = psf.stamp(x=x, y=y)
    c = p.shape[0] // 2
    m = adaptive_moments(p, c, c, max(psf.sigma, 0.5))
    return m.ixx, m.iyy


def choose_convolved(science_psf: Psf, template_psf: Psf, flavor: str) -> str:
    """Which image the kernel convolves: DESIGN's auto rule compares both axes' second moments."""
    if flavor in ("convolveTemplate", "preconvolution"):
        return "template"
    if flavor == "convolveScience":
        return "science"
    sxx, syy = psf_axes(science_psf)
    txx, tyy = psf_axes(template_psf)
    return "science" if (txx > sxx and tyy > syy) else "template"


def flavor_used(flavor: str, convolved: str) -> str:
    """The flavor a run actually used: auto resolves to convolveScience or convolveTemplate."""
    if flavor != "auto":
        return flavor
    return "convolveScience" if convolved == "science" else "convolveTemplate"
