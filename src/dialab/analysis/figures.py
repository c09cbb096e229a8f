"""Figures of the flavor comparison (matplotlib, PNG): what people look at rather than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from astropy.visualization import ZScaleInterval  # noqa: E402

from ..exposure import read_exposure
from ..injection import inject_catalog
from ..pipeline.config import PipelineConfig
from ..pipeline.manifest import read_manifest
from ..pipeline.prepare import prepare_entry
from ..pipeline.repository import Unit, unit_dir
from .metrics import good_sources  # noqa: E402
from .runs import FlavorRun  # noqa: E402

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def unit_images(fr: FlavorRun, unit: pd.Series):
    """(science with its fakes, warped template with its fakes, difference) of one unit."""
    import yaml

    manifest = read_manifest(fr.manifest)
    entry = next(e for e in manifest.entries if e.visit == unit.visit and e.detector == unit.detector)
    run = yaml.safe_load((fr.run / "run.yaml").read_text())
    science, template = prepare_entry(entry, manifest.root, PipelineConfig.model_validate(run["config"]).repair)
    where = unit_dir(fr.run, Unit(fr.flavor, unit.band, int(unit.visit), int(unit.detector), float(unit.mjd)))
    if (where / "fakes.parquet").is_file():
        seed = run["config"]["inject"]["seed"]
        science, template = inject_catalog(science, template, pd.read_parquet(where / "fakes.parquet"), seed=seed)
    return science, template, read_exposure(where / "difference.fits"), where


def triplet(fr: FlavorRun, unit: pd.Series, images, path: Path, title: str) -> Path:
    """Template, science and difference (zscale) with detections and fakes overlaid; ``images``
    from :func:`unit_images`."""
    science, template, diff, where = images
    src = fr.sources[(fr.sources.visit == unit.visit) & (fr.sources.detector == unit.detector)]
    good = good_sources(src)
    fakes = pd.read_parquet(where / "fakes_matched.parquet") if (where / "fakes_matched.parquet").is_file() \
        else pd.DataFrame(columns=["x", "y", "diaSourceId"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, (name, exp) in zip(axes, (("template (warped)", template), ("science", science), ("difference", diff))):
        img = np.where(exp.plane("NO_DATA"), np.nan, exp.image)
        lo, hi = ZScaleInterval().get_limits(img[np.isfinite(img)])
        ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name)
        ax.scatter(src.x[good], src.y[good], s=60, facecolors="none", edgecolors="lime", lw=0.8, label="good diaSource")
        ax.scatter(src.x[~good], src.y[~good], s=40, marker="x", c="orange", lw=0.8, label="flagged diaSource")
        found = fakes.diaSourceId > 0
        ax.scatter(fakes.x[found], fakes.y[found], s=110, marker="s", facecolors="none", edgecolors="deepskyblue",
                   lw=0.8, label="fake found")
        ax.scatter(fakes.x[~found], fakes.y[~found], s=110, marker="s", facecolors="none", edgecolors="red", lw=0.8,
                   label="fake missed")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[2].legend(loc="upper right", fontsize=7, framealpha=0.7)
    fig.suptitle(title)
    return _save(fig, path)


def cutout_gallery(fr: FlavorRun, unit: pd.Series, path: Path, title: str, per_kind: int = 4) -> Path | None:
    """Template / science / difference stamps from a unit's ``cutouts.fits`` (runs that keep catalogs and
    cutouts only): good and flagged diaSources, found and missed fakes, ``per_kind`` of each, brightest first."""
    where = unit_dir(fr.run, Unit(fr.flavor, unit.band, int(unit.visit), int(unit.detector), float(unit.mjd)))
    if not (where / "cutouts.fits").is_file():
        return None
    from astropy.io import fits

    with fits.open(where / "cutouts.fits") as hdul:
        rows = pd.DataFrame(hdul["SOURCES"].data.tolist(), columns=["diaSourceId", "fake", "x", "y"])
        cubes = {name: hdul[name].data for name in ("TEMPLATE", "SCIENCE", "DIFFERENCE")}
    src = fr.sources[(fr.sources.visit == unit.visit) & (fr.sources.detector == unit.detector)]
    good = src[good_sources(src)].sort_values("psfFlux", key=abs, ascending=False).diaSourceId
    bad = src[~good_sources(src)].sort_values("psfFlux", key=abs, ascending=False).diaSourceId
    picks = [(f"good diaSource {i}", rows.index[rows.diaSourceId == i]) for i in good[:per_kind]]
    picks += [(f"flagged diaSource {i}", rows.index[rows.diaSourceId == i]) for i in bad[:per_kind]]
    if (where / "fakes_matched.parquet").is_file():
        fakes = pd.read_parquet(where / "fakes_matched.parquet").reset_index(drop=True)
        for label, sel in (("fake found", fakes.diaSourceId > 0), ("fake missed", fakes.diaSourceId <= 0)):
            for k in fakes.index[sel][:per_kind]:
                picks.append((f"{label} {k}", rows.index[rows.fake == k]))
    picks = [(label, idx[0]) for label, idx in picks if len(idx)]
    if not picks:
        return None
    fig, axes = plt.subplots(len(picks), 3, figsize=(6, 2.1 * len(picks)), squeeze=False)
    for row, (label, k) in zip(axes, picks):
        for ax, name in zip(row, ("TEMPLATE", "SCIENCE", "DIFFERENCE")):
            stamp = cubes[name][k]
            finite = stamp[np.isfinite(stamp)]
            lo, hi = ZScaleInterval().get_limits(finite) if finite.size else (0, 1)
            ax.imshow(stamp, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name.lower()}" if name != "TEMPLATE" else label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def psf_and_variance(images, path: Path, title: str) -> Path:
    """Science and template PSF stamps (NEA radius in the titles) and the difference's variance plane."""
    science, template, diff, _ = images
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, (name, exp) in zip(axes[:2], (("science PSF", science), ("template PSF", template))):
        if exp.psf is None:
            ax.set_title(f"{name}: none")
            continue
        cy, cx = exp.shape[0] / 2, exp.shape[1] / 2
        psf = exp.psf.at(cx, cy)
        ax.imshow(psf.stamp(), origin="lower", cmap="viridis")
        ax.set_title(f"{name}: FWHM {psf.fwhm:.2f} px, NEA radius {np.sqrt(psf.nea / np.pi):.2f} px")
    var = np.where(diff.plane("NO_DATA"), np.nan, diff.variance)
    im = axes[2].imshow(var, origin="lower", cmap="magma", vmin=np.nanpercentile(var, 1), vmax=np.nanpercentile(var, 99))
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    axes[2].set_title("difference variance plane")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return _save(fig, path)


def grouped_bars(table: pd.DataFrame, path: Path, title: str, ylabel: str, log: bool = False) -> Path:
    """Bars of a (category x flavor) table."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(table) * max(1, len(table.columns)) + 2), 4.2))
    width = 0.8 / max(len(table.columns), 1)
    x = np.arange(len(table))
    for i, col in enumerate(table.columns):
        ax.bar(x + i * width, table[col].to_numpy(float), width, label=str(col), color=COLOURS[i % len(COLOURS)])
    ax.set_xticks(x + width * (len(table.columns) - 1) / 2)
    ax.set_xticklabels([str(i) for i in table.index], rotation=45 if len(table) > 6 else 0, ha="right"
                       if len(table) > 6 else "center")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
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


def sky_scatter(runs: list[FlavorRun], path: Path) -> Path:
    """diaObjects on the sky, sized by nDiaSources, one panel per flavor."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4.4), squeeze=False)
    for ax, fr in zip(axes[0], runs):
        o = fr.objects
        ax.scatter(o.ra, o.dec, s=4 * o.nDiaSources, alpha=0.5)
        ax.invert_xaxis()
        ax.set_title(f"{fr.label}: {len(o)} diaObjects")
        ax.set_xlabel("RA (deg)")
        ax.set_ylabel("Dec (deg)")
    return _save(fig, path)


def psf_ratio_plot(table: pd.DataFrame, path: Path) -> Path:
    """50% S/N point and false detections per unit vs science/template FWHM ratio, one line per flavor."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, t) in enumerate(table.groupby("flavor")):
        t = t.sort_values("psf_ratio")
        colour = COLOURS[i % len(COLOURS)]
        axes[0].plot(t.psf_ratio, t.x50_snr, "o-", color=colour, label=label)
        axes[1].plot(t.psf_ratio, t.contaminants, "o-", color=colour, label=label)
    axes[0].set_ylabel("expected S/N at 50% efficiency")
    axes[1].set_ylabel("false detections per unit")
    for ax in axes:
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("science FWHM / template FWHM")
        ax.legend(fontsize=8)
    return _save(fig, path)
