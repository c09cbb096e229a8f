"""Metrics of one flavor from its tables: counts, flag cuts, fakes, contamination, efficiency, photometry.

Inputs are the APDB's DiaSource and DiaObject tables (nJy), the matched-fake tables of the units
(``fakes_matched.parquet`` rows, fluxes in counts with the unit's ``njy_per_count``) and, when the
dataset has one, the truth of real variables and transients (``truth/epochs.parquet``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..efficiency import efficiency_curve, fit_sigmoid
from ..measurement import BAD_FLAGS
from ..sky import chord, tangent_offsets, unit_vectors

DEFAULT_BAD_FLAGS = list(BAD_FLAGS)
SNR_BINS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 30, 50, 100, 1000], float)
#: A diaSource this close to a truth variable or transient whose flux changed is real, not contamination.
REAL_RADIUS_ARCSEC = 1.0


def good_sources(sources: pd.DataFrame, flags: list[str] | None = None) -> pd.Series:
    """True for diaSources with none of the bad pixel flags."""
    flags = [f for f in (flags or DEFAULT_BAD_FLAGS) if f in sources]
    if not flags or sources.empty:
        return pd.Series(True, index=sources.index)
    return ~sources[flags].fillna(False).astype(bool).any(axis=1)


def real_variable_sources(sources: pd.DataFrame, truth: pd.DataFrame | None,
                          radius_arcsec: float = REAL_RADIUS_ARCSEC, min_sigma: float = 2.0) -> pd.Series:
    """True for diaSources of the same (visit, detector) within the radius of a truth object whose
    difference flux is at least ``min_sigma`` of the source's flux error."""
    out = pd.Series(False, index=sources.index)
    if truth is None or truth.empty or sources.empty:
        return out
    for (visit, detector), group in sources.groupby(["visit", "detector"]):
        t = truth[(truth.visit == visit) & (truth.detector == detector)]
        if t.empty:
            continue
        pairs = cKDTree(unit_vectors(group.ra, group.dec)).query_ball_tree(
            cKDTree(unit_vectors(t.ra, t.dec)), chord(radius_arcsec))
        change = np.abs(t.diff_flux_nJy.to_numpy())
        err = group.psfFluxErr.abs().fillna(np.inf).to_numpy()
        hit = [any(change[j] >= min_sigma * err[i] for j in js) for i, js in enumerate(pairs)]
        out.loc[group.index] = hit
    return out


def judged(fakes: pd.DataFrame, truth: pd.DataFrame | None) -> bool:
    """Whether contamination can be measured: there are fakes or truth to tell real changes from the rest."""
    return not fakes.empty or (truth is not None and not truth.empty)


def contaminant_sources(sources: pd.DataFrame, fakes: pd.DataFrame, truth: pd.DataFrame | None) -> pd.Series:
    """True for diaSources that are neither a matched fake nor a truth object whose flux changed."""
    if sources.empty:
        return pd.Series(False, index=sources.index)
    fake_ids = set(fakes.diaSourceId[fakes.diaSourceId > 0]) if not fakes.empty else set()
    return ~sources.diaSourceId.isin(fake_ids) & ~real_variable_sources(sources, truth)


#: Kinds of diaSource that are real changes (see :func:`source_kinds`).
POSITIVE_KINDS = ("fake", "template fake", "variable")


def source_kinds(sources: pd.DataFrame, fakes: pd.DataFrame, truth: pd.DataFrame | None) -> pd.Series:
    """What each diaSource is: ``fake``, ``template fake`` (a negative real change), ``variable`` (a truth
    object whose flux changed) or ``unmatched``."""
    kind = pd.Series("unmatched", index=sources.index, dtype=object)
    kind[real_variable_sources(sources, truth).to_numpy()] = "variable"
    if not fakes.empty:
        matched = fakes[fakes.diaSourceId > 0]
        target = dict(zip(matched.diaSourceId, matched.target))
        is_fake = sources.diaSourceId.isin(target).to_numpy()
        kind[is_fake] = ["template fake" if target[i] == "template" else "fake" for i in sources.diaSourceId[is_fake]]
    return kind


def fakes_with_sources(fakes: pd.DataFrame, sources: pd.DataFrame, flags: list[str] | None = None) -> pd.DataFrame:
    """Matched-fake rows joined to their diaSource: measured flux (nJy), goodness, diaObjectId."""
    if fakes.empty:
        return fakes
    out = fakes.copy()
    out["found"] = out.diaSourceId > 0
    out["true_flux_nJy"] = np.where(out.target == "template", -1.0, 1.0) * out.flux_nJy
    keep = ["diaSourceId", "diaObjectId", "psfFlux", "psfFluxErr"]
    src = sources[keep].copy() if not sources.empty else pd.DataFrame(columns=keep)
    src["good"] = good_sources(sources, flags).to_numpy() if not sources.empty else []
    out = out.merge(src.rename(columns={"psfFlux": "meas_flux_nJy", "psfFluxErr": "meas_fluxErr_nJy"}),
                    on="diaSourceId", how="left")
    out["found_good"] = out.found & out.good.fillna(False).astype(bool)
    return out


def count_metrics(sources: pd.DataFrame, objects: pd.DataFrame, fakes: pd.DataFrame,
                  truth: pd.DataFrame | None = None, flags: list[str] | None = None) -> dict:
    """The headline counts of one flavor (and band, if the tables are one band's)."""
    good = good_sources(sources, flags)
    is_real = real_variable_sources(sources, truth)
    contaminant = contaminant_sources(sources, fakes, truth)
    good_objects = set(sources.diaObjectId[good]) if not sources.empty else set()
    usable = fakes[~fakes.near_edge] if not fakes.empty else fakes
    joined = fakes_with_sources(usable, sources, flags) if not usable.empty else usable
    n = len(sources)
    known = judged(fakes, truth)  # without fakes or truth nothing tells a contaminant from a real change
    return {
        "diaSources": n, "diaObjects": len(objects), "good diaSources": int(good.sum()),
        "good diaObjects": int(objects.diaObjectId.isin(good_objects).sum()) if len(objects) else 0,
        "fakes injected": len(usable), "fakes matched": int(joined.found.sum()) if len(joined) else 0,
        "fakes matched (good)": int(joined.found_good.sum()) if len(joined) else 0,
        "real variables matched": int(is_real.sum()),
        "contaminants": int(contaminant.sum()) if known else np.nan,
        "contamination": float(contaminant.mean()) if n and known else np.nan,
        "good contaminants": int((contaminant & good).sum()) if known else np.nan,
        "good contamination": float((contaminant & good).sum() / good.sum()) if good.sum() and known else np.nan,
    }


def efficiency(fakes: pd.DataFrame, column: str, bins: np.ndarray, found: str = "found",
               decreasing: bool = False) -> tuple[pd.DataFrame, float, float]:
    """Binned efficiency (Wilson 68% intervals) and the fitted 50% point with its error."""
    usable = fakes[~fakes.near_edge] if "near_edge" in fakes else fakes
    values = usable[column].to_numpy(float)
    hit = usable[found].to_numpy(bool)
    curve = efficiency_curve(values, hit, bins)
    if len(usable) < 10 or hit.all() or not hit.any():
        return curve, np.nan, np.nan
    fit = fit_sigmoid(values, hit, decreasing=decreasing)
    if not np.nanmin(values) <= fit.x50 <= np.nanmax(values):
        return curve, np.nan, np.nan  # too few fakes round the threshold to place it
    return curve, fit.x50, fit.x50_err


def magnitude_bins(fakes: pd.DataFrame, step: float = 0.5) -> np.ndarray:
    lo, hi = np.floor(fakes.mag.min() / step) * step, np.ceil(fakes.mag.max() / step) * step
    return np.arange(lo, hi + step / 2, step)


def photometry(joined: pd.DataFrame) -> dict:
    """Pulls (measured - true) / error and magnitude residuals of found fakes (flux in nJy)."""
    f = joined[joined.found & np.isfinite(joined.meas_flux_nJy)]
    if f.empty:
        return {"n": 0, "pull median": np.nan, "pull width": np.nan, "mag residual median": np.nan}
    pull = (f.meas_flux_nJy - f.true_flux_nJy) / f.meas_fluxErr_nJy
    with np.errstate(invalid="ignore", divide="ignore"):
        dmag = -2.5 * np.log10(f.meas_flux_nJy / f.true_flux_nJy)
    width = 1.4826 * np.nanmedian(np.abs(pull - np.nanmedian(pull)))
    return {"n": len(f), "pull median": float(np.nanmedian(pull)), "pull width": float(width),
            "mag residual median": float(np.nanmedian(dmag))}


def positional_scatter(joined: pd.DataFrame, objects: pd.DataFrame) -> dict:
    """RMS offsets (arcsec) of the diaObjects of found fakes from the fakes' true positions."""
    f = joined[joined.found].merge(objects[["diaObjectId", "ra", "dec", "nDiaSources"]], on="diaObjectId",
                                   how="inner", suffixes=("", "_obj"))
    if f.empty:
        return {"n": 0, "ra rms": np.nan, "dec rms": np.nan, "mean nDiaSources": np.nan}
    dra, ddec = tangent_offsets(f.ra_obj, f.dec_obj, f.ra, f.dec)
    return {"n": len(f), "ra rms": float(np.sqrt(np.mean(dra**2))), "dec rms": float(np.sqrt(np.mean(ddec**2))),
            "mean nDiaSources": float(f.nDiaSources.mean())}


def flag_counts(sources: pd.DataFrame) -> pd.Series:
    """How many diaSources carry each pixel flag."""
    cols = [c for c in sources.columns if c.startswith("pixelFlags_") and sources[c].dtype != object]
    return sources[cols].fillna(False).astype(bool).sum().rename(lambda c: c.removeprefix("pixelFlags_"))


def per_detector(sources: pd.DataFrame, flags: list[str] | None = None) -> pd.DataFrame:
    good = good_sources(sources, flags)
    return pd.DataFrame({"all": sources.groupby("detector").size(),
                         "good": sources[good].groupby("detector").size()}).fillna(0).astype(int)


def sources_per_object(sources: pd.DataFrame, flags: list[str] | None = None) -> pd.DataFrame:
    """Histogram: number of diaObjects having n diaSources (all, and counting only good ones)."""
    good = good_sources(sources, flags)
    all_n = sources.groupby("diaObjectId").size().value_counts().sort_index()
    good_n = sources[good].groupby("diaObjectId").size().value_counts().sort_index()
    return pd.DataFrame({"all": all_n, "good": good_n}).fillna(0).astype(int).rename_axis("nDiaSources")
