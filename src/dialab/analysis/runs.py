"""Loading what a run wrote (APDB tables, unit summaries, fakes, truth) for the analysis.

Everything per flavor ends up in plain DataFrames, so that the metrics are functions of tables
that tests can also build by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..apdb import open_apdb
from ..errors import BadInputError

log = logging.getLogger(__name__)


@dataclass
class FlavorRun:
    """One flavor of one run: its APDB tables (fluxes in nJy), units, matched fakes and truth."""

    label: str
    flavor: str
    run: Path
    sources: pd.DataFrame
    objects: pd.DataFrame
    units: pd.DataFrame
    fakes: pd.DataFrame
    truth: pd.DataFrame | None
    manifest: Path | None
    #: The simulated field's objects (stars, galaxies, ...), when the dataset has a truth table of them.
    objects_truth: pd.DataFrame | None = None


def _unit_tables(out: Path, flavor: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    import json

    units, fakes = [], []
    for path in sorted((out / flavor).glob("*/*/*/unit.json")):
        summary = json.loads(path.read_text())
        units.append(summary)
        matched = path.parent / "fakes_matched.parquet"
        if matched.is_file():
            f = pd.read_parquet(matched)
            f["visit"], f["detector"], f["band"] = summary["visit"], summary["detector"], summary["band"]
            f["njy_per_count"] = summary.get("njy_per_count", np.nan)
            fakes.append(f)
    return pd.DataFrame(units), (pd.concat(fakes, ignore_index=True) if fakes else pd.DataFrame())


def _truth_table(manifest: Path | None, name: str) -> pd.DataFrame | None:
    """A truth table the manifest names (simulated datasets), else None."""
    if manifest is None or not manifest.is_file():
        return None
    rel = ((yaml.safe_load(manifest.read_text()) or {}).get("truth") or {}).get(name)
    return pd.read_parquet(manifest.parent / rel) if rel and (manifest.parent / rel).is_file() else None


def load_run(out: str | Path) -> list[FlavorRun]:
    """Every flavor of a run folder; a clear error when it holds no finished run."""
    out = Path(out)
    run_yaml = out / "run.yaml"
    if not run_yaml.is_file():
        raise BadInputError("not a dialab run folder (no run.yaml; make one with `dialab run`)", out)
    record = yaml.safe_load(run_yaml.read_text()) or {}
    if record.get("status") not in ("complete", "complete-with-failures"):
        raise BadInputError(f"the run is {record.get('status', 'unknown')}, not complete "
                            "(see its failures.csv; finish it with `dialab run --resume`)", out)
    if record.get("status") == "complete-with-failures":
        log.warning("%s: %d unit(s) failed for good and are left out (failures.csv)", out,
                    len(record.get("failed_units", [])))
    manifest = Path(record["manifest"]) if record.get("manifest") else None
    truth = _truth_table(manifest, "epochs")
    objects_truth = _truth_table(manifest, "objects")
    flavors = []
    for flavor in record.get("flavors", []):
        units, fakes = _unit_tables(out, flavor)
        if units.empty:
            raise BadInputError(f"flavor {flavor} has no finished units", out)
        handle = open_apdb(out / flavor / "apdb.yaml")
        flavors.append(FlavorRun(label=flavor, flavor=flavor, run=out, sources=handle.table("DiaSource"),
                                 objects=handle.table("DiaObject"), units=units, fakes=fakes, truth=truth,
                                 manifest=manifest, objects_truth=objects_truth))
    if not flavors:
        raise BadInputError("the run lists no flavors", out)
    return flavors


def load_runs(folders: list[str | Path]) -> list[FlavorRun]:
    """Flavors of several runs; labels gain the run's folder name where flavors repeat."""
    runs = [fr for folder in folders for fr in load_run(folder)]
    seen = pd.Series([fr.flavor for fr in runs]).value_counts()
    for fr in runs:
        if seen[fr.flavor] > 1:
            fr.label = f"{fr.run.name}:{fr.flavor}"
    return runs
