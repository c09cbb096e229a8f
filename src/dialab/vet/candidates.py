"""The candidates of a run: every diaSource of every flavor with what a vetter filters on (band, flag
cut, fake or not) and the measurements shown beside its cutouts."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..analysis.metrics import good_sources, source_kinds
from ..analysis.runs import FlavorRun
from ..measurement import BAD_FLAGS

#: Columns shown with each candidate (those the run's APDB has).
SHOWN = ["snr", "psfFlux", "psfFluxErr", "apFlux", "isDipole", "isNegative", "reliability"]


def flavor_candidates(fr: FlavorRun) -> pd.DataFrame:
    """One row per diaSource of one flavor: ids, unit, position, flags, kind (``fake``, ``template fake``,
    ``variable`` (a truth object whose flux changed), or ``unmatched``) and the shown measurements."""
    src = fr.sources
    units = fr.units[["visit", "detector", "band", "mjd"]].drop_duplicates(["visit", "detector"])
    out = src[["diaSourceId", "visit", "detector", "ra", "dec", "x", "y"]].merge(units, on=["visit", "detector"],
                                                                                  how="left")
    for column in SHOWN:
        out[column] = src[column].to_numpy() if column in src else np.nan
    flags = [f for f in BAD_FLAGS if f in src]
    out["good"] = good_sources(src).to_numpy()
    out["flags"] = [" ".join(f.removeprefix("pixelFlags_") for f, on in zip(flags, row) if on)
                    for row in src[flags].fillna(False).astype(bool).to_numpy()] if len(src) else []
    out["kind"] = source_kinds(src, fr.fakes, fr.truth).to_numpy()
    matched = fr.fakes[fr.fakes.diaSourceId > 0] if not fr.fakes.empty else None
    out["expected_snr"] = out.diaSourceId.map(dict(zip(matched.diaSourceId, matched.expected_snr))) \
        if matched is not None else np.nan
    out.insert(0, "flavor", fr.label)
    return out


def candidate_table(runs: list[FlavorRun]) -> pd.DataFrame:
    """Every flavor's candidates, unit by unit (so that neighbouring rows share their images)."""
    table = pd.concat([flavor_candidates(fr) for fr in runs], ignore_index=True)
    return table.sort_values(["flavor", "band", "visit", "detector", "diaSourceId"], kind="stable",
                             ignore_index=True)
