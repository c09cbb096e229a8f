"""The report's reliability section: how well the score separates real changes from the rest, per flavor,
and what its cut does to the counts beside the flag cut."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import POSITIVE_KINDS, good_sources, judged, source_kinds
from .reliability_training import evaluate
from .runs import FlavorRun

CUT = 0.5


def scored(runs: list[FlavorRun]) -> bool:
    return any("reliability" in fr.sources and fr.sources.reliability.notna().any() for fr in runs)


def _truth(fr: FlavorRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reliability, real 0/1, expected S/N of matched fakes) of a flavor's scored diaSources."""
    src = fr.sources[fr.sources.reliability.notna()]
    real = source_kinds(src, fr.fakes, fr.truth).isin(POSITIVE_KINDS).to_numpy(int)
    expected = np.full(len(src), np.nan)
    if not fr.fakes.empty:
        snr = dict(zip(fr.fakes.diaSourceId, fr.fakes.expected_snr))
        expected = src.diaSourceId.map(snr).to_numpy(float)
    return src.reliability.to_numpy(float), real, expected


def roc_table(runs: list[FlavorRun]) -> pd.DataFrame:
    """Per flavor and threshold: the share of reals kept (completeness) and of bogus kept (false-positive rate)."""
    rows = []
    for fr in runs:
        if not judged(fr.fakes, fr.truth) or "reliability" not in fr.sources:
            continue
        p, real, _ = _truth(fr)
        for t in np.unique(np.r_[np.linspace(0, 1, 101), CUT]):
            rows.append({"flavor": fr.label, "threshold": t, "reals kept": (p[real == 1] >= t).mean(),
                         "bogus kept": (p[real == 0] >= t).mean()})
    return pd.DataFrame(rows)


def evaluation_table(runs: list[FlavorRun]) -> pd.DataFrame:
    rows = []
    for fr in runs:
        if judged(fr.fakes, fr.truth) and "reliability" in fr.sources:
            rows.append({"flavor": fr.label, **evaluate(*_truth(fr), cut=CUT)})
    return pd.DataFrame(rows)


def cut_counts(runs: list[FlavorRun]) -> pd.DataFrame:
    """diaSources, contaminants and matched fakes: all, after the flag cut, after the reliability cut, after both."""
    rows = []
    for fr in runs:
        src = fr.sources
        good = good_sources(src).to_numpy(bool)
        reliable = (src.reliability.fillna(-1) >= CUT).to_numpy(bool) if "reliability" in src else np.ones(len(src), bool)
        known = judged(fr.fakes, fr.truth)
        kinds = source_kinds(src, fr.fakes, fr.truth).to_numpy()
        for name, keep in (("no cut", np.ones(len(src), bool)), ("flag cut", good),
                           (f"reliability >= {CUT}", reliable), ("both", good & reliable)):
            rows.append({"flavor": fr.label, "cut": name, "diaSources": int(keep.sum()),
                         "contaminants": int((keep & (kinds == "unmatched")).sum()) if known else np.nan,
                         "fakes matched": int((keep & np.isin(kinds, ["fake", "template fake"])).sum())
                         if not fr.fakes.empty else np.nan})
    return pd.DataFrame(rows).dropna(axis=1, how="all")
