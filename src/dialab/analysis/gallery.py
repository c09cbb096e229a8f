"""The report's image section: the same units side by side across flavors, their PSFs and variance, and
cutout galleries of detections and fakes (expected S/N and sign) from each flavor."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import pandas as pd

from ..errors import BadInputError
from . import figures
from .images import Stamps, difference_name, shared_images, unit_members, unit_stamps
from .metrics import contaminant_sources, good_sources, judged
from .runs import FlavorRun

log = logging.getLogger(__name__)
PER_KIND = 4


def pick_units(units: pd.DataFrame) -> list[tuple[str, tuple[int, int]]]:
    """The (visit, detector) with the most false detections over all flavors, and the median one by diaSources."""
    if units.empty:
        return []
    totals = units.groupby(["visit", "detector"]).agg(bad=("good contaminants", lambda b: b.sum(min_count=1)),
                                                       n=("diaSources", "sum"))
    hardest = totals.bad.fillna(totals.n).idxmax()  # without fakes or truth: the most detections
    median = (totals.n - totals.n.median()).abs().idxmin()
    return [("hardest", hardest)] + ([("median", median)] if median != hardest else [])


def _entries(fr: FlavorRun, stamps: Stamps, visit: int, detector: int) -> list[tuple[str, object]]:
    """(label, triplet) of the unit's good and flagged non-fake detections, the faintest found fakes and the
    brightest missed ones."""
    src = fr.sources[(fr.sources.visit == visit) & (fr.sources.detector == detector)]
    good = good_sources(src)
    other = contaminant_sources(src, fr.fakes, fr.truth)
    what = "non-fake" if judged(fr.fakes, fr.truth) else "detection"
    picks = []
    for name, chosen in (("good", src[good & other]), ("flagged", src[~good & other])):
        for row in chosen.sort_values("snr", key=abs, ascending=False).head(PER_KIND).itertuples():
            picks.append((f"{name} {what}, S/N {row.snr:.1f}", stamps.of_source(row.diaSourceId)))
    fakes = fr.fakes
    if not fakes.empty:
        mine = fakes[(fakes.visit == visit) & (fakes.detector == detector)].reset_index(drop=True)
        found = mine[mine.diaSourceId > 0].sort_values("expected_snr").head(PER_KIND)
        missed = mine[(mine.diaSourceId <= 0) & ~mine.near_edge].sort_values("expected_snr", ascending=False)
        for kind, chosen in (("found", found), ("missed", missed.head(PER_KIND))):
            for k, row in chosen.iterrows():
                sign = "template fake (-)" if row.target == "template" else "science fake (+)"
                picks.append((f"{sign} {kind},\nexpected S/N {row.expected_snr:.1f}", stamps.of_fake(k)))
    return [(label, t) for label, t in picks if t is not None]


def _unit_figures(out: Path, members: list[tuple[FlavorRun, pd.Series]], kind: str) -> list[str]:
    """Side-by-side, PSF and gallery figures (HTML) of one (visit, detector) across the flavors that ran it."""
    first, unit = members[0]
    title = f"{kind} unit: visit {unit.visit}, detector {unit.detector} ({unit.band})"
    stem = f"{kind}_{unit.visit}_{unit.detector}"
    parts = [f"<h3>{html.escape(title)}</h3>"]
    science, template, diffs = None, None, {}
    try:
        science, template, diffs = shared_images(members)
        panels = []
        for fr, row in members:
            src = fr.sources[(fr.sources.visit == row.visit) & (fr.sources.detector == row.detector)]
            fakes = fr.fakes[(fr.fakes.visit == row.visit) & (fr.fakes.detector == row.detector)] \
                if not fr.fakes.empty else fr.fakes
            panels.append((fr.label, diffs[fr.label], src, fakes))
        path = figures.side_by_side(science, template, panels, out / f"side_by_side_{stem}.png", title,
                                    with_fakes=any(not fr.fakes.empty for fr, _ in members))
        parts.append(figure_html(path, f"{title}: every flavor (click for full resolution)",
                                 link=figures.full_size(path)))
        psf = figures.psf_and_variance(science, template, diffs[first.label], out / f"psf_{stem}.png",
                                       f"{title}: PSFs and the {first.label} variance plane")
        parts.append(figure_html(psf, f"{title}: PSFs (log scale, NEA circle) and variance"))
    except (OSError, BadInputError, StopIteration) as exc:
        log.info("no full images of %s (%s): cutouts only", title, exc)
        parts.append("<p>The run kept catalogs and cutouts only: no full images of this unit.</p>")
    for fr, row in members:
        images = (science, template, diffs[fr.label], None) if science is not None and fr.label in diffs else None
        try:
            stamps = unit_stamps(fr, row, images)
        except (OSError, BadInputError, StopIteration) as exc:
            log.warning("no cutouts of %s for %s: %s", title, fr.label, exc)
            continue
        path = figures.stamp_gallery(_entries(fr, stamps, row.visit, row.detector),
                                     out / f"gallery_{fr.label.replace(':', '_')}_{stem}.png",
                                     f"{fr.label}, {title}", difference_name(fr.flavor))
        if path is not None:
            caption = "detections that are not fakes (good and flagged), the faintest fakes found and the brightest " \
                "missed" if not fr.fakes.empty else "the most significant detections, good and flagged"
            parts.append(figure_html(path, f"{fr.label}: {caption}"))
    return parts


def image_section(out: Path, runs: list[FlavorRun], units: pd.DataFrame) -> list[str]:
    parts = []
    for kind, (visit, detector) in pick_units(units):
        members = unit_members(runs, visit, detector)
        if members:
            parts += _unit_figures(out, members, kind)
    return parts


def figure_html(path: Path | None, caption: str, link: Path | None = None) -> str:
    if path is None:
        return ""
    text = html.escape(caption)
    image = f'<img src="{path.name}" alt="{text}">'
    if link is not None:
        image = f'<a href="{link.name}">{image}</a>'
    return f"<figure>{image}<figcaption>{text}</figcaption></figure>"
