"""The report's summary: what the run shows about the flavors, each claim with its interval.

A flavor is said to be better on a metric only when the paired bootstrap's 95% interval of the difference
excludes zero (:mod:`.significance`); the statements are made over all units and within each PSF regime,
since the flavors exist for the regime where the science PSF is the sharper one.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from .significance import (
    LEVEL,
    METRICS,
    MIN_UNITS,
    REGIMES,
    comparison_table,
    interval,
    paired_bootstrap,
    regime_keys,
    unit_ratios,
)

#: Units are grouped by PSF ratio in steps of this for the regime map.
RATIO_STEP = 0.05
MAP_DRAWS = 100
_FORMATS = {"50% expected S/N": "{:.2f}", "false detections per unit": "{:.1f}", "good contamination": "{:.1%}",
            "pull width": "{:.2f}"}


def _fmt(metric: str, value: float) -> str:
    return _FORMATS[metric].format(value) if np.isfinite(value) else "-"


def regime_table(sums: dict, step: float = RATIO_STEP, draws: int = MAP_DRAWS) -> pd.DataFrame:
    """Per flavor, metric and PSF-ratio group (of at least 2 units): value and 68% bootstrap interval."""
    ratios = unit_ratios(sums)
    groups: dict = {}
    for k, r in ratios.items():
        groups.setdefault(round(r / step) * step, []).append(k)
    rows = []
    for _, keys in sorted(groups.items()):
        if len(keys) < 2:
            continue
        values, samples = paired_bootstrap(sums, sorted(keys), draws=draws)
        mean_ratio = float(np.mean([ratios[k] for k in keys]))
        for flavor in values:
            for m in METRICS:
                lo, hi = interval(samples[flavor][m.name], 0.68)
                rows.append({"flavor": flavor, "metric": m.name, "psf_ratio": mean_ratio, "units": len(keys),
                             "value": values[flavor][m.name], "lo68": lo, "hi68": hi})
    return pd.DataFrame(rows, columns=["flavor", "metric", "psf_ratio", "units", "value", "lo68", "hi68"])


def _verdict(metric, comparisons: pd.DataFrame, flavors: list[str]) -> str:
    """One sentence: the flavor better than every other, the significant pairs, or no significant difference."""
    c = comparisons[comparisons.metric == metric.name]
    significant = c[c.verdict != "no significant difference"]
    if c.empty:
        return "not measurable here (it needs fakes, or truth for contamination)"
    if significant.empty:
        return "<b>no significant difference</b> between the flavors"
    wins = {f: {row.b if row.verdict == f"{row.a} better" else row.a
                for row in significant.itertuples() if row.verdict == f"{f} better"} for f in flavors}
    best = [f for f, beaten in wins.items() if len(beaten) == len(flavors) - 1]
    parts = []
    for row in significant.itertuples():
        winner = row.a if row.verdict == f"{row.a} better" else row.b
        loser = row.b if winner == row.a else row.a
        va, vb = (row.value_a, row.value_b) if winner == row.a else (row.value_b, row.value_a)
        parts.append(f"{html.escape(winner)} better than {html.escape(loser)} ({_fmt(metric.name, va)} vs "
                     f"{_fmt(metric.name, vb)})")
    lead = f"<b>{html.escape(best[0])} is better than every other flavor</b>; " if best else ""
    return lead + "; ".join(parts) + "; other pairs: no significant difference" * (len(significant) < len(c))


def summary_lines(sums: dict) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """(HTML sentences, the comparisons table, the values table) over all units and per PSF regime."""
    lines, comparisons, value_rows = [], [], []
    scopes = [("all units", sorted({k for s in sums.values() for k in s.keys}))]
    scopes += [(name, regime_keys(sums, lo, hi)) for name, lo, hi in REGIMES]
    for scope, keys in scopes:
        if len(keys) < MIN_UNITS or (scope != "all units" and len(keys) == len(scopes[0][1])):
            continue
        values, samples = paired_bootstrap(sums, keys)
        table = comparison_table(values, samples).assign(scope=scope)
        comparisons.append(table)
        items = []
        for m in METRICS:
            shown = []
            for flavor in values:
                lo, hi = interval(samples[flavor][m.name])
                value_rows.append({"scope": scope, "flavor": flavor, "metric": m.name,
                                   "value": values[flavor][m.name], "lo95": lo, "hi95": hi})
                if np.isfinite(values[flavor][m.name]):
                    shown.append(f"{html.escape(flavor)} {_fmt(m.name, values[flavor][m.name])} "
                                 f"[{_fmt(m.name, lo)}, {_fmt(m.name, hi)}]")
            if shown:
                items.append(f"<li>{m.name}: {_verdict(m, table, list(values))}. <span class='values'>"
                             f"{'; '.join(shown)}</span></li>")
        if items:
            lines.append(f"<p><b>{html.escape(scope)}</b> ({len(keys)} units):</p><ul>{''.join(items)}</ul>")
    note = (f"<p class='note'>Values with {LEVEL:.0%} intervals from a paired bootstrap over units (the flavors "
            "are resampled on the same units). A flavor is called better only when the interval of its difference "
            "from another excludes zero. Pull width: closer to 1 is better.</p>")
    values_table = pd.DataFrame(value_rows, columns=["scope", "flavor", "metric", "value", "lo95", "hi95"])
    return [note, *lines] if lines else [], (pd.concat(comparisons, ignore_index=True) if comparisons else pd.DataFrame()), \
        values_table.dropna(subset=["value"])
