"""``dialab report``: the flavors side by side as tables (HTML and CSV) and figures (PNG), in one folder."""

from __future__ import annotations

import html
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BadInputError
from . import figures
from .contamination import cause_table
from .gallery import figure_html, image_section
from .metrics import (
    DEFAULT_BAD_FLAGS,
    SNR_BINS,
    contaminant_sources,
    count_metrics,
    efficiency,
    fakes_with_sources,
    flag_counts,
    good_sources,
    judged,
    magnitude_bins,
    per_detector,
    photometry,
    positional_scatter,
    sources_per_object,
)
from .reliability_report import CUT, cut_counts, evaluation_table, roc_table, scored
from .runs import FlavorRun, load_runs
from .significance import unit_sums
from .summary import regime_table, summary_lines

log = logging.getLogger(__name__)


def _band_objects(objects: pd.DataFrame, band: str) -> pd.DataFrame:
    col = f"{band}_psfFluxNdata"
    return objects[objects[col] > 0] if col in objects else objects.iloc[:0]


def summary_table(runs: list[FlavorRun]) -> pd.DataFrame:
    rows = []
    for fr in runs:
        bands = sorted(fr.units.band.unique())
        for band in bands + (["all"] if len(bands) > 1 else []):
            src = fr.sources if band == "all" else fr.sources[fr.sources.band == band]
            obj = fr.objects if band == "all" else _band_objects(fr.objects, band)
            fk = fr.fakes if band == "all" or fr.fakes.empty else fr.fakes[fr.fakes.band == band]
            rows.append({"flavor": fr.label, "band": band, **count_metrics(src, obj, fk, fr.truth)})
    table = pd.DataFrame(rows).dropna(axis=1, how="all")  # contamination without fakes or truth
    if not any(judged(fr.fakes, fr.truth) for fr in runs):
        table = table.drop(columns=["fakes injected", "fakes matched", "fakes matched (good)",
                                    "real variables matched"], errors="ignore")
    return table


def efficiency_tables(runs: list[FlavorRun]):
    """Curves vs expected S/N, forced S/N and magnitude, and a table of the fitted 50% points."""
    curves = {"expected": {}, "forced": {}, "mag": {}}
    x50 = {"expected": {}, "forced": {}, "mag": {}}
    rows = []
    for fr in runs:
        if fr.fakes.empty:
            continue
        f = fakes_with_sources(fr.fakes, fr.sources)
        f["abs_forced_snr"] = f.forced_snr.abs()
        row = {"flavor": fr.label}
        for key, column, bins, decreasing in (("expected", "expected_snr", SNR_BINS, False),
                                              ("forced", "abs_forced_snr", SNR_BINS, False),
                                              ("mag", "mag", magnitude_bins(f), True)):
            curve, mid, err = efficiency(f, column, bins, decreasing=decreasing)
            curves[key][fr.label], x50[key][fr.label] = curve, mid
            row[f"50% {column}"], row[f"50% {column} err"] = mid, err
        rows.append(row)
    return curves, x50, pd.DataFrame(rows)


def quality_table(runs: list[FlavorRun]) -> pd.DataFrame:
    rows = []
    for fr in runs:
        if fr.fakes.empty:
            continue
        f = fakes_with_sources(fr.fakes[~fr.fakes.near_edge], fr.sources)
        phot = photometry(f)
        pos = positional_scatter(f, fr.objects)
        rows.append({"flavor": fr.label, "fakes found": phot["n"], "pull median": phot["pull median"],
                     "pull width (MAD)": phot["pull width"], "mag residual median": phot["mag residual median"],
                     "diaObject RA rms (arcsec)": pos["ra rms"], "diaObject Dec rms (arcsec)": pos["dec rms"],
                     "mean nDiaSources of fake diaObjects": pos["mean nDiaSources"]})
    return pd.DataFrame(rows)


def unit_table(runs: list[FlavorRun]) -> pd.DataFrame:
    """Per unit: PSF ratio, noise ratio and its false detections (contaminants passing the flag cut)."""
    rows = []
    for fr in runs:
        contaminant = contaminant_sources(fr.sources, fr.fakes, fr.truth) & good_sources(fr.sources)
        per_unit = fr.sources[contaminant].groupby(["visit", "detector"]).size()
        known = judged(fr.fakes, fr.truth)
        for u in fr.units.itertuples():
            rows.append({"flavor": fr.label, "band": u.band, "visit": u.visit, "detector": u.detector,
                         "convolved": u.convolved, "science FWHM": u.science_fwhm, "template FWHM": u.template_fwhm,
                         "psf_ratio": u.science_fwhm / u.template_fwhm, "noise ratio": u.noise_ratio,
                         "diaSources": u.n_diaSources,
                         "good contaminants": int(per_unit.get((u.visit, u.detector), 0)) if known else np.nan,
                         "seconds": u.seconds})
    return pd.DataFrame(rows)




def _table_html(df: pd.DataFrame, name: str, out: Path, caption: str) -> str:
    df.to_csv(out / f"{name}.csv", index=df.index.name is not None)
    body = df.to_html(index=df.index.name is not None, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0,
                      classes="t")
    return f'<h3 id="{name}">{html.escape(caption)}</h3>\n<p class="csv"><a href="{name}.csv">{name}.csv</a></p>\n{body}'


def _distribution_tables(runs) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """diaSources per pixel flag, per detector and per diaObject, one column per flavor (all and good)."""
    flags = pd.DataFrame({fr.label: flag_counts(fr.sources) for fr in runs}).fillna(0).astype(int)
    flags.index.name = "flag"
    detectors = pd.concat({fr.label: per_detector(fr.sources) for fr in runs}, axis=1).fillna(0).astype(int)
    detectors.columns = [f"{a} ({b})" for a, b in detectors.columns]
    detectors = detectors.sort_index().rename_axis("detector")
    per_object = pd.concat({fr.label: sources_per_object(fr.sources) for fr in runs}, axis=1).fillna(0).astype(int)
    per_object.columns = [f"{a} ({b})" for a, b in per_object.columns]
    return flags, detectors, per_object.sort_index()


def _efficiency_figures(out: Path, curves, x50) -> list[str]:
    if not curves["expected"]:
        return []
    return [figure_html(figures.efficiency_plot(curves["expected"], x50["expected"], out / "efficiency_expected_snr.png",
                                                "expected S/N of the fake on the difference", log_x=True),
                        "Efficiency vs expected S/N, all flavors (Wilson 68% intervals; dotted: fitted 50% points)"),
            figure_html(figures.efficiency_plot(curves["forced"], x50["forced"], out / "efficiency_forced_snr.png",
                                                "measured forced-photometry |S/N| at the fake", log_x=True),
                        "Efficiency vs measured forced S/N"),
            figure_html(figures.efficiency_plot(curves["mag"], x50["mag"], out / "efficiency_mag.png", "AB magnitude"),
                        "Efficiency vs magnitude")]


def _distribution_figures(out: Path, runs, flags, detectors, per_object) -> list[str]:
    cut = {f.removeprefix("pixelFlags_") for f in DEFAULT_BAD_FLAGS}
    return [figure_html(figures.grouped_bars(flags, out / "flag_counts.png", "diaSources per pixel flag",
                                             "diaSources", log=True, marked=cut, marked_note="(cut)"),
                        "Flag counts per flavor; bold: the flags of the seed's cut"),
            figure_html(figures.per_ccd_visit(runs, out / "per_ccd_visit.png"), "diaSources per CCD-visit"),
            figure_html(figures.grouped_bars(detectors, out / "per_detector.png", "diaSources per detector",
                                             "diaSources"), "diaSources per detector, all and good"),
            figure_html(figures.grouped_bars(per_object, out / "sources_per_object.png",
                                             "diaObjects with n diaSources", "diaObjects", log=True),
                        "diaSources per diaObject, all and good"),
            figure_html(figures.sky_scatter(runs, out / "sky_diaObjects.png"),
                        "Good diaObjects on the sky by band, sized by nDiaSources")]


_STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table.t{border-collapse:collapse;"
          "font-size:12px}table.t td,table.t th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
          "figure{display:inline-block;margin:0.5em}img{max-width:100%}.csv{font-size:11px;margin:0}"
          ".values{color:#555;font-size:12px}.note{font-size:12px;color:#444}")


def _cause_section(out: Path, causes: pd.DataFrame, known: bool) -> list[str]:
    if known:
        title, note = "Contamination by cause", ""
    else:
        title = "Detections by likely cause"
        note = ("<p>These runs have no fakes and no truth, so a contaminant cannot be told from a real change: "
                "every detection is counted here, by what lies under it.</p>")
    return [f"<h2>{title}</h2>", note, figure_html(figures.cause_bars(causes, out / "causes.png", known), title),
            _table_html(causes, "causes", out, f"{title} (the first cause that applies)")]


def _reliability_section(out: Path, runs) -> list[str]:
    """ROC curves, the false-positive rate at 1, 2 and 5% missed, and the counts with the reliability cut."""
    parts = ["<h2>Reliability</h2>"]
    roc = roc_table(runs)
    if len(roc):
        parts.append(figure_html(figures.roc_plot(roc, CUT, out / "reliability_roc.png"),
                                 "Reliability: real changes kept against false detections kept, per flavor"))
        parts.append(_table_html(evaluation_table(runs), "reliability", out,
                                 "Reliability against the truth (fakes and changing truth objects are real)"))
    return parts + [_table_html(cut_counts(runs), "reliability_cut", out, "Counts with the flag cut and the "
                                "reliability cut")]


def _summary_section(out: Path, runs) -> list[str]:
    """The regime map (headline figure) and the claims with intervals."""
    sums = {fr.label: unit_sums(fr) for fr in runs}
    lines, comparisons, values = summary_lines(sums)
    regimes = regime_table(sums)
    parts = ["<h2>Summary</h2>"]
    if not any(s.judged for s in sums.values()):
        parts.append("<p><b>No fakes and no truth in these runs:</b> efficiency, contamination and photometric "
                     "accuracy cannot be measured, so no flavor is called better (run with <code>--fakes</code>). "
                     "The counts, flags, images and cutouts below still compare them.</p>")
    if regimes.psf_ratio.round(2).nunique() >= 2 and regimes.value.notna().any():
        parts.append(figure_html(figures.regime_map(regimes, out / "regime_map.png"),
                                 "The regime map: each metric against the science/template PSF ratio"))
    parts += lines
    for table, name, caption in ((values, "summary_values", "Every metric with its 95% interval"),
                                 (comparisons, "comparisons", "Every pair of flavors on every metric"),
                                 (regimes, "regime_map", "The regime map's points")):
        if len(table):
            parts.append(_table_html(table, name, out, caption))
    return parts


def build_report(folders: list[str | Path], output: str | Path) -> Path:
    """Write the flavor-comparison report: ``index.html``, its PNG figures and CSV tables.

    Parameters
    ----------
    folders : list of str or Path
        Run folders (each with one or more flavors).
    output : str or Path
        The report folder.

    Returns
    -------
    Path
        ``index.html``.
    """
    if not folders:
        raise BadInputError("give at least one run folder")
    runs = load_runs(folders)
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot write the report there ({exc.strerror})", out) from None
    curves, x50, eff = efficiency_tables(runs)
    quality = quality_table(runs)
    units = unit_table(runs)
    flags, detectors, per_object = _distribution_tables(runs)
    causes = cause_table(runs)
    cut = ", ".join(f.removeprefix("pixelFlags_") for f in DEFAULT_BAD_FLAGS)
    parts = [f"<h1>dialab flavor comparison</h1><p>Runs: {', '.join(html.escape(str(f)) for f in folders)}. "
             f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. The seed's flag cut (\"good\" diaSources): {cut}. "
             "Contaminants: diaSources that match neither a fake nor a truth object whose flux changed.</p>",
             *_summary_section(out, runs),
             _table_html(summary_table(runs), "summary", out, "Counts per flavor and band"),
             *_cause_section(out, causes, any(judged(fr.fakes, fr.truth) for fr in runs))]
    if len(eff):
        parts += ["<h2>Efficiency</h2>", *_efficiency_figures(out, curves, x50),
                  _table_html(eff, "efficiency", out, "Fitted 50% efficiency points"),
                  _table_html(quality, "quality", out, "Photometry and astrometry of found fakes")]
    else:
        parts.append("<p>No fakes were injected in these runs: no efficiency, photometry or contamination by "
                     "truth (run with <code>--fakes</code> for them).</p>")
    if scored(runs):
        parts += _reliability_section(out, runs)
    parts += ["<h2>The same units in every flavor</h2>", *image_section(out, runs, units),
              "<h2>Distributions</h2>", *_distribution_figures(out, runs, flags, detectors, per_object),
              "<h2>Tables</h2>", _table_html(flags, "flags", out, "diaSources per pixel flag"),
              _table_html(detectors, "per_detector", out, "diaSources per detector"),
              _table_html(per_object, "sources_per_object", out, "diaObjects by number of diaSources"),
              _table_html(units, "units", out, "Every unit")]
    for key, label in (("expected", "efficiency vs expected S/N"), ("mag", "efficiency vs magnitude")):
        for flavor, curve in curves[key].items():
            parts.append(_table_html(curve, f"curve_{key}_{flavor.replace(':', '_')}", out, f"{flavor}: {label}"))
    index = out / "index.html"
    index.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>dialab report</title>"
                     f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return index
