"""A unit's images as the run saw them, and stamps of its candidates.

The images are the prepared science and (warped) template with the unit's fakes injected again from
``fakes.parquet``, and the stored difference; runs that kept catalogs only (``output.keep: catalogs``)
have just the stamps of ``cutouts.fits``. :func:`unit_stamps` serves both, so the report's galleries
and the vetting page show the same 51 x 51 triplets whatever the run kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..exposure import read_exposure
from ..imageops import cut_stamps
from ..injection import inject_catalog
from ..pipeline.config import PipelineConfig
from ..pipeline.manifest import read_manifest
from ..pipeline.prepare import prepare_entry
from ..pipeline.repository import CUTOUT_PLANES, CUTOUT_SIZE, Unit, cutout_rows, read_cutouts, unit_dir
from .runs import FlavorRun

#: What the stored "difference" is, per flavor: preconvolution detects on (and stores) the score-like v * D.
DIFFERENCE_NAMES = {"preconvolution": "score v*D (preconvolved difference)", "zogy": "ZOGY difference D"}


def difference_name(flavor: str) -> str:
    return DIFFERENCE_NAMES.get(flavor.partition(".")[0], "difference")


def unit_folder(fr: FlavorRun, unit) -> Path:
    return unit_dir(fr.run, Unit(fr.flavor, unit.band, int(unit.visit), int(unit.detector), float(unit.mjd)))


def unit_images(fr: FlavorRun, unit):
    """(science with its fakes, warped template with its fakes, difference, unit folder) of one unit;
    OSError when the inputs or the difference are gone."""
    manifest = read_manifest(fr.manifest)
    entry = next(e for e in manifest.entries if e.visit == unit.visit and e.detector == unit.detector)
    run = yaml.safe_load((fr.run / "run.yaml").read_text())
    where = unit_folder(fr, unit)
    difference = read_exposure(where / "difference.fits")
    science, template = prepare_entry(entry, manifest.root, PipelineConfig.model_validate(run["config"]).repair)
    if (where / "fakes.parquet").is_file():
        seed = run["config"]["inject"]["seed"]
        science, template = inject_catalog(science, template, pd.read_parquet(where / "fakes.parquet"), seed=seed)
    return science, template, difference, where


def unit_members(runs: list[FlavorRun], visit: int, detector: int) -> list[tuple[FlavorRun, pd.Series]]:
    """(flavor run, its unit row) of every flavor that ran this (visit, detector)."""
    members = []
    for fr in runs:
        rows = fr.units[(fr.units.visit == visit) & (fr.units.detector == detector)]
        if len(rows):
            members.append((fr, rows.iloc[0]))
    return members


def shared_images(members: list[tuple[FlavorRun, pd.Series]]):
    """(science, template, {flavor label: difference}) of one (visit, detector): the inputs prepared once, from
    the first flavor, and each flavor's own difference; OSError when the inputs or a difference are gone."""
    first, unit = members[0]
    science, template, difference, _ = unit_images(first, unit)
    differences = {first.label: difference}
    for fr, row in members[1:]:
        differences[fr.label] = read_exposure(unit_folder(fr, row) / "difference.fits")
    return science, template, differences


@dataclass
class Stamps:
    """Template / science / difference stamps of one unit's diaSources and fakes (rows as
    :func:`~dialab.pipeline.repository.cutout_rows`)."""

    rows: pd.DataFrame
    cubes: dict[str, np.ndarray]

    def _triplet(self, index) -> np.ndarray | None:
        if not len(index):
            return None
        return np.stack([self.cubes[name][index[0]] for name in CUTOUT_PLANES])

    def of_source(self, dia_source_id: int) -> np.ndarray | None:
        """(3, 51, 51): template, science, difference round a diaSource; None if the unit lacks it."""
        return self._triplet(np.flatnonzero(self.rows.diaSourceId.to_numpy() == dia_source_id))

    def of_fake(self, k: int) -> np.ndarray | None:
        return self._triplet(np.flatnonzero(self.rows.fake.to_numpy() == k))

    def of_sources(self, ids) -> np.ndarray:
        """(n, 3, 51, 51) triplets of these diaSources, in their order (KeyError for one the unit lacks)."""
        index = {i: k for k, i in enumerate(self.rows.diaSourceId.to_numpy()) if i > 0}
        rows = np.array([index[i] for i in ids], int)
        return np.stack([self.cubes[name][rows] for name in CUTOUT_PLANES], axis=1)


def unit_stamps(fr: FlavorRun, unit, images=None) -> Stamps:
    """The unit's stamps: from ``cutouts.fits`` when the run kept it, else cut from ``images`` (or from
    :func:`unit_images`)."""
    where = unit_folder(fr, unit)
    if (where / "cutouts.fits").is_file():
        return Stamps(*read_cutouts(where / "cutouts.fits"))
    science, template, difference, _ = images or unit_images(fr, unit)
    catalog = pd.read_parquet(where / "diaSources.parquet", columns=["diaSourceId", "x", "y"])
    fakes = pd.read_parquet(where / "fakes.parquet") if (where / "fakes.parquet").is_file() else None
    rows = cutout_rows(catalog, fakes)
    return Stamps(rows, {name: cut_stamps(exp.image, rows.x, rows.y, CUTOUT_SIZE)
                         for name, exp in zip(CUTOUT_PLANES, (template, science, difference))})
