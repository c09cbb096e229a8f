"""The pipeline runner end to end on hsc-sprint-mini: every flavor, Dask = local, resume, config errors."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dialab.cli import main
from dialab.pipeline.config import load_pipeline
from dialab.pipeline.runner import run_pipeline
from dialab.simulate.specs import get_spec
from dialab.simulate.survey import simulate_dataset

from .conftest import apdb_rows as _apdb_rows

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
FLAVORS = ["convolveTemplate", "auto", "preconvolution", "zogy"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return simulate_dataset(get_spec("hsc-sprint-mini"), tmp_path_factory.mktemp("mini"), seed=1, progress=False)


@pytest.fixture(scope="module")
def config():
    return load_pipeline([PIPELINES / "default.yaml", PIPELINES / "all_flavors.yaml"], {"execution": {"workers": 2}})


@pytest.fixture(scope="module")
def local_run(dataset, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-local")
    return run_pipeline(dataset, config, out, progress=False)


def _catalogs(out: Path, flavor: str) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(out)): pd.read_parquet(p) for p in sorted((out / flavor).glob("*/*/*/diaSources.parquet"))}


def test_every_flavor_runs_end_to_end(local_run, dataset):
    out = local_run.out
    n_entries = len(yaml.safe_load(dataset.read_text())["entries"])
    assert local_run.ok and local_run.done == len(FLAVORS) * n_entries
    for flavor in FLAVORS:
        units = sorted((out / flavor).glob("*/*/*/unit.json"))
        assert len(units) == n_entries
        for u in units:
            for name in ("difference.fits", "diaSources.parquet", "fakes.parquet", "fakes_matched.parquet"):
                assert (u.parent / name).is_file(), (u.parent, name)
            # the simulation gives its PSF grids: their own aperture corrections, confirmed by the stars
            assert yaml.safe_load(u.read_text())["science_aperture_correction_source"] == "model"
        tables = _apdb_rows(out, flavor)
        assert len(tables["DiaSource"]) > 0
        assert len(tables["DiaObject"]) <= len(tables["DiaSource"])
        assert tables["DiaSource"].diaSourceId.is_unique and tables["DiaSource"].diaObjectId.notna().all()
        found = sum(int((pd.read_parquet(u.parent / "fakes_matched.parquet").diaSourceId > 0).sum()) for u in units)
        assert found > 0.3 * sum(len(pd.read_parquet(u.parent / "fakes.parquet")) for u in units)
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["status"] == "complete" and run["manifest_sha256"] and "lsst-dax-apdb" in run["versions"]
    # the flavors differ where the science PSF is narrower than the template's
    convolved = {f: {u.parent: yaml.safe_load(u.read_text())["convolved"] for u in (out / f).glob("*/*/*/unit.json")}
                 for f in ("convolveTemplate", "auto")}
    assert set(convolved["convolveTemplate"].values()) == {"template"}
    assert "science" in set(convolved["auto"].values())


def test_dask_executor_gives_the_same_catalogs(local_run, dataset, config, tmp_path):
    dask_config = config.model_copy(update={"flavors": ["convolveTemplate"],
                                            "execution": config.execution.model_copy(update={"executor": "dask"})})
    result = run_pipeline(dataset, dask_config, tmp_path, progress=False)
    assert result.ok
    local, remote = _catalogs(local_run.out, "convolveTemplate"), _catalogs(tmp_path, "convolveTemplate")
    assert local.keys() == remote.keys() and local
    for key in local:
        pd.testing.assert_frame_equal(local[key], remote[key])


def test_association_while_units_run_fills_the_apdb_a_pass_after_them_would(local_run, dataset, config, tmp_path):
    """The driver stores each visit as soon as its units are done, while the workers go on with later ones: the
    APDB must hold exactly what one pass after the last unit stores (ids, objects, forced photometry)."""
    from dialab.apdb import create_apdb, open_apdb
    from dialab.pipeline.manifest import read_manifest
    from dialab.pipeline.runner import Association, plan_units

    flavor = "convolveTemplate"
    create_apdb(tmp_path / flavor / "apdb.sqlite3", tmp_path / flavor / "apdb.yaml")
    manifest = read_manifest(dataset)
    state = Association(local_run.out, manifest, [u for u, _ in plan_units(manifest, [flavor])], config,
                        {flavor: open_apdb(tmp_path / flavor / "apdb.yaml")}).advance(final=True)
    assert state[flavor].stopped is None and state[flavor].stored == local_run.stored[flavor]
    streamed, after = _apdb_rows(local_run.out, flavor), _apdb_rows(tmp_path, flavor)
    for name in ("DiaSource", "DiaObject", "DiaForcedSource"):
        assert len(streamed[name]) > 0
        pd.testing.assert_frame_equal(streamed[name], after[name], check_exact=False, rtol=1e-12)


def test_resume_after_a_failed_unit_ends_like_an_uninterrupted_run(local_run, dataset, config, tmp_path):
    # a manifest whose middle entry reads a file that is broken on the first run and repaired before the resume
    manifest = yaml.safe_load(dataset.read_text())
    victim = sorted(manifest["entries"], key=lambda e: e["mjd"])[len(manifest["entries"]) // 2]
    original = dataset.parent / victim["science"]
    broken = dataset.parent / "resume-test" / original.name
    broken.parent.mkdir(exist_ok=True)
    broken.write_bytes(original.read_bytes()[:5000])
    victim["science"] = str(broken.relative_to(dataset.parent))
    resumed_manifest = dataset.parent / "dataset-resume.yaml"
    resumed_manifest.write_text(yaml.safe_dump(manifest, sort_keys=False))
    one = config.model_copy(update={"flavors": ["convolveTemplate"]})

    first = run_pipeline(resumed_manifest, one, tmp_path, progress=False)
    assert len(first.failures) == 1 and str(victim["visit"]) in first.failures[0][0]
    assert (tmp_path / "failures.csv").is_file() and "convolveTemplate" in first.association_stopped
    assert main(["run", str(resumed_manifest), "-o", str(tmp_path)]) == 2  # a second run needs --resume

    broken.write_bytes(original.read_bytes())
    second = run_pipeline(resumed_manifest, one, tmp_path, resume=True, progress=False)
    assert second.ok and second.done == 1 and second.skipped == len(manifest["entries"]) - 1
    assert not (tmp_path / "failures.csv").exists()
    again = run_pipeline(resumed_manifest, one, tmp_path, resume=True, progress=False)
    assert again.done == 0 and sum(again.stored.values()) == 0

    for key, cat in _catalogs(local_run.out, "convolveTemplate").items():
        pd.testing.assert_frame_equal(cat, pd.read_parquet(tmp_path / key))
    expected, got = _apdb_rows(local_run.out, "convolveTemplate"), _apdb_rows(tmp_path, "convolveTemplate")
    for name in expected:
        pd.testing.assert_frame_equal(expected[name], got[name], check_dtype=False)


def test_keeping_catalogs_only_drops_differences_after_storage(local_run, dataset, config, tmp_path):
    """output.keep: catalogs: the same catalogs and APDB rows (forced photometry included) as a full run, no
    difference.fits left, cutouts whose difference stamps are the difference's pixels, a resume that redoes and
    stores nothing, and a report that shows the cutout galleries, saying the full images are gone."""
    from astropy.io import fits

    from dialab.analysis.report import build_report
    from dialab.exposure import read_exposure

    lean = config.model_copy(update={"flavors": ["convolveTemplate"],
                                     "output": config.output.model_copy(update={"keep": "catalogs"})})
    result = run_pipeline(dataset, lean, tmp_path, progress=False)
    assert result.ok
    units = sorted((tmp_path / "convolveTemplate").glob("*/*/*/unit.json"))
    assert units and not list((tmp_path / "convolveTemplate").rglob("difference.fits"))
    for key, cat in _catalogs(local_run.out, "convolveTemplate").items():
        pd.testing.assert_frame_equal(cat, pd.read_parquet(tmp_path / key))
    expected, got = _apdb_rows(local_run.out, "convolveTemplate"), _apdb_rows(tmp_path, "convolveTemplate")
    for name in expected:
        pd.testing.assert_frame_equal(expected[name], got[name], check_dtype=False)
    # a diaSource's difference stamp is the full run's difference round it (both quantized the same way)
    where = units[0].parent
    full = read_exposure(local_run.out / where.relative_to(tmp_path) / "difference.fits")
    with fits.open(where / "cutouts.fits") as hdul:
        rows, stamps = hdul["SOURCES"].data, hdul["DIFFERENCE"].data
    k = next(i for i, r in enumerate(rows) if r["diaSourceId"] > 0 and 30 < r["x"] < full.shape[1] - 30
             and 30 < r["y"] < full.shape[0] - 30)
    ix, iy = int(round(rows[k]["x"])), int(round(rows[k]["y"]))
    sigma = float(np.sqrt(np.median(full.variance)))
    np.testing.assert_allclose(stamps[k], full.image[iy - 25 : iy + 26, ix - 25 : ix + 26], atol=sigma / 50)
    again = run_pipeline(dataset, lean, tmp_path, resume=True, progress=False)
    assert again.ok and again.done == 0 and sum(again.stored.values()) == 0
    report = build_report([tmp_path], tmp_path / "report")
    assert list((tmp_path / "report").glob("gallery_*.png")) and not list((tmp_path / "report").glob("side_by_side_*"))
    assert "kept catalogs and cutouts only" in report.read_text()


def test_a_kernel_basis_runs_and_is_reported_as_a_method(local_run, dataset, config, tmp_path):
    """flavors: [convolveTemplate.psf-models]: every unit subtracts with that basis, its diaSources reach their
    own APDB, and a report over this run and the Alard-Lupton one compares the two as it compares flavors."""
    import json

    from dialab.analysis.report import build_report

    method = "convolveTemplate.psf-models"
    result = run_pipeline(dataset, config.model_copy(update={"flavors": [method]}), tmp_path, progress=False)
    assert result.ok and result.stored[method] > 0
    units = sorted((tmp_path / method).glob("*/*/*/unit.json"))
    assert units and all(json.loads(u.read_text())["kernel_basis"] == "psf-models" for u in units)
    build_report([local_run.out, tmp_path], tmp_path / "report")
    compared = pd.read_csv(tmp_path / "report" / "comparisons.csv")
    assert {"convolveTemplate", method} <= set(compared.a) | set(compared.b)


@pytest.mark.parametrize("content, message", [
    ("subtract:\n  flavr: auto\n", "subtract.flavr"),
    ("detect:\n  threshold: high\n", "detect.threshold"),
    ("execution:\n  workers: 0\n", "execution.workers"),
])
def test_config_errors_are_one_line_naming_the_key(dataset, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    assert main(["run", str(dataset), "-p", str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(bad) in err and len(err.splitlines()) == 1


def test_missing_manifest_files_are_listed_in_one_error(dataset, tmp_path, capsys):
    manifest = yaml.safe_load(dataset.read_text())
    manifest["entries"][0]["science"] = "nowhere/a.fits"
    manifest["entries"][1]["template"] = "nowhere/b.fits"
    for entry in manifest["entries"]:
        for key in ("science", "template"):
            if not entry[key].startswith("nowhere"):
                entry[key] = str(dataset.parent / entry[key])
    path = tmp_path / "dataset.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert main(["run", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere/a.fits" in err and "nowhere/b.fits" in err and len(err.splitlines()) == 1


def test_association_takes_the_science_correction_its_units_measured(monkeypatch):
    """The driver re-reads each science image for forced photometry: its aperture correction is the one the unit
    measured on that image (carried by the difference's PSF in every flavor), not a second star search; only a
    difference without one (an older version's) has it measured again."""
    import dialab.pipeline.runner as runner
    from dialab.exposure import Exposure
    from dialab.psf import ApertureCorrection, GaussianPsf

    config = load_pipeline()
    plane = ApertureCorrection(1.03, 10.0, 20.0, 1e-4, 0.0, 50.0, 50.0, 0.004, 12)

    def exposure(psf):
        return Exposure(np.zeros((40, 40), np.float32), np.zeros((40, 40), np.int32), np.ones((40, 40), np.float32),
                        psf=psf)

    def no_search(exp, psf=None):
        raise AssertionError("the driver searched the science image's stars again")

    monkeypatch.setattr(runner, "with_aperture_correction", no_search)
    science = runner._with_units_correction(exposure(GaussianPsf(sigma_pix=2.0)),
                                            exposure(GaussianPsf(sigma_pix=2.5).with_aperture_correction(plane)), config)
    assert science.psf.aperture_correction == plane and science.psf.sigma == pytest.approx(2.0, rel=0.01)
    monkeypatch.setattr(runner, "with_aperture_correction", lambda exp, psf=None: exp.psf.with_aperture_correction(1.1))
    older = runner._with_units_correction(exposure(GaussianPsf(sigma_pix=2.0)), exposure(GaussianPsf(sigma_pix=2.5)),
                                          config)
    assert older.psf.aperture_correction_value == pytest.approx(1.1)
