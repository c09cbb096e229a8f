"""Figures of the flavor comparison (matplotlib, PNG): what people look at rather than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from astropy.visualization import ZScaleInterval  # noqa: E402

from .images import difference_name  # noqa: E402
from .metrics import good_sources  # noqa: E402
from .runs import FlavorRun  # noqa: E402

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


#: Figures with images are also written at this resolution (``*_full.png``), for the report's zoom links.
FULL_DPI = 220


def _save(fig, path: Path, full: bool = False) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    if full:
        fig.savefig(full_size(path), dpi=FULL_DPI)
    plt.close(fig)
    return path


def full_size(path: Path) -> Path:
    return path.with_name(path.stem + "_full.png")


def _zscale_show(ax, image: np.ndarray, title: str, fontsize: int = 10) -> None:
    finite = image[np.isfinite(image)]
    lo, hi = ZScaleInterval().get_limits(finite) if finite.size > 1 else (0, 1)
    ax.imshow(image, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def grouped_bars(table: pd.DataFrame, path: Path, title: str, xlabel: str, log: bool = False,
                 marked: set | None = None, marked_note: str = "") -> Path:
    """Horizontal bars of a (category x flavor) table, categories readable at any count; ``marked``
    categories are drawn in bold with ``marked_note`` after their name (e.g. the flags the cut removes)."""
    marked = marked or set()
    n_cat, n_col = len(table), max(len(table.columns), 1)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.1 * n_cat * n_col + 0.1 * n_cat))
    height = 0.8 / n_col
    y = np.arange(n_cat)[::-1]
    for i, col in enumerate(table.columns):
        ax.barh(y - i * height, table[col].to_numpy(float), height, label=str(col), color=COLOURS[i % len(COLOURS)])
    ax.set_yticks(y - height * (n_col - 1) / 2)
    ax.set_yticklabels([f"{c} {marked_note}" if c in marked else str(c) for c in table.index])
    for tick, c in zip(ax.get_yticklabels(), table.index):
        tick.set_fontweight("bold" if c in marked else "normal")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def efficiency_plot(curves: dict[str, pd.DataFrame], x50: dict[str, float], path: Path, xlabel: str,
                    log_x: bool = False) -> Path:
    """Efficiency curves of all flavors on one plot, Wilson intervals as error bars, 50% points marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, c) in enumerate(curves.items()):
        c = c[c.n > 0]
        colour = COLOURS[i % len(COLOURS)]
        yerr = np.clip([c.efficiency - c.err_lo, c.err_hi - c.efficiency], 0, None)
        ax.errorbar(c.centre, c.efficiency, yerr=yerr, fmt="o-",
                    ms=3, color=colour, label=f"{label} (50% at {x50.get(label, np.nan):.2f})")
        if np.isfinite(x50.get(label, np.nan)):
            ax.axvline(x50[label], color=colour, ls=":", lw=0.8)
    ax.axhline(0.5, color="grey", lw=0.5)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of fakes found")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8)
    return _save(fig, path)




def regime_map(table: pd.DataFrame, path: Path) -> Path:
    """Each metric against the science/template PSF ratio, one line per flavor, 68% bootstrap intervals:
    ``table`` has flavor, metric, psf_ratio, value, lo68, hi68."""
    metrics = list(dict.fromkeys(table.metric))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.0), squeeze=False)
    flavors = list(dict.fromkeys(table.flavor))
    spread = 0.006 * (np.arange(len(flavors)) - (len(flavors) - 1) / 2)
    for ax, metric in zip(axes[0], metrics):
        for i, flavor in enumerate(flavors):
            t = table[(table.metric == metric) & (table.flavor == flavor)].sort_values("psf_ratio")
            if t.value.notna().any():
                yerr = np.clip([t.value - t.lo68, t.hi68 - t.value], 0, None)
                ax.errorbar(t.psf_ratio + spread[i], t.value, yerr=np.nan_to_num(yerr), fmt="o-", ms=4, capsize=2,
                            color=COLOURS[i % len(COLOURS)], label=flavor)
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("science FWHM / template FWHM")
        ax.set_title(metric)
        if metric == "pull width":
            ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("The flavors by PSF regime (points: units grouped by PSF ratio; bars: 68% bootstrap intervals)",
                 fontsize=10)
    return _save(fig, path)


def cause_bars(table: pd.DataFrame, path: Path, known: bool = True) -> Path:
    """Contaminants (or, without fakes or truth, all detections) per flavor and cut, stacked by cause."""
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * len(table.columns)))
    y = np.arange(len(table.columns))[::-1]
    left = np.zeros(len(table.columns))
    for i, cause in enumerate(table.index):
        values = table.loc[cause].to_numpy(float)
        ax.barh(y, values, left=left, color=COLOURS[i % len(COLOURS)], label=cause)
        left += values
    ax.set_yticks(y)
    ax.set_yticklabels(table.columns, fontsize=8)
    what = "contaminants" if known else "diaSources (no fakes or truth to tell contaminants)"
    ax.set_xlabel(what)
    ax.legend(fontsize=8, loc="lower right")
    subject = "Contaminants" if known else "DiaSources"
    ax.set_title(f"{subject} by cause, after the seed's flag cut and after the cut plus the CR flag", fontsize=10)
    return _save(fig, path)


def _overlay(ax, sources: pd.DataFrame, fakes: pd.DataFrame) -> None:
    good = good_sources(sources)
    ax.scatter(sources.x[good], sources.y[good], s=60, facecolors="none", edgecolors="lime", lw=0.8,
               label="good diaSource")
    ax.scatter(sources.x[~good], sources.y[~good], s=40, marker="x", c="orange", lw=0.8, label="flagged diaSource")
    if len(fakes):
        found = fakes.diaSourceId > 0
        template = (fakes.target == "template") if "target" in fakes else pd.Series(False, index=fakes.index)
        for sel, marker, kind in ((~template, "s", "science fake"), (template, "D", "template fake (negative)")):
            ax.scatter(fakes.x[found & sel], fakes.y[found & sel], s=110, marker=marker, facecolors="none",
                       edgecolors="deepskyblue", lw=0.8, label=f"{kind} found")
            ax.scatter(fakes.x[~found & sel], fakes.y[~found & sel], s=110, marker=marker, facecolors="none",
                       edgecolors="red", lw=0.8, label=f"{kind} missed")


def side_by_side(science, template, panels: list[tuple[str, object, pd.DataFrame, pd.DataFrame]], path: Path,
                 title: str, with_fakes: bool = True) -> Path:
    """Template and science, then each flavor's difference (or score) of the same unit, with its detections
    and fakes overlaid; also written at full resolution for zooming. ``panels``: (flavor, difference
    Exposure, its diaSources, its matched fakes)."""
    n = 2 + len(panels)
    cols = min(n, 3)
    rows = int(np.ceil(n / cols))
    aspect = science.shape[0] / science.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 5.0 * aspect * rows + 0.6), squeeze=False)
    fakes_note = " with its fakes" if with_fakes else ""
    images = [(f"template, warped{fakes_note}", template, None), (f"science{fakes_note}", science, None)]
    images += [(f"{flavor}: {difference_name(flavor)}", diff, (src, fakes)) for flavor, diff, src, fakes in panels]
    for ax, (name, exp, marks) in zip(axes.flat, images):
        _zscale_show(ax, np.where(exp.plane("NO_DATA"), np.nan, exp.image), name)
        if marks is not None:
            _overlay(ax, *marks)
    for ax in list(axes.flat)[n:]:
        ax.remove()
    axes.flat[min(2, n - 1)].legend(loc="upper right", fontsize=7, framealpha=0.7)
    fig.suptitle(title)
    return _save(fig, path, full=True)


def stamp_gallery(entries: list[tuple[str, np.ndarray]], path: Path, title: str, difference_label: str = "difference"
                  ) -> Path | None:
    """Rows of template / science / difference stamps, each row titled by its ``label``."""
    if not entries:
        return None
    columns = 2 if len(entries) > 6 else 1
    rows = int(np.ceil(len(entries) / columns))
    fig, axes = plt.subplots(rows, 3 * columns, figsize=(5.4 * columns, 1.9 * rows + 0.5), squeeze=False)
    for k, (label, triplet) in enumerate(entries):
        r, c = k % rows, 3 * (k // rows)
        for j, name in enumerate(("template", "science", difference_label)):
            _zscale_show(axes[r][c + j], triplet[j], f"{label}" if j == 0 else name, fontsize=7)
    for ax in axes.flat:
        if not ax.images:
            ax.remove()
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def psf_and_variance(science, template, difference, path: Path, title: str) -> Path:
    """Science and template PSF stamps on a log scale with the NEA radius drawn, and the difference's variance
    plane; an image without a PSF model gets no PSF panel."""
    psfs = [(name, exp.psf) for name, exp in (("science PSF", science), ("template PSF", template))
            if exp.psf is not None]
    fig, axes = plt.subplots(1, len(psfs) + 1, figsize=(4.6 * (len(psfs) + 1), 4.2), squeeze=False)
    for ax, (name, psf_model) in zip(axes[0], psfs):
        psf = psf_model.at(science.shape[1] / 2, science.shape[0] / 2)
        stamp = psf.stamp()
        peak = float(np.nanmax(stamp))
        ax.imshow(np.clip(stamp, peak * 1e-4, None), origin="lower", cmap="viridis",
                  norm=matplotlib.colors.LogNorm(vmin=peak * 1e-4, vmax=peak))
        centre = (stamp.shape[1] - 1) / 2, (stamp.shape[0] - 1) / 2
        radius = np.sqrt(psf.nea / np.pi)
        ax.add_patch(plt.Circle(centre, radius, fill=False, color="white", lw=1, ls="--"))
        ax.set_title(f"{name} (log): FWHM {psf.fwhm:.2f} px,\nNEA {psf.nea:.1f} px$^2$ (dashed: radius "
                     f"{radius:.2f} px)", fontsize=9)
    var = np.where(difference.plane("NO_DATA"), np.nan, difference.variance)
    ax = axes[0][-1]
    im = ax.imshow(var, origin="lower", cmap="magma", vmin=np.nanpercentile(var, 1), vmax=np.nanpercentile(var, 99))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("difference variance plane", fontsize=9)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def per_ccd_visit(runs: list[FlavorRun], path: Path) -> Path:
    """Histograms of diaSources per CCD-visit, all and after the flag cut, one line per flavor."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, which in zip(axes, ("all", "good")):
        counts = {}
        for fr in runs:
            src = fr.sources if which == "all" else fr.sources[good_sources(fr.sources)]
            per = src.groupby(["visit", "detector"]).size()
            keys = fr.units[["visit", "detector"]].drop_duplicates().itertuples(index=False)
            counts[fr.label] = np.array([per.get((k.visit, k.detector), 0) for k in keys])
        top = max((c.max() for c in counts.values() if len(c)), default=1)
        bins = np.linspace(0, top + 1, min(30, int(top) + 2))
        for i, (label, c) in enumerate(counts.items()):
            ax.hist(c, bins=bins, histtype="step", lw=1.5, color=COLOURS[i % len(COLOURS)],
                    label=f"{label} (median {np.median(c):.0f})")
        ax.set_xlabel(f"diaSources per CCD-visit ({which})")
        ax.set_ylabel("CCD-visits")
        ax.legend(fontsize=8)
    return _save(fig, path)


def sky_scatter(runs: list[FlavorRun], path: Path) -> Path:
    """Good diaObjects (with at least one diaSource passing the flag cut) on the sky, coloured by band and
    sized by nDiaSources, one panel per flavor."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4.4), squeeze=False)
    for ax, fr in zip(axes[0], runs):
        src = fr.sources[good_sources(fr.sources)]
        objects = fr.objects[fr.objects.diaObjectId.isin(set(src.diaObjectId))]
        band_of = src.groupby("diaObjectId").band.agg(lambda b: b.mode().iloc[0] if b.notna().any() else "none")
        for i, (band, ids) in enumerate(band_of.groupby(band_of)):
            o = objects[objects.diaObjectId.isin(set(ids.index))]
            ax.scatter(o.ra, o.dec, s=4 * o.nDiaSources, alpha=0.5, color=COLOURS[i % len(COLOURS)],
                       label=f"{band} ({len(o)})")
        ax.invert_xaxis()
        ax.set_title(f"{fr.label}: {len(objects)} good diaObjects", fontsize=10)
        ax.set_xlabel("RA (deg)")
        ax.set_ylabel("Dec (deg)")
        ax.legend(fontsize=7, title="main band", title_fontsize=7)
    return _save(fig, path)


def roc_plot(table: pd.DataFrame, cut: float, path: Path) -> Path:
    """Reals kept against bogus kept as the reliability threshold varies, one curve per flavor; the cut marked."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, (label, t) in enumerate(table.groupby("flavor", sort=False)):
        colour = COLOURS[i % len(COLOURS)]
        at_cut = t[np.isclose(t.threshold, cut)]
        for ax in axes:
            ax.plot(t["bogus kept"], t["reals kept"], "-", color=colour, label=label)
            ax.plot(at_cut["bogus kept"], at_cut["reals kept"], "o", color=colour)
    axes[0].set_title(f"reliability ROC (dots: the {cut} cut)")
    axes[1].set_xscale("symlog", linthresh=1e-3)
    axes[1].set_xlim(0, 1)
    axes[1].set_ylim(0.8, 1.005)
    axes[1].set_title("zoom: the low false-positive end")
    for ax in axes:
        ax.set_xlabel("false detections kept (false-positive rate)")
        ax.set_ylabel("real changes kept (completeness)")
        ax.legend(fontsize=8)
    return _save(fig, path)
