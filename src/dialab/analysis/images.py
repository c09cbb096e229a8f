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
    return DIFFERENCE_NAMES.get(flavor, "difference")


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
