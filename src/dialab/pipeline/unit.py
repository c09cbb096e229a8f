"""Processing the units of one (visit, detector): load, warp, inject fakes, then per flavor subtract,
detect and measure, match fakes, write.

This is the function every executor runs (in a process pool or on Dask workers): it reads its own
inputs and writes its own outputs, so the driver never holds images. The flavors of one (visit,
detector) share one preparation (a third of a unit's work when three flavors run). Failures come
back as a one-line reason (full traceback in the unit's ``error.log``) instead of stopping the run.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

import pandas as pd

from ..allocator import keep_freed_memory
from ..errors import DialabError
from ..exposure import Exposure
from ..injection import inject_catalog, make_fake_catalog
from ..matching import match_fakes
from ..measurement import BAD_FLAGS, detect_and_measure
from ..reliability import cached_model
from ..reliability import score as score_reliability
from ..subtraction import subtract
from ..subtraction.config import parse_method
from ..timing import timed
from .config import PipelineConfig
from .manifest import Entry
from .prepare import prepare_entry
from .repository import Unit, mark_done, unit_dir, write_cutouts, write_difference, write_parquet, write_text

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """One (visit, detector)'s images as every flavor subtracts them: read, repaired, aligned, with fakes."""

    science: Exposure
    template: Exposure
    fakes: pd.DataFrame | None
    seconds: float


def _prepare(entry: Entry, root: str, config: PipelineConfig) -> _Prepared:
    t0 = time.perf_counter()
    science, template = prepare_entry(entry, root, config.repair, config.subtract.aperture_correction)
    fakes = None
    if config.inject.enabled:
        with timed("inject"):
            fakes = make_fake_catalog(science, config.inject, template)
            science, template = inject_catalog(science, template, fakes, seed=config.inject.seed)
    return _Prepared(science, template, fakes, time.perf_counter() - t0)


def _process(unit: Unit, prepared: _Prepared, share: float, config: PipelineConfig, out: str) -> dict:
    """Subtract, detect, measure, match the fakes and write one unit; ``share`` is its part of the
    preparation's seconds (counted in the unit's own time)."""
    t0 = time.perf_counter()
    science, template, fakes = prepared.science, prepared.template, prepared.fakes
    flavor, basis = parse_method(unit.flavor)
    sub_cfg = config.subtract.model_copy(update={"flavor": flavor, "workers": config.execution.threads_per_unit,
                                                 "kernel_basis": basis or config.subtract.kernel_basis})
    result = subtract(science, template, sub_cfg)
    with timed("detect_and_measure"):
        cat, _, _ = detect_and_measure(result, science, result.matched_image, config.detect, config.measure)
    if config.reliability.enabled:
        with timed("reliability"):
            cat = score_reliability(cat, template, science, result.difference, cached_model(config.reliability.model))
    where = unit_dir(out, unit)
    where.mkdir(parents=True, exist_ok=True)
    with timed("write"):
        write_difference(result, where / "difference.fits", config.output.compression, config.output.quantize_level)
        write_parquet(cat, where / "diaSources.parquet")
        if config.output.keep == "catalogs":
            write_cutouts(where / "cutouts.fits", result.difference, science, template, cat, fakes,
                          config.output.compression, config.output.quantize_level)
    d = result.diagnostics
    summary = {"status": "done", "n_diaSources": len(cat),
               "n_good": int((~cat[list(BAD_FLAGS)].any(axis=1)).sum()) if len(cat) else 0,
               "convolved": d.convolved, "kernel_basis": d.kernel_basis, "kernel_sum": d.kernel_sum,
               "kernel_sum_source": d.sum_source,
               "n_kernel_candidates": d.n_candidates,
               "n_kernel_used": d.n_used, "noise_ratio": d.noise_ratio,
               "science_fwhm": float(result.science_psf.fwhm),
               "template_fwhm": float(result.template_psf.fwhm),
               "science_aperture_correction": result.science_psf.aperture_correction_value,
               "template_aperture_correction": result.template_psf.aperture_correction_value,
               # "model": a given PSF's own correction, confirmed by the stars; "stars": their ratio
               "science_aperture_correction_source": result.science_psf.aperture_correction_source,
               "template_aperture_correction_source": result.template_psf.aperture_correction_source,
               "njy_per_count": float(science.njy_per_count)}
    if fakes is not None:
        matched = match_fakes(fakes, cat, result.difference, config.match.radius_arcsec, config.match.edge_pix)
        write_parquet(fakes, where / "fakes.parquet")
        write_parquet(matched, where / "fakes_matched.parquet")
        summary.update(n_fakes=len(fakes), n_fakes_found=int((matched.diaSourceId > 0).sum()))
    summary["seconds"] = share + time.perf_counter() - t0
    summary["prepare_seconds"] = share
    mark_done(out, unit, summary)
    return summary


def run_units(units: list[Unit], entry: Entry, root: str, config: PipelineConfig, out: str
              ) -> list[tuple[Unit, dict]]:
    """Process the units of one (visit, detector), one per flavor: the images are read, repaired, aligned and
    given their (flavor-independent) fakes once, then subtracted in each flavor. Returns each unit's summary,
    or {"status": "failed", "reason": one line}: a unit fails alone, or all of them when preparation fails.

    Linear algebra runs on ``threads_per_unit`` threads whatever the executor, so that results
    do not depend on where a unit ran (summation order) and workers do not oversubscribe cores.
    """
    from threadpoolctl import threadpool_limits

    keep_freed_memory()  # once per worker process, whichever executor started it
    with threadpool_limits(config.execution.threads_per_unit):
        try:
            prepared = _prepare(entry, root, config)
        except Exception as exc:  # one failed unit must not stop the run
            return [(unit, _failure(unit, out, exc)) for unit in units]
        results = []
        for unit in units:
            try:
                results.append((unit, _process(unit, prepared, prepared.seconds / len(units), config, out)))
            except Exception as exc:
                results.append((unit, _failure(unit, out, exc)))
        return results


def _failure(unit: Unit, out: str, exc: Exception) -> dict:
    """A failed unit's summary; the traceback goes to its error.log."""
    reason = str(exc) if isinstance(exc, DialabError) else f"{type(exc).__name__}: {exc}"
    reason = " ".join(reason.split())
    try:
        write_text(traceback.format_exc(), unit_dir(out, unit) / "error.log")
    except OSError:
        pass
    return {"status": "failed", "reason": reason}
