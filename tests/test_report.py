"""Analysis metrics on hand-made tables, and the HTML report of two real (small) runs."""

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dialab.analysis.metrics import (
    count_metrics,
    efficiency,
    fakes_with_sources,
    flag_counts,
    good_sources,
    photometry,
    sources_per_object,
)
from dialab.analysis.report import build_report
from dialab.analysis.significance import SNR_FINE, UnitSums, comparison_table, interval, paired_bootstrap
from dialab.cli import main
from dialab.pipeline.config import load_pipeline
from dialab.pipeline.runner import run_pipeline
from dialab.simulate.specs import get_spec
from dialab.simulate.survey import simulate_dataset

ARCSEC = 1 / 3600


def crafted_sources() -> pd.DataFrame:
    """Six diaSources of one unit: two are fakes, one a real variable, three contaminants (one bad)."""
    return pd.DataFrame({
        "diaSourceId": [1, 2, 3, 4, 5, 6], "diaObjectId": [10, 10, 11, 12, 13, 13], "visit": 1, "detector": 0,
        "band": "r", "ra": [10.0, 10.01, 10.02, 10.03, 10.04, 10.05], "dec": 0.0,
        "psfFlux": [100.0, -50.0, 80.0, 30.0, 40.0, 60.0], "psfFluxErr": 10.0,
        "pixelFlags_bad": [False, False, False, True, False, False],
        "pixelFlags_edge": [False, True, False, False, False, False], "pixelFlags_cr": False})


def crafted_fakes() -> pd.DataFrame:
    return pd.DataFrame({"diaSourceId": [1, 2, 0, 0], "near_edge": [False, False, False, True],
                         "target": ["visit", "template", "visit", "visit"], "flux_nJy": [110.0, 40.0, 20.0, 20.0],
                         "expected_snr": [11.0, 4.0, 2.0, 2.0], "mag": [22.0, 23.0, 24.0, 24.0],
                         "ra": [10.0, 10.01, 10.1, 10.2], "dec": 0.0})


def crafted_truth() -> pd.DataFrame:
    # a variable at source 3 whose flux changed by 60 nJy (6 sigma), and one at source 5 that changed by 5 nJy
    return pd.DataFrame({"visit": 1, "detector": 0, "ra": [10.02, 10.04 + 0.3 * ARCSEC], "dec": 0.0,
                         "diff_flux_nJy": [60.0, 5.0]})


def test_counts_contamination_and_flag_cut_by_hand():
    sources, fakes, truth = crafted_sources(), crafted_fakes(), crafted_truth()
    objects = pd.DataFrame({"diaObjectId": [10, 11, 12, 13], "ra": 0.0, "dec": 0.0, "nDiaSources": [2, 1, 1, 2]})
    assert good_sources(sources).tolist() == [True, False, True, False, True, True]
    m = count_metrics(sources, objects, fakes, truth)
    assert m["diaSources"] == 6 and m["good diaSources"] == 4
    assert m["good diaObjects"] == 3  # objects 10, 11, 13 have a good source; 12 has only the bad one
    assert m["fakes injected"] == 3  # the near-edge one is left out
    assert m["fakes matched"] == 2 and m["fakes matched (good)"] == 1  # source 2 is flagged edge
    assert m["real variables matched"] == 1
    assert m["contaminants"] == 3 and m["contamination"] == pytest.approx(3 / 6)
    assert m["good contaminants"] == 2 and m["good contamination"] == pytest.approx(2 / 4)
    # without truth every source that is not a fake is a contaminant
    assert count_metrics(sources, objects, fakes)["contaminants"] == 4


def test_efficiency_bins_and_wilson_intervals_by_hand():
    fakes = pd.DataFrame({"expected_snr": [1, 1, 1, 1, 6, 6, 6, 6], "found": [0, 0, 0, 1, 1, 1, 1, 0],
                          "near_edge": False}).astype({"found": bool})
    curve, _, _ = efficiency(fakes, "expected_snr", np.array([0.0, 5.0, 10.0]))
    assert curve.n.tolist() == [4, 4] and curve.found.tolist() == [1, 3]
    # Wilson 68% interval of 3/4: centre (0.75 + 1/8) / 1.25 = 0.7, half-width 0.25 / 1.25 = 0.2
    assert curve.err_lo.iloc[1] == pytest.approx(0.5) and curve.err_hi.iloc[1] == pytest.approx(0.9)
    assert curve.efficiency.tolist() == [0.25, 0.75]


def test_photometric_pulls_flag_counts_and_sources_per_object():
    joined = fakes_with_sources(crafted_fakes(), crafted_sources())
    phot = photometry(joined[~joined.near_edge])
    # pulls: (100 - 110) / 10 = -1 and (-50 - -40) / 10 = -1
    assert phot["n"] == 2 and phot["pull median"] == pytest.approx(-1.0)
    flags = flag_counts(crafted_sources())
    assert flags["bad"] == 1 and flags["edge"] == 1 and flags["cr"] == 0
    hist = sources_per_object(crafted_sources())
    assert hist.loc[1, "all"] == 2 and hist.loc[2, "all"] == 2  # objects 11, 12 have one; 10, 13 two
    assert hist.loc[1, "good"] == 2 and hist.loc[2, "good"] == 1  # good: 10 and 11 one each, 13 two


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    spec = get_spec("hsc-sprint-mini").model_copy(update={"shape": (1024, 1024), "detectors": [49],
                                                          "science_per_band": 2})
    root = tmp_path_factory.mktemp("report")
    manifest = simulate_dataset(spec, root / "data", seed=2, progress=False)
    runs = []
    for name, flavors in (("a", ["convolveTemplate", "auto"]), ("b", ["preconvolution"])):
        config = load_pipeline(overrides={"flavors": flavors, "inject": {"enabled": True, "min_per_detector": 40},
                                          "execution": {"workers": 2}})
        result = run_pipeline(manifest, config, root / name, progress=False)
        assert result.ok
        runs.append(root / name)
    return runs


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if "id" in attrs:
            self.ids.append(attrs["id"])


def test_report_of_two_runs_has_every_table_and_figure(two_runs, tmp_path):
    index = build_report(two_runs, tmp_path / "report")
    text = index.read_text()
    parser = _Collector()
    parser.feed(text)
    parser.close()
    for table in ("summary", "efficiency", "quality", "flags", "per_detector", "sources_per_object", "units", "causes",
                  "summary_values", "comparisons"):
        assert table in parser.ids and (index.parent / f"{table}.csv").is_file()
    expected = ["efficiency_expected_snr", "efficiency_forced_snr", "efficiency_mag", "flag_counts", "per_detector",
                "sources_per_object", "sky_diaObjects", "per_ccd_visit", "causes", "reliability_roc"]
    for stem in expected:
        assert f"{stem}.png" in parser.images
    assert sum(src.startswith("side_by_side_") for src in parser.images) >= 1
    assert sum(src.startswith("psf_") for src in parser.images) >= 1
    assert sum(src.startswith("gallery_") for src in parser.images) >= 3  # one per flavor and unit shown
    for src in parser.images + [link for link in parser.links if link.endswith(".png")]:
        data = (index.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, src
    assert any(link.endswith("_full.png") for link in parser.links)  # zoomable side-by-side
    summary = pd.read_csv(index.parent / "summary.csv")
    assert set(summary.flavor) == {"convolveTemplate", "auto", "preconvolution"}
    assert "is best on" not in text
    values = pd.read_csv(index.parent / "summary_values.csv")
    assert (values.lo95 <= values.value).all() and (values.value <= values.hi95).all()
    comparisons = pd.read_csv(index.parent / "comparisons.csv")
    for row in comparisons.itertuples():  # every claim follows from its interval
        significant = row.worse_by_lo > 0 or row.worse_by_hi < 0
        assert (row.verdict != "no significant difference") == significant
    reliability = pd.read_csv(index.parent / "reliability.csv")
    assert set(reliability.flavor) == set(summary.flavor)
    assert reliability.filter(like="FPR").stack().between(0, 1).all()
    counts = pd.read_csv(index.parent / "reliability_cut.csv")
    for _, rows in counts.groupby("flavor"):  # every cut keeps a subset; both cuts keep the fewest
        n = rows.set_index("cut").diaSources
        assert n["both"] <= min(n["flag cut"], n["reliability >= 0.5"]) <= n["no cut"]
    causes = pd.read_csv(index.parent / "causes.csv", index_col=0)
    for flavor in summary.flavor:  # causes account for every contaminant passing the cut
        rows = summary[summary.flavor == flavor]
        good = (rows[rows.band == "all"] if (rows.band == "all").any() else rows)["good contaminants"].sum()
        assert causes[f"{flavor} (seed's cut)"].sum() == good
        assert causes[f"{flavor} (cut + CR)"].sum() <= good


def test_report_of_one_flavor_states_its_values_without_comparisons(two_runs, tmp_path):
    index = build_report([two_runs[1]], tmp_path / "one")
    text = index.read_text()
    assert "better than" not in text and "preconvolution" in text
    values = pd.read_csv(index.parent / "summary_values.csv")
    assert set(values.flavor) == {"preconvolution"} and values.value.notna().any()


def test_train_reliability_writes_a_model_that_scores_and_prints_its_held_out_evaluation(two_runs, tmp_path, capsys):
    from dialab.reliability import load_model

    model = tmp_path / "model.json"
    assert main(["train-reliability", *map(str, two_runs), "-o", str(model), "--test", str(two_runs[1])]) == 0
    printed = capsys.readouterr().out
    assert "held-out evaluation" in printed and "FPR at 2% missed" in printed and f"held-out run {two_runs[1]}" in printed
    loaded = load_model(model)
    assert loaded.provenance["rows"]["held out"] > 0 and len(loaded.trees) > 0
    assert main(["train-reliability", str(two_runs[0]), "-o", str(tmp_path)]) == 2  # a folder, not a file


def test_report_rejects_an_empty_or_unfinished_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(empty) in err and len(err.splitlines()) == 1
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.yaml").write_text("status: incomplete\nflavors: [auto]\n")
    assert main(["report", str(unfinished), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unfinished" in err and "incomplete" in err and len(err.splitlines()) == 1


def test_readme_figure_is_a_committed_demo_png():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    figure = Path(__file__).resolve().parents[1] / "docs" / "demo-efficiency.png"
    assert "docs/demo-efficiency.png" in readme and figure.read_bytes()[:4] == b"\x89PNG"


def _sums(rng, n_units, contaminants_per_unit, x50=5.0, fakes_per_unit=150):
    """Per-unit sums of a flavor whose truth is known: Poisson false detections, fakes found with a
    logistic efficiency of 50% point ``x50`` (width 0.6), unit pulls."""
    bins = len(SNR_FINE) - 1
    snr = rng.uniform(1, 15, (n_units, fakes_per_unit))
    found = rng.random(snr.shape) < 1 / (1 + np.exp(-(snr - x50) / 0.6))
    fakes, hit = np.zeros((n_units, bins)), np.zeros((n_units, bins))
    b = np.digitize(snr, SNR_FINE) - 1
    for u in range(n_units):
        np.add.at(fakes[u], b[u], 1.0)
        np.add.at(hit[u], b[u], found[u].astype(float))
    pulls = rng.normal(0, 1, n_units * 50)
    return UnitSums(keys=[(1000 + u, 1) for u in range(n_units)], good=np.full(n_units, 200.0),
                    good_contaminants=rng.poisson(contaminants_per_unit, n_units).astype(float), fakes=fakes,
                    found=hit, pulls=pulls, pull_unit=np.repeat(np.arange(n_units), 50),
                    psf_ratio=np.full(n_units, 1.2))


def test_bootstrap_intervals_cover_the_truth_and_claims_need_a_real_difference():
    rng = np.random.default_rng(5)
    covered = 0
    for _ in range(20):  # the 95% interval of the 50% point holds the true 5.0 about 95% of the time
        values, samples = paired_bootstrap({"a": _sums(rng, 12, 10)}, draws=200)
        lo, hi = interval(samples["a"]["50% expected S/N"])
        covered += lo <= 5.0 <= hi
    assert covered >= 16
    # the same true rates: no claim; twice the false detections: a claim, in the right direction
    values, samples = paired_bootstrap({"a": _sums(rng, 12, 10), "b": _sums(rng, 12, 10)}, draws=200)
    table = comparison_table(values, samples)
    assert (table[table.metric.isin(["false detections per unit", "50% expected S/N"])].verdict
            == "no significant difference").all()
    values, samples = paired_bootstrap({"a": _sums(rng, 12, 10), "b": _sums(rng, 12, 20)}, draws=200)
    table = comparison_table(values, samples).set_index("metric")
    assert table.loc["false detections per unit", "verdict"] == "a better"
