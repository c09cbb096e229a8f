"""Writing a simulated dataset: exposures, templates, truth tables and the ``dataset.yaml`` manifest.

Layout under the output folder::

    dataset.yaml                         manifest (see the formats page of the docs) + spec, seed, truth paths
    science/<band>/<visit>/<detector>.fits
    templates/<band>/<detector>.fits
    truth/objects.parquet                every object of the field (static and variable)
    truth/epochs.parquet                 per science exposure: variables and supernovae in it, with
                                         science, template and difference fluxes (nJy)
    truth/visits.parquet                 per visit: seeing, zeropoint, sky, dither, template membership
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import BadInputError
from ..exposure import write_exposure
from .observe import (
    DETECTOR_GAP_PIX,
    RENDER_MARGIN_PIX,
    VisitConditions,
    draw_conditions,
    in_image,
    render_exposure,
    science_wcs,
    template_conditions,
)
from .scene import Scene, make_scene
from .specs import SurveySpec

_STATE: dict = {}
#: Changing objects fainter than this (27.4 mag) in both science and template are left out of the truth.
MIN_TRUTH_FLUX_NJY = 1.0


def build_scene(spec: SurveySpec, conditions: dict[int, VisitConditions], seed: int) -> Scene:
    """The field's objects over every CCD, with room for dithers and the template's offset."""
    ny, nx = spec.shape
    ncol, nrow = min(2, len(spec.detectors)), int(np.ceil(len(spec.detectors) / 2))
    pad = RENDER_MARGIN_PIX + 4 * spec.dither_pix + max(map(abs, spec.template_offset_pix)) + 0.01 * max(nx, ny)
    half_x = (ncol * nx + (ncol - 1) * DETECTOR_GAP_PIX) / 2 + pad
    half_y = (nrow * ny + (nrow - 1) * DETECTOR_GAP_PIX) / 2 + pad
    nights = sorted({round(c.mjd) for c in conditions.values()})
    return make_scene(spec.ra, spec.dec, (half_x * spec.pixel_scale / 3600, half_y * spec.pixel_scale / 3600),
                      spec.star_density, spec.galaxy_density, spec.star_mag_range, spec.galaxy_mag_range,
                      spec.variable_fraction, spec.supernova_density, nights, np.random.default_rng([seed, 3]))


def _init_worker(spec: SurveySpec, scene: Scene, conditions: dict[int, VisitConditions], seed: int) -> None:
    _STATE.update(spec=spec, scene=scene, conditions=conditions, seed=seed)


def _render_task(kind: str, band: str, visit: int, detector: int, path: str) -> tuple[str, float]:
    spec, scene, conditions, seed = (_STATE[k] for k in ("spec", "scene", "conditions", "seed"))
    t0 = time.perf_counter()
    if kind == "template":
        rendered = render_exposure(spec, scene, template_conditions(spec, conditions, band), detector, seed,
                                   template=True)
    else:
        rendered = render_exposure(spec, scene, [conditions[visit]], detector, seed)
    write_exposure(rendered.exposure, path)
    return path, time.perf_counter() - t0


def epoch_truth(spec: SurveySpec, scene: Scene, conditions: dict[int, VisitConditions]) -> pd.DataFrame:
    """Variables and supernovae in every science exposure, with the fluxes a difference should show."""
    rows = []
    changing = scene.objects.kind.isin(["variable", "supernova"]).to_numpy()
    objects = scene.objects[changing]
    for band, visits in spec.written_visits({v: c.fwhm for v, c in conditions.items()}).items():
        tpl = template_conditions(spec, conditions, band)
        tpl_flux = np.mean([scene.flux_njy(band, c.mjd)[changing] for c in tpl], axis=0)
        for visit in visits:
            cond = conditions[visit]
            flux = scene.flux_njy(band, cond.mjd)[changing]
            for detector in spec.detectors:
                true_wcs, _ = science_wcs(spec, cond, detector)
                keep, x, y = in_image(true_wcs, objects, spec.shape, 0.0)
                visible = np.maximum(flux, tpl_flux)[keep] > MIN_TRUTH_FLUX_NJY
                keep[keep] = visible
                x, y = x[visible], y[visible]
                rows.append(pd.DataFrame({
                    "id": objects.id.to_numpy()[keep], "kind": objects.kind.to_numpy()[keep],
                    "visit": visit, "detector": detector, "band": band, "mjd": cond.mjd,
                    "ra": objects.ra.to_numpy()[keep], "dec": objects.dec.to_numpy()[keep], "x": x, "y": y,
                    "flux_nJy": flux[keep], "template_flux_nJy": tpl_flux[keep],
                    "diff_flux_nJy": flux[keep] - tpl_flux[keep]}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def _check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dialab-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BadInputError(f"cannot write the dataset there ({exc.strerror or exc})", out) from None


#: Peak memory of one rendering process: a fixed part and bytes per CCD pixel (measured peak RSS of a worker
#: at 1024^2 and 2048^2: 250 and 500 MB).
RENDER_BASE_BYTES = 170 * 2**20
RENDER_BYTES_PER_PIXEL = 80


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable), or its physical memory where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _affordable_workers(spec: SurveySpec, workers: int) -> int:
    """As many rendering processes as memory allows; a clear error when not even one fits."""
    need = RENDER_BASE_BYTES + RENDER_BYTES_PER_PIXEL * spec.shape[0] * spec.shape[1]
    free = available_memory()
    if need > free:
        raise BadInputError(f"a {spec.shape[1]} x {spec.shape[0]} CCD needs about {need / 2**30:.1f} GiB to render, "
                            f"and this machine has {free / 2**30:.1f} GiB available")
    return max(1, min(workers, free // need))


def simulate_dataset(spec: SurveySpec, output: str | Path, seed: int = 1, workers: int | None = None,
                     progress: bool = True) -> Path:
    """Render every science exposure and template of a survey spec, with their truth tables.

    Parameters
    ----------
    spec : SurveySpec
        See :func:`dialab.get_spec`.
    output : str or Path
        The dataset folder.
    seed : int
    workers : int, optional
        Processes.
    progress : bool

    Returns
    -------
    Path
        The manifest (``dataset.yaml``).
    """
    out = Path(output)
    if not (isinstance(seed, int) and seed >= 0):
        raise BadInputError(f"seed {seed}: give a non-negative integer")
    workers = _affordable_workers(spec, workers or os.cpu_count() or 1)
    _check_output(out)
    conditions = draw_conditions(spec, seed)
    scene = build_scene(spec, conditions, seed)
    entries, tasks = [], []
    written = spec.written_visits({v: c.fwhm for v, c in conditions.items()})
    for band in written:
        for detector in spec.detectors:
            tpl_path = f"templates/{band}/{detector}.fits"
            tasks.append(("template", band, 0, detector, tpl_path))
            for visit in written[band]:
                sci_path = f"science/{band}/{visit}/{detector}.fits"
                tasks.append(("science", band, visit, detector, sci_path))
                entries.append({"visit": visit, "detector": detector, "band": band,
                                "mjd": conditions[visit].mjd, "science": sci_path, "template": tpl_path})
    workers = max(1, min(workers, len(tasks)))
    columns = (TextColumn("simulating {task.fields[name]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar, \
            ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(spec, scene, conditions, seed)) as pool:
        task_id = bar.add_task("simulate", total=len(tasks), name=spec.name)
        futures = [pool.submit(_render_task, kind, band, visit, det, str(out / path))
                   for kind, band, visit, det, path in tasks]
        for fut in as_completed(futures):
            fut.result()
            bar.advance(task_id)
    truth = out / "truth"
    truth.mkdir(exist_ok=True)
    scene.objects.to_parquet(truth / "objects.parquet", index=False)
    epoch_truth(spec, scene, conditions).to_parquet(truth / "epochs.parquet", index=False)
    visits = pd.DataFrame([asdict(c) for c in conditions.values()])
    tpl = {c.visit for band in spec.visit_pool for c in template_conditions(spec, conditions, band)}
    visits["in_template"] = visits.visit.isin(tpl)
    visits["fwhm_pix"] = visits.fwhm / spec.pixel_scale
    for col in ("gradient", "dither_pix", "astrometric_error_deg", "ellipticity"):
        visits[col] = visits[col].map(list)
    visits.to_parquet(truth / "visits.parquet", index=False)
    manifest = {"name": spec.name, "seed": seed, "spec": spec.model_dump(mode="json"),
                "truth": {"objects": "truth/objects.parquet", "epochs": "truth/epochs.parquet",
                          "visits": "truth/visits.parquet"},
                "entries": entries}
    path = out / "dataset.yaml"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    tmp.replace(path)
    return path
