"""``dialab train-reliability``: the reliability model from runs with fakes, and vetting labels.

Positives are the detections of injected fakes (science fakes, and template fakes as negative real
changes), of truth objects whose flux changed, and those labelled real on the vetting page; negatives are
the detections that match no simulated truth, and those labelled bogus. The units (visit, detector) of
the runs are split, never their detections: 60% fit the trees, 20% calibrate their probability
(isotonic regression), 20% are held out for the printed evaluation.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .. import __version__
from ..errors import BadInputError
from ..reliability import ReliabilityModel, features
from .images import shared_images, unit_folder, unit_members, unit_stamps
from .metrics import POSITIVE_KINDS, source_kinds
from .runs import FlavorRun, load_runs
from .significance import REGIMES

log = logging.getLogger(__name__)

#: Columns of the training table that describe a detection rather than feed the model.
NOT_FEATURES = ("kind", "vetted", "label", "expected_snr", "psf_ratio", "flavor", "run", "visit", "detector",
                "diaSourceId")
#: Fakes at least this significant must survive the reliability cut (the acceptance's "bright" fakes).
BRIGHT_SNR = 8.0


def _labels(run: Path) -> dict:
    from ..vet.labels import LABELS_FILE, LabelStore

    if not (run / LABELS_FILE).is_file():
        return {}
    table = LabelStore(run).table()
    return {(f, i): label for f, i, label in zip(table.flavor, table.diaSourceId, table.label)}


def _unit_rows(fr: FlavorRun, unit, images, labels: dict) -> pd.DataFrame:
    """Features and labels of one unit of one flavor."""
    where = unit_folder(fr, unit)
    catalog = pd.read_parquet(where / "diaSources.parquet")
    if catalog.empty:
        return pd.DataFrame()
    table = features(catalog, unit_stamps(fr, unit, images).of_sources(catalog.diaSourceId))
    units = fr.sources[(fr.sources.visit == unit.visit) & (fr.sources.detector == unit.detector)]
    kind = dict(zip(units.diaSourceId, source_kinds(units, fr.fakes, fr.truth)))
    table["kind"] = [kind.get(i, "unmatched") for i in catalog.diaSourceId]
    table["vetted"] = [labels.get((fr.flavor, i)) for i in catalog.diaSourceId]
    real = table.kind.isin(POSITIVE_KINDS) | (table.vetted == "real")
    table["label"] = np.where(table.vetted == "bogus", 0, real.astype(int))
    fakes = fr.fakes[(fr.fakes.visit == unit.visit) & (fr.fakes.detector == unit.detector)] if not fr.fakes.empty \
        else fr.fakes
    expected = dict(zip(fakes.diaSourceId, fakes.expected_snr)) if len(fakes) else {}
    table["expected_snr"] = [expected.get(i, np.nan) for i in catalog.diaSourceId]
    table["psf_ratio"] = float(unit.science_fwhm / unit.template_fwhm)
    table["flavor"], table["run"] = fr.flavor, str(fr.run)
    table["visit"], table["detector"], table["diaSourceId"] = unit.visit, unit.detector, catalog.diaSourceId.to_numpy()
    return table[table.vetted != "skip"]


def training_table(folders: list[str | Path]) -> pd.DataFrame:
    """Features and labels of every detection of the runs; each unit's images are prepared once for all flavors."""
    runs = load_runs(folders)
    tables = []
    for run in dict.fromkeys(fr.run for fr in runs):
        flavors = [fr for fr in runs if fr.run == run]
        labels = _labels(run)
        for unit in flavors[0].units.drop_duplicates(["visit", "detector"]).itertuples(index=False):
            members = unit_members(flavors, unit.visit, unit.detector)
            try:  # a catalogs-only run has its stamps in cutouts.fits instead
                science, template, differences = shared_images(members)
            except (OSError, BadInputError):
                science = None
            for fr, row in members:
                images = None if science is None else (science, template, differences[fr.label], None)
                try:
                    tables.append(_unit_rows(fr, row, images, labels))
                except (OSError, BadInputError) as exc:
                    log.warning("%s visit %s detector %s left out of training: %s", fr.label, row.visit,
                                row.detector, exc)
    tables = [t for t in tables if len(t)]
    if not tables:
        raise BadInputError("no detections to train on in " + ", ".join(str(f) for f in folders))
    return pd.concat(tables, ignore_index=True)


def _split_units(table: pd.DataFrame, seed: int) -> np.ndarray:
    """0 (fit), 1 (calibrate) or 2 (held out) per row, drawn per (run, visit, detector)."""
    keys = table.run + ":" + table.visit.astype(str) + ":" + table.detector.astype(str)
    unique = np.array(sorted(keys.unique()))
    if len(unique) < 3:
        raise BadInputError(f"need at least 3 (visit, detector) units to fit, calibrate and hold out, got {len(unique)}")
    order = np.random.default_rng(seed).permutation(len(unique))
    part = np.zeros(len(unique), int)
    part[order[int(0.6 * len(unique)) :]] = 1
    part[order[int(0.8 * len(unique)) :]] = 2
    return keys.map(dict(zip(unique, part))).to_numpy()


def _export(clf, names: list[str], calibration, provenance: dict) -> ReliabilityModel:
    """The fitted scikit-learn trees as plain arrays (their ``decision_function`` exactly)."""
    trees = []
    for (predictor,) in clf._predictors:
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits are not exported")
        trees.append({"feature": nodes["feature_idx"].astype(int), "threshold": nodes["num_threshold"].astype(float),
                      "missing_left": nodes["missing_go_to_left"].astype(bool), "left": nodes["left"].astype(int),
                      "right": nodes["right"].astype(int), "is_leaf": nodes["is_leaf"].astype(bool),
                      "value": nodes["value"].astype(float)})
    model = ReliabilityModel("", names, float(np.ravel(clf._baseline_prediction)[0]), trees,
                             calibration.X_thresholds_, calibration.y_thresholds_,
                             {**provenance, "trained": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%S}"})
    model.version = "r" + hashlib.sha256(model.to_json(with_provenance=False).encode()).hexdigest()[:6]
    return model


def evaluate(probability: np.ndarray, label: np.ndarray, expected_snr: np.ndarray, cut: float = 0.5) -> dict:
    """At ``cut``: the share of false detections removed and of reals (and of fakes of expected S/N >= 8) kept;
    the false-positive rate at 1%, 2% and 5% of reals missed; ROC area."""
    from sklearn.metrics import roc_auc_score

    real, bogus = label == 1, label == 0
    bright = real & (expected_snr >= BRIGHT_SNR)
    out = {"reals": int(real.sum()), "bogus": int(bogus.sum()),
           "bogus removed": float((probability[bogus] < cut).mean()) if bogus.any() else np.nan,
           "reals kept": float((probability[real] >= cut).mean()) if real.any() else np.nan,
           "fakes S/N>=8 kept": float((probability[bright] >= cut).mean()) if bright.any() else np.nan,
           "ROC area": float(roc_auc_score(label, probability)) if real.any() and bogus.any() else np.nan}
    for missed in (0.01, 0.02, 0.05):
        threshold = np.quantile(probability[real], missed) if real.any() else np.nan
        out[f"FPR at {missed:.0%} missed"] = float((probability[bogus] >= threshold).mean()) if bogus.any() \
            else np.nan
    return out


def train(table: pd.DataFrame, seed: int = 0, sources: list[str] | None = None) -> tuple[ReliabilityModel, dict]:
    """Fit, calibrate and evaluate (on held-out units) a model; returns it and the held-out evaluation."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.isotonic import IsotonicRegression

    names = [c for c in table.columns if c not in NOT_FEATURES]
    part = _split_units(table, seed)
    x, y = table[names].to_numpy(float), table.label.to_numpy(int)
    if len(np.unique(y[part == 0])) < 2:
        raise BadInputError("the training units hold only one class: add runs with fakes (or vetting labels)")
    clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.08, max_leaf_nodes=31, min_samples_leaf=20,
                                         l2_regularization=1.0, early_stopping=True, validation_fraction=0.15,
                                         random_state=seed)
    clf.fit(x[part == 0], y[part == 0])
    raw = clf.decision_function(x)
    calibration = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    calibration.fit(1 / (1 + np.exp(-raw[part == 1])), y[part == 1])
    provenance = {"trained_on": sources or sorted(table.run.unique()), "rows": {"fit": int((part == 0).sum()),
                  "calibrate": int((part == 1).sum()), "held out": int((part == 2).sum())}, "seed": seed,
                  "dialab": __version__}
    model = _export(clf, names, calibration, provenance)
    held = part == 2
    probability = model.probability(table[held])
    result = {"all flavors": evaluate(probability, y[held], table.expected_snr.to_numpy(float)[held])}
    for flavor, rows in table[held].groupby("flavor"):
        result[flavor] = evaluate(model.probability(rows), rows.label.to_numpy(int), rows.expected_snr.to_numpy(float))
    model.provenance["held_out_evaluation"] = result["all flavors"]
    return model, result


def evaluation_text(evaluation: dict[str, dict]) -> str:
    """The evaluations as one aligned table, a row per scope."""
    return "held-out evaluation (reliability cut 0.5; FPR: bogus passing at the given share of reals missed):\n" + \
        pd.DataFrame(evaluation).T.to_string(float_format=lambda v: f"{v:.3f}")


def evaluate_runs(model: ReliabilityModel, folders: list[str | Path]) -> dict[str, dict]:
    """The model on every detection of runs it was not trained on: all, and per PSF regime."""
    table = training_table(folders)
    probability = model.probability(table)
    out = {"all": evaluate(probability, table.label.to_numpy(int), table.expected_snr.to_numpy(float))}
    for name, lo, hi in REGIMES:
        inside = ((table.psf_ratio >= lo) & (table.psf_ratio < hi)).to_numpy()
        if inside.any():
            out[name] = evaluate(probability[inside], table.label.to_numpy(int)[inside],
                                 table.expected_snr.to_numpy(float)[inside])
    return out


#: The shipped model's runs (``make reliability-model``): both PSF regimes (hsc-sprint-mini's seeing spread, psf-sweep's
#: science/template ratios 0.6-1.6), several seeds, seeings and star densities, every flavor, fakes. The ``test`` runs
#: are held out entirely: other seeds, a crowded sweep, a dense field.
DEFAULT_RUNS = {
    "train-mini-11": ("hsc-sprint-mini", 11, {}),
    "train-mini-12-sparse": ("hsc-sprint-mini", 12, {"star_density": 1.0e4, "seeing_range": (0.4, 1.25)}),
    "train-sweep-13": ("psf-sweep", 13, {}),
    "test-sweep-21-crowded": ("psf-sweep", 21, {"star_density": 6.0e4}),
    "test-mini-22-dense": ("hsc-sprint-mini", 22, {"star_density": 5.0e4, "galaxy_density": 2.0e5}),
}


def make_default_runs(root: str | Path, workers: int | None = None) -> dict[str, Path]:
    """Simulate and run (every flavor, fakes) the datasets of ``DEFAULT_RUNS`` under ``root``; existing ones are
    resumed, not redone."""
    from ..pipeline.config import load_pipeline
    from ..pipeline.runner import run_pipeline
    from ..simulate.specs import get_spec
    from ..simulate.survey import simulate_dataset

    out = {}
    for name, (spec, seed, update) in DEFAULT_RUNS.items():
        folder = Path(root) / name
        manifest = folder / "data" / "dataset.yaml"
        if not manifest.is_file():
            simulate_dataset(get_spec(spec).model_copy(update=update), folder / "data", seed=seed, workers=workers)
        config = load_pipeline(overrides={
            "flavors": ["convolveTemplate", "auto", "preconvolution", "zogy"], "reliability": {"enabled": False},
            "inject": {"enabled": True, "density_per_deg2": 20000, "min_per_detector": 40, "seed": seed},
            "execution": {"workers": workers}})
        record = folder / "run" / "run.yaml"
        status = (yaml.safe_load(record.read_text()) or {}).get("status") if record.is_file() else None
        if status not in ("complete", "complete-with-failures"):
            run_pipeline(manifest, config, folder / "run", resume=status is not None, skip_failed=True)
        out[name] = folder / "run"
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dialab.analysis.reliability_training WORKDIR MODEL``: the shipped model, reproducibly."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("workdir", help="folder for the simulated datasets and runs (reused when present)")
    parser.add_argument("model", help="model file to write")
    parser.add_argument("--workers", type=int)
    args = parser.parse_args(argv)
    runs = make_default_runs(args.workdir, args.workers)
    train_runs = [str(p) for n, p in runs.items() if n.startswith("train")]
    table = training_table(train_runs)
    model, evaluation = train(table, sources=[n for n in runs if n.startswith("train")])
    for name, path in runs.items():
        if name.startswith("test"):
            for scope, result in evaluate_runs(model, [path]).items():
                evaluation[f"{name}: {scope}"] = result
    model.provenance["held_out_runs"] = {k: v for k, v in evaluation.items() if k.startswith("test")}
    Path(args.model).write_text(model.to_json())
    print(evaluation_text(evaluation))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
