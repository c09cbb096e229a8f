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
from .metrics import (
    SNR_BINS,
    count_metrics,
    efficiency,
    fakes_with_sources,
    flag_counts,
    magnitude_bins,
    per_detector,
    photometry,
    positional_scatter,
    real_variable_sources,
    sources_per_object,
)
from .runs import FlavorRun, load_runs

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
    return pd.DataFrame(rows)


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
    """Per unit: PSF ratio, noise ratio and its false detections."""
    rows = []
    for fr in runs:
        contaminant = ~fr.sources.diaSourceId.isin(set(fr.fakes.diaSourceId) if not fr.fakes.empty else set()) \
            & ~real_variable_sources(fr.sources, fr.truth)
        per_unit = fr.sources[contaminant].groupby(["visit", "detector"]).size()
        for u in fr.units.itertuples():
            rows.append({"flavor": fr.label, "band": u.band, "visit": u.visit, "detector": u.detector,
                         "convolved": u.convolved, "science FWHM": u.science_fwhm, "template FWHM": u.template_fwhm,
                         "psf_ratio": u.science_fwhm / u.template_fwhm, "noise ratio": u.noise_ratio,
                         "diaSources": u.n_diaSources, "contaminants": int(per_unit.get((u.visit, u.detector), 0)),
                         "seconds": u.seconds})
    return pd.DataFrame(rows)


def ratio_table(runs: list[FlavorRun], units: pd.DataFrame, step: float = 0.05) -> pd.DataFrame:
    """Per flavor and PSF-ratio group (units within ``step``): the 50% S/N point of their pooled
    fakes and the mean false detections per unit: the regime map of the flavors."""
    rows = []
    for fr in runs:
        mine = units[units.flavor == fr.label].assign(group=lambda t: (t.psf_ratio / step).round() * step)
        for _, t in mine.groupby("group"):
            keys = set(zip(t.visit, t.detector))
            f = fr.fakes[[k in keys for k in zip(fr.fakes.visit, fr.fakes.detector)]] if not fr.fakes.empty \
                else fr.fakes
            x50 = efficiency(fakes_with_sources(f, fr.sources), "expected_snr", SNR_BINS)[1] if len(f) else np.nan
            rows.append({"flavor": fr.label, "psf_ratio": float(t.psf_ratio.mean()), "units": len(t),
                         "x50_snr": x50, "contaminants": float(t.contaminants.mean())})
    return pd.DataFrame(rows)


def winners(summary: pd.DataFrame, eff: pd.DataFrame, quality: pd.DataFrame) -> list[str]:
    """Plain sentences: which flavor is best on which metric."""
    lines = []
    overall = summary[summary.band == ("all" if (summary.band == "all").any() else summary.band.iloc[0])]

    def best(table, column, lower=True, fmt="{:.3g}", key=None):
        t = table.dropna(subset=[column])
        if len(t) < 1:
            return
        values = t[column] if key is None else key(t[column])
        i = values.idxmin() if lower else values.idxmax()
        others = ", ".join(f"{flavor} {fmt.format(v)}" for j, flavor, v in zip(t.index, t.flavor, t[column]) if j != i)
        lines.append(f"<b>{html.escape(str(t.loc[i, 'flavor']))}</b> is best on {html.escape(column)}: "
                     f"{fmt.format(t.loc[i, column])}" + (f" (others: {html.escape(others)})" if others else ""))

    if len(eff):
        best(eff, "50% expected_snr")
        best(eff, "50% mag", lower=False, fmt="{:.2f}")
    best(overall, "good contamination")
    if len(quality):
        best(quality, "pull width (MAD)", key=lambda s: (s - 1).abs(), fmt="{:.2f}")
        best(quality, "diaObject RA rms (arcsec)", fmt="{:.3f}")
    return lines


def _table_html(df: pd.DataFrame, name: str, out: Path, caption: str) -> str:
    df.to_csv(out / f"{name}.csv", index=df.index.name is not None)
    body = df.to_html(index=df.index.name is not None, float_format=lambda v: f"{v:.4g}", na_rep="-", border=0,
                      classes="t")
    return f'<h3 id="{name}">{html.escape(caption)}</h3>\n<p class="csv"><a href="{name}.csv">{name}.csv</a></p>\n{body}'


def _figure_html(path: Path | None, caption: str) -> str:
    if path is None:
        return ""
    text = html.escape(caption)
    return f'<figure><img src="{path.name}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _pick_units(fr: FlavorRun, units: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The hardest unit (most false detections) and the median one (by diaSource count)."""
    mine = units[units.flavor == fr.label].reset_index(drop=True)
    if mine.empty:
        return []
    hardest = mine.loc[mine.contaminants.idxmax()]
    median = mine.iloc[(mine.diaSources - mine.diaSources.median()).abs().argsort().iloc[0]]
    picks = [("hardest", hardest)]
    if (median.visit, median.detector) != (hardest.visit, hardest.detector):
        picks.append(("median", median))
    by_key = fr.units.set_index(["visit", "detector"], drop=False)
    return [(kind, by_key.loc[(row.visit, row.detector)]) for kind, row in picks]


def _distribution_tables(runs) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """diaSources per pixel flag, per detector and per diaObject, one column per flavor (all and good)."""
    flags = pd.DataFrame({fr.label: flag_counts(fr.sources) for fr in runs}).fillna(0).astype(int)
    flags.index.name = "flag"
    detectors = pd.concat({fr.label: per_detector(fr.sources) for fr in runs}, axis=1).fillna(0).astype(int)
    detectors.columns = [f"{a} ({b})" for a, b in detectors.columns]
    detectors.index.name = "detector"
    per_object = pd.concat({fr.label: sources_per_object(fr.sources) for fr in runs}, axis=1).fillna(0).astype(int)
    per_object.columns = [f"{a} ({b})" for a, b in per_object.columns]
    return flags, detectors, per_object


def _summary_figures(out: Path, runs, curves, x50, flags, detectors, per_object, ratios) -> list:
    """(path, caption) of the efficiency curves, distributions, sky scatter and the PSF-ratio plot."""
    figs: list[tuple[Path | None, str]] = []
    if curves["expected"]:
        figs.append((figures.efficiency_plot(curves["expected"], x50["expected"], out / "efficiency_expected_snr.png",
                                             "expected S/N of the fake on the difference", log_x=True),
                     "Efficiency vs expected S/N, all flavors (Wilson 68% intervals; dotted: fitted 50% points)"))
        figs.append((figures.efficiency_plot(curves["forced"], x50["forced"], out / "efficiency_forced_snr.png",
                                             "measured forced-photometry |S/N| at the fake", log_x=True),
                     "Efficiency vs measured forced S/N"))
        figs.append((figures.efficiency_plot(curves["mag"], x50["mag"], out / "efficiency_mag.png", "AB magnitude"),
                     "Efficiency vs magnitude"))
    figs.append((figures.grouped_bars(flags, out / "flag_counts.png", "diaSources per pixel flag", "diaSources",
                                      log=True), "Flag counts per flavor"))
    figs.append((figures.grouped_bars(detectors, out / "per_detector.png", "diaSources per detector",
                                      "diaSources"), "diaSources per detector, all and good"))
    figs.append((figures.grouped_bars(per_object, out / "sources_per_object.png",
                                      "diaObjects with n diaSources", "diaObjects", log=True),
                 "diaSources per diaObject, all and good"))
    figs.append((figures.sky_scatter(runs, out / "sky_diaObjects.png"), "diaObjects on the sky, sized by nDiaSources"))
    if ratios.psf_ratio.round(2).nunique() >= 3:
        figs.append((figures.psf_ratio_plot(ratios, out / "psf_ratio.png"),
                     "50% S/N point (pooled fakes) and false detections per unit vs the science/template PSF ratio"))
    return figs


def _image_figures(out: Path, runs, units: pd.DataFrame) -> list:
    """(path, caption) of the triplets and PSF/variance stamps of each flavor's median and hardest units."""
    image_figs = []
    for fr in runs:
        for kind, unit in _pick_units(fr, units):
            stem = f"{fr.label.replace(':', '_')}_{kind}_{unit.visit}_{unit.detector}"
            title = f"{fr.label}: {kind} unit, visit {unit.visit} detector {unit.detector} ({unit.band})"
            try:
                images = figures.unit_images(fr, unit)
                image_figs.append((figures.triplet(fr, unit, images, out / f"triplet_{stem}.png", title), title))
                image_figs.append((figures.psf_and_variance(images, out / f"psf_{stem}.png", title),
                                   f"{title}: PSFs and variance"))
            except (OSError, BadInputError) as exc:
                gallery = figures.cutout_gallery(fr, unit, out / f"cutouts_{stem}.png", title)
                if gallery is not None:  # a run that kept catalogs and cutouts only
                    image_figs.append((gallery, f"{title}: cutouts (the difference was not kept)"))
                else:
                    log.warning("no images for %s: %s", title, exc)
    return image_figs


_STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table.t{border-collapse:collapse;"
          "font-size:12px}table.t td,table.t th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
          "figure{display:inline-block;margin:0.5em}img{max-width:100%}.csv{font-size:11px;margin:0}")


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
    summary = summary_table(runs)
    curves, x50, eff = efficiency_tables(runs)
    quality = quality_table(runs)
    units = unit_table(runs)
    flags, detectors, per_object = _distribution_tables(runs)
    ratios = ratio_table(runs, units)
    figs = _summary_figures(out, runs, curves, x50, flags, detectors, per_object, ratios)
    image_figs = _image_figures(out, runs, units)
    parts = [f"<h1>dialab flavor comparison</h1><p>Runs: {', '.join(html.escape(str(f)) for f in folders)}. "
             f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Bad-flag cut: "
             "pixelFlags_bad, _suspect, _saturatedCenter, _interpolated, _interpolatedCenter, _edge.</p>",
             "<h2>Summary</h2><ul>" + "".join(f"<li>{line}</li>" for line in winners(summary, eff, quality)) + "</ul>",
             _table_html(summary, "summary", out, "Counts per flavor and band"),
             _table_html(eff, "efficiency", out, "Fitted 50% efficiency points"),
             _table_html(quality, "quality", out, "Photometry and astrometry of found fakes"),
             "<h2>Figures</h2>", *[_figure_html(p, c) for p, c in figs],
             "<h2>Images</h2>", *[_figure_html(p, c) for p, c in image_figs],
             "<h2>Tables</h2>", _table_html(flags, "flags", out, "diaSources per pixel flag"),
             _table_html(detectors, "per_detector", out, "diaSources per detector"),
             _table_html(per_object, "sources_per_object", out, "diaObjects by number of diaSources"),
             _table_html(ratios, "psf_ratio", out, "Flavors vs PSF ratio"),
             _table_html(units, "units", out, "Every unit")]
    for key, label in (("expected", "efficiency vs expected S/N"), ("mag", "efficiency vs magnitude")):
        for flavor, curve in curves[key].items():
            parts.append(_table_html(curve, f"curve_{key}_{flavor.replace(':', '_')}", out, f"{flavor}: {label}"))
    index = out / "index.html"
    index.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>dialab report</title>"
                     f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    return index
