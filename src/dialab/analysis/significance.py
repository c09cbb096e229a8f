"""Whether one flavor is better than another: each metric with a bootstrap interval over units.

Flavors of a run subtract the same (visit, detector) units, so their metrics are compared *paired*: one
bootstrap draw resamples units with replacement and recomputes every flavor's metric on that same draw.
A flavor is called better on a metric only when the 95% interval of the difference excludes zero;
otherwise the report says there is no significant difference. Metrics are computed from per-unit sums
(fakes per expected-S/N bin, good sources and contaminants, pulls), so a draw costs no catalogue work.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit

from .metrics import contaminant_sources, fakes_with_sources, good_sources, judged
from .runs import FlavorRun

#: Fine expected-S/N bins for the bootstrap's binned sigmoid fits (the binning error is far below the spread).
SNR_FINE = np.geomspace(0.3, 3000.0, 97)
DRAWS = 300
LEVEL = 0.95
MIN_UNITS = 3


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    lower_is_better: bool = True
    #: Compare |value - target| rather than the value (a pull width should be 1).
    target: float | None = None

    def badness(self, value):
        v = value if self.target is None else np.abs(np.asarray(value) - self.target)
        return v if self.lower_is_better else -np.asarray(v)


METRICS = (Metric("50% expected S/N", ""), Metric("false detections per unit", " per unit"),
           Metric("good contamination", ""), Metric("pull width", "", target=1.0))


@dataclass
class UnitSums:
    """One flavor's per-unit sums, rows aligned with ``keys`` ((visit, detector) pairs)."""

    keys: list[tuple[int, int]]
    good: np.ndarray
    good_contaminants: np.ndarray
    fakes: np.ndarray  # (units, bins): fakes per expected-S/N bin
    found: np.ndarray
    pulls: np.ndarray  # pulls of found fakes, with their unit's row in pull_unit
    pull_unit: np.ndarray
    psf_ratio: np.ndarray
    #: False without fakes or truth: then every detection would count as a contaminant.
    judged: bool = True


def unit_sums(fr: FlavorRun) -> UnitSums:
    units = fr.units.drop_duplicates(["visit", "detector"]).reset_index(drop=True)
    keys = list(zip(units.visit.astype(int), units.detector.astype(int)))
    row = {k: i for i, k in enumerate(keys)}
    src = fr.sources
    good = good_sources(src).to_numpy(bool)
    contaminant = contaminant_sources(src, fr.fakes, fr.truth).to_numpy(bool)
    where = np.array([row.get(k, -1) for k in zip(src.visit.astype(int), src.detector.astype(int))], int)
    ok = where >= 0
    n = len(keys)
    sums = UnitSums(keys, np.bincount(where[ok & good], minlength=n).astype(float),
                    np.bincount(where[ok & good & contaminant], minlength=n).astype(float),
                    np.zeros((n, len(SNR_FINE) - 1)), np.zeros((n, len(SNR_FINE) - 1)), np.zeros(0), np.zeros(0, int),
                    (units.science_fwhm / units.template_fwhm).to_numpy(float), judged(fr.fakes, fr.truth))
    if fr.fakes.empty:
        return sums
    f = fakes_with_sources(fr.fakes[~fr.fakes.near_edge], src)
    f_row = np.array([row.get(k, -1) for k in zip(f.visit.astype(int), f.detector.astype(int))], int)
    b = np.digitize(f.expected_snr.to_numpy(float), SNR_FINE) - 1
    inside = (f_row >= 0) & (b >= 0) & (b < len(SNR_FINE) - 1)
    np.add.at(sums.fakes, (f_row[inside], b[inside]), 1.0)
    np.add.at(sums.found, (f_row[inside], b[inside]), f.found.to_numpy(bool)[inside].astype(float))
    usable = f.found.to_numpy(bool) & np.isfinite(f.meas_flux_nJy.to_numpy(float)) & (f_row >= 0)
    pulls = ((f.meas_flux_nJy - f.true_flux_nJy) / f.meas_fluxErr_nJy).to_numpy(float)
    sums.pulls, sums.pull_unit = pulls[usable], f_row[usable]
    return sums


def _sigmoid_fit(fakes: np.ndarray, found: np.ndarray, start: np.ndarray | None = None) -> np.ndarray | None:
    """(x50, log width, logit top) of eff(s) = top / (1 + exp(-(s - x50) / width)), fitted by binomial likelihood
    to binned counts at the bins' log centres (L-BFGS with the analytic gradient); None when not measurable."""
    centre = np.sqrt(SNR_FINE[:-1] * SNR_FINE[1:])
    use = fakes > 0
    n, k, s = fakes[use], found[use], centre[use]
    if n.sum() < 10 or k.sum() in (0, n.sum()):
        return None

    def nll_and_grad(p):
        width, top = np.exp(p[1]), expit(p[2])
        z = (s - p[0]) / width
        sig = expit(z)
        e = np.clip(top * sig, 1e-12, 1 - 1e-12)
        d_e = -(k / e - (n - k) / (1 - e))
        slope = top * sig * (1 - sig)
        grad = [np.sum(d_e * slope * (-1 / width)), np.sum(d_e * slope * (-z)), np.sum(d_e * sig * top * (1 - top))]
        return -np.sum(k * np.log(e) + (n - k) * np.log(1 - e)), np.array(grad)

    if start is None:
        start = np.array([float(np.interp(0.5, np.cumsum(k) / k.sum(), s)), 0.0, 4.0])
    fit = minimize(nll_and_grad, start, jac=True, method="L-BFGS-B",
                   bounds=[(s.min(), s.max()), (-5.0, 6.0), (-2.0, 12.0)])
    return fit.x


def _x50(fakes: np.ndarray, found: np.ndarray, start: np.ndarray | None = None) -> tuple[float, np.ndarray | None]:
    params = _sigmoid_fit(fakes, found, start)
    if params is None:
        return np.nan, None
    centre = np.sqrt(SNR_FINE[:-1] * SNR_FINE[1:])[fakes > 0]
    inside = centre.min() < params[0] < centre.max()  # at a bound: not placed by the data
    return (float(params[0]) if inside else np.nan), params


def _weighted_mad_width(values: np.ndarray, weights: np.ndarray) -> float:
    keep = weights > 0
    if keep.sum() < 5:
        return np.nan
    v = np.repeat(values[keep], weights[keep].astype(int))
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def metric_values(sums: UnitSums, weights: np.ndarray, x50_start: np.ndarray | None = None) -> dict:
    """Every metric of one flavor with units counted ``weights`` times (1 each: the plain value); the key
    ``_sigmoid`` holds the efficiency fit's parameters, a good start for the bootstrap's refits."""
    w = np.asarray(weights, float)
    total = w.sum()
    good = (w * sums.good).sum()
    contaminants = (w * sums.good_contaminants).sum() if sums.judged else np.nan
    x50, params = _x50(w @ sums.fakes, w @ sums.found, x50_start)
    return {"50% expected S/N": x50, "_sigmoid": params,
            "false detections per unit": contaminants / total if total else np.nan,
            "good contamination": contaminants / good if good else np.nan,
            "pull width": _weighted_mad_width(sums.pulls, w[sums.pull_unit]) if len(sums.pulls) else np.nan}


def paired_bootstrap(flavors: dict[str, UnitSums], keys: list | None = None, draws: int = DRAWS, seed: int = 0
                     ) -> tuple[dict, dict]:
    """({flavor: {metric: value}}, {flavor: {metric: (draws,) array}}) over the union of the flavors' units
    (or ``keys``), every flavor recomputed on the same draws."""
    keys = keys if keys is not None else sorted({k for s in flavors.values() for k in s.keys})
    index = {k: i for i, k in enumerate(keys)}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(keys), np.full(len(keys), 1 / len(keys)), size=draws) if keys else np.zeros((0, 0))
    values, samples = {}, {}
    for label, s in flavors.items():
        pos = np.array([index.get(k, -1) for k in s.keys], int)
        mine = pos >= 0
        values[label] = metric_values(s, mine.astype(float))
        start = values[label].pop("_sigmoid")
        drawn = [metric_values(s, np.where(mine, c[pos], 0).astype(float), start) for c in counts]
        samples[label] = {m.name: np.array([d[m.name] for d in drawn]) for m in METRICS}
    return values, samples


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) < 0.8 * len(samples) or not len(finite):
        return np.nan, np.nan
    return tuple(np.quantile(finite, [(1 - level) / 2, (1 + level) / 2]))


def comparison_table(values: dict, samples: dict) -> pd.DataFrame:
    """Per metric and flavor pair: both values, their difference, the interval of how much worse a is than b
    (negative: a better; for the pull width in |width - 1|), and the verdict."""
    rows = []
    for m in METRICS:
        for a, b in combinations(sorted(values), 2):
            va, vb = values[a][m.name], values[b][m.name]
            if not (np.isfinite(va) and np.isfinite(vb)):
                continue
            lo, hi = interval(m.badness(samples[a][m.name]) - m.badness(samples[b][m.name]))
            verdict = "no significant difference" if not np.isfinite(lo) or lo <= 0 <= hi else \
                f"{a} better" if hi < 0 else f"{b} better"
            rows.append({"metric": m.name, "a": a, "b": b, "value_a": va, "value_b": vb, "difference": va - vb,
                         "worse_by_lo": lo, "worse_by_hi": hi, "verdict": verdict})
    return pd.DataFrame(rows, columns=["metric", "a", "b", "value_a", "value_b", "difference", "worse_by_lo",
                                       "worse_by_hi", "verdict"])


REGIMES = (("science sharper (PSF ratio < 0.95)", 0.0, 0.95), ("matched (0.95-1.05)", 0.95, 1.05),
           ("science broader (> 1.05)", 1.05, np.inf))


def unit_ratios(flavors: dict[str, UnitSums]) -> dict[tuple[int, int], float]:
    """Each unit's science/template FWHM ratio, the mean over the flavors that ran it."""
    ratios: dict = {}
    for s in flavors.values():
        for k, r in zip(s.keys, s.psf_ratio):
            ratios.setdefault(k, []).append(r)
    return {k: float(np.nanmean(r)) for k, r in ratios.items()}


def regime_keys(flavors: dict[str, UnitSums], lo: float, hi: float) -> list:
    """Units whose PSF ratio is in [lo, hi)."""
    return sorted(k for k, r in unit_ratios(flavors).items() if lo <= r < hi)
