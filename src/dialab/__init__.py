"""dialab: difference image analysis (DIA) and the evaluation of its flavors.

The public API is importable from here; names load on first use, so ``import dialab`` (and the
command line) stay fast::

    import dialab
    science = dialab.read_exposure("science.fits")
"""

from __future__ import annotations

from ._version import __version__
from .lazy import lazy_names

#: Public name -> the module that defines it.
_API = {
    # exposures and PSFs
    "Exposure": "exposure", "MaskPlanes": "exposure", "read_exposure": "exposure", "write_exposure": "exposure",
    "read_psf": "exposure", "Psf": "psf", "GaussianPsf": "psf", "MoffatPsf": "psf", "ImagePsf": "psf",
    "GridPsf": "psf", "measure_psf": "psf", "check_given_psf": "psf", "align_to": "warp",
    "repair_cosmic_rays": "repair",
    # subtraction
    "subtract": "subtraction", "SubtractConfig": "subtraction", "SubtractionResult": "subtraction",
    "SubtractionDiagnostics": "subtraction", "FLAVORS": "subtraction",
    # detection and measurement
    "detect_and_measure": "measurement", "MeasureConfig": "measurement", "forced_psf_flux": "photometry",
    "detect_sources": "detection", "DetectConfig": "detection",
    # fakes and matching
    "make_fake_catalog": "injection", "inject_catalog": "injection", "InjectConfig": "injection",
    "match_fakes": "matching", "match_sky": "matching",
    # the APDB
    "create_apdb": "apdb", "open_apdb": "apdb", "store_visit_detector": "association",
    "AssociateConfig": "association",
    # runs, simulations and reports
    "run_pipeline": "pipeline.runner", "load_pipeline": "pipeline.config", "PipelineConfig": "pipeline.config",
    "read_manifest": "pipeline.manifest", "simulate_dataset": "simulate.survey", "get_spec": "simulate.specs",
    "simulate_truth_pair": "simulate.truthpair", "TruthPairSpec": "simulate.truthpair",
    "build_report": "analysis.report",
    # errors
    "DialabError": "errors", "BadInputError": "errors", "BadSubtractionError": "errors",
    "NoOverlapError": "errors", "PsfMeasurementError": "errors", "InsufficientKernelSourcesError": "errors",
}

__all__ = ["__version__", *_API]

__getattr__, __dir__ = lazy_names(__name__, _API, globals())
