"""The one entry point of the subtraction package: every flavor by name."""

from __future__ import annotations

from ..exposure import Exposure
from .config import SubtractConfig
from .flavors import subtract_alard_lupton
from .result import SubtractionResult
from .zogy import zogy_subtract


def subtract(science: Exposure, template: Exposure, config: SubtractConfig | None = None) -> SubtractionResult:
    """The difference of ``science`` minus ``template`` (same pixel grid) in the configured flavor.

    Parameters
    ----------
    science, template : Exposure
        On the same pixel grid (see :func:`dialab.align_to`); PSFs are measured from stars when absent.
    config : SubtractConfig, optional
        The flavor (convolveTemplate, convolveScience, auto and preconvolution: Alard & Lupton kernel matching,
        see :func:`dialab.subtraction.flavors.subtract_alard_lupton`; zogy: proper image subtraction, see
        :func:`dialab.subtraction.zogy.zogy_subtract`), the kernel basis, candidate selection and checks.

    Returns
    -------
    SubtractionResult
        The difference on the science flux scale (for preconvolution the score image), the matched image, the
        kernel (None for zogy), the score (preconvolution, zogy) and the diagnostics.

    Raises
    ------
    BadInputError
        Different shapes.
    NoOverlapError
        The template covers too little of the science image.
    InsufficientKernelSourcesError
        Too few kernel stamps.
    BadSubtractionError
        The fit shows the images do not match (e.g. the template is of another field).
    """
    cfg = config or SubtractConfig()
    if cfg.flavor == "zogy":
        return zogy_subtract(science, template, cfg)
    return subtract_alard_lupton(science, template, cfg)
