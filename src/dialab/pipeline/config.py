"""The pipeline configuration: one YAML file (or several, merged in order), validated by pydantic.

Each stage has its section, with defaults that follow LSST ip_diffim; unknown keys and wrong types are errors
naming the key path. ``flavors`` lists the subtraction flavors to run (default: ``subtract.flavor``), each
optionally with its kernel basis (``flavor.basis``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..association import AssociateConfig
from ..detection import DetectConfig
from ..errors import BadInputError
from ..injection import InjectConfig
from ..measurement import MeasureConfig
from ..reliability import ReliabilityConfig
from ..subtraction import SubtractConfig
from ..subtraction.config import parse_method


class RepairConfig(BaseModel):
    """Cleaning the science exposure before anything else (raw visits carry cosmic rays)."""

    model_config = ConfigDict(extra="forbid")

    cosmic_rays: bool = Field(True, description="find, mask (CR, INTRP) and interpolate over cosmic rays")
    nsigma: float = Field(6.0, gt=0, description="significance of a cosmic-ray pixel")
    margin: float = Field(3.0, ge=0, description="noise sigmas a CR must be sharper than the PSF by")


class MatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    radius_arcsec: float = Field(0.5, gt=0, description="a fake is found if a diaSource lies this close")
    edge_pix: int = Field(50, ge=0, description="fakes this near an edge are left out of efficiencies")


class ApdbSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="database URL; default a SQLite file per flavor in the output")
    namespace_prefix: str = Field("dialab", description="PostgreSQL schema name prefix (one schema per run+flavor)")


class ExecutionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "dask"] = "local"
    workers: int | None = Field(None, ge=1, description="parallel units (default: the core count)")
    scheduler: str | None = Field(None, description="Dask scheduler address (default: a LocalCluster)")
    threads_per_unit: int = Field(1, ge=1, description="FFT threads inside one unit")


class OutputConfig(BaseModel):
    """How each unit's difference is written (see ``exposure.COMPRESSIONS``): a survey's differences outweigh
    its inputs unless their floats are quantized to a fraction of their noise."""

    model_config = ConfigDict(extra="forbid")

    compression: Literal["none", "lossless", "quantized"] = Field(
        "quantized", description="difference image planes: plain, lossless tile compression, or floats "
                                 "quantized to 1/quantize_level of their noise (the mask always lossless)")
    quantize_level: float = Field(128.0, ge=1.0, description="quantization steps per noise sigma (a flux moves "
                                                             "by 0.29 / quantize_level of its error, rms)")
    keep: Literal["all", "catalogs"] = Field(
        "all", description="'catalogs': keep the catalogs and cutouts.fits (template, science and difference "
                           "stamps of every diaSource and fake); each difference.fits is deleted once its unit is "
                           "in the APDB (its forced photometry needs it until then)")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flavors: list[str] | None = Field(None, description="methods to run side by side: a flavor, or flavor.basis "
                                       "to choose its kernel basis (e.g. [convolveTemplate, convolveTemplate.delta])")
    repair: RepairConfig = RepairConfig()
    subtract: SubtractConfig = SubtractConfig()
    detect: DetectConfig = DetectConfig()
    measure: MeasureConfig = MeasureConfig()
    inject: InjectConfig = InjectConfig(enabled=False)
    match: MatchConfig = MatchConfig()
    reliability: ReliabilityConfig = ReliabilityConfig()
    associate: AssociateConfig = AssociateConfig()
    apdb: ApdbSection = ApdbSection()
    execution: ExecutionConfig = ExecutionConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("flavors")
    @classmethod
    def _known_methods(cls, value):
        for name in value or []:
            parse_method(name)
        if value is not None and len(set(value)) != len(value):
            raise ValueError("a method is listed twice")
        return value

    def flavors_to_run(self) -> list[str]:
        return list(self.flavors) if self.flavors else [self.subtract.flavor]


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _format(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def subtract_section(loaded: dict) -> dict:
    """A YAML of bare subtraction keys (``flavor: auto``...) as the pipeline's ``subtract`` section."""
    return {"subtract": loaded} if loaded and set(loaded) <= set(SubtractConfig.model_fields) else loaded


def load_pipeline(paths: list[str | Path] | None = None, overrides: dict | None = None, wrap=None) -> PipelineConfig:
    """Merge pipeline YAML files in order, then ``overrides``, and validate.

    Parameters
    ----------
    paths : list of str or Path, optional
    overrides : dict, optional
        Nested keys as in the YAML.
    wrap : callable, optional
        Applied to each file's mapping first (e.g. :func:`subtract_section`).

    Returns
    -------
    PipelineConfig

    Raises
    ------
    BadInputError
        Naming the file and the key path of an unknown key or a wrong type.
    """
    data: dict = {}
    for path in paths or []:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise BadInputError("pipeline file not found", path) from None
        except yaml.YAMLError as exc:
            raise BadInputError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
        if not isinstance(loaded, dict):
            raise BadInputError("a pipeline file must be a mapping of sections", path)
        loaded = wrap(loaded) if wrap else loaded
        try:
            PipelineConfig.model_validate(loaded)
        except ValidationError as exc:
            raise BadInputError(_format(exc), path) from None
        data = _merge(data, loaded)
    data = _merge(data, overrides or {})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise BadInputError(_format(exc)) from None
