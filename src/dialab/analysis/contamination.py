"""Why a detection is a contaminant: each diaSource that is neither a fake nor a changing truth object gets
one cause, the first that applies: a cosmic ray (CR flag), a dipole (a misalignment or PSF-mismatch
residual), a bright star or a galaxy of the field at its position (truth objects of a simulated dataset;
on real data, a significant template source there), else unexplained."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..sky import chord, unit_vectors
from .metrics import contaminant_sources, good_sources
from .runs import FlavorRun

CAUSES = ("cosmic ray (CR flag)", "dipole", "near a bright star", "near a galaxy", "on a template source",
          "unexplained")
#: Truth stars brighter than this, or galaxies brighter than GALAXY_MAG, within NEAR_ARCSEC explain a residual.
BRIGHT_STAR_MAG = 21.0
GALAXY_MAG = 23.0
NEAR_ARCSEC = 2.0
#: Without truth: a template forced flux this significant marks a source the subtraction had to remove.
TEMPLATE_SNR = 10.0
CR_FLAGS = ("pixelFlags_cr", "pixelFlags_crCenter")


def _near(sources: pd.DataFrame, objects: pd.DataFrame) -> np.ndarray:
    if objects.empty or sources.empty:
        return np.zeros(len(sources), bool)
    tree = cKDTree(unit_vectors(objects.ra, objects.dec))
    distance, _ = tree.query(unit_vectors(sources.ra, sources.dec))
    return distance <= chord(NEAR_ARCSEC)


def contaminant_causes(fr: FlavorRun) -> pd.DataFrame:
    """The flavor's contaminants with ``cause``, ``good`` (passes the seed's cut) and ``cr`` (CR-flagged)."""
    src = fr.sources
    bad = contaminant_sources(src, fr.fakes, fr.truth).to_numpy(bool)
    out = src.loc[bad, ["diaSourceId", "visit", "detector", "ra", "dec"]].copy()
    out["good"] = good_sources(src).to_numpy(bool)[bad]
    rows = src[bad]
    out["cr"] = rows[[f for f in CR_FLAGS if f in rows]].fillna(False).astype(bool).any(axis=1).to_numpy() \
        if any(f in rows for f in CR_FLAGS) else False
    dipole = rows.isDipole.fillna(False).astype(bool).to_numpy() if "isDipole" in rows else np.zeros(len(rows), bool)
    cause = np.full(len(rows), "unexplained", object)
    if fr.objects_truth is not None:
        t = fr.objects_truth
        star = _near(rows, t[(t.kind == "star") & (t.mag_r < BRIGHT_STAR_MAG)])
        galaxy = _near(rows, t[(t.kind == "galaxy") & (t.mag_r < GALAXY_MAG)])
        cause[galaxy] = "near a galaxy"
        cause[star] = "near a bright star"
    elif {"templateFlux", "templateFluxErr"} <= set(rows.columns):
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.abs(rows.templateFlux / rows.templateFluxErr).to_numpy(float)
        cause[snr >= TEMPLATE_SNR] = "on a template source"
    cause[dipole] = "dipole"
    cause[out.cr.to_numpy(bool)] = "cosmic ray (CR flag)"
    out["cause"] = cause
    return out


def cause_table(runs: list[FlavorRun]) -> pd.DataFrame:
    """Contaminants per cause (rows) and flavor, after the seed's flag cut and after the cut plus the CR flag."""
    columns = {}
    for fr in runs:
        c = contaminant_causes(fr)
        after_cut = c[c.good]
        columns[f"{fr.label} (seed's cut)"] = after_cut.cause.value_counts()
        columns[f"{fr.label} (cut + CR)"] = after_cut[~after_cut.cr].cause.value_counts()
    table = pd.DataFrame(columns).reindex(list(CAUSES)).fillna(0).astype(int)
    table = table[(table > 0).any(axis=1) | (table.index == "unexplained")]
    table.index.name = "cause"
    return table
