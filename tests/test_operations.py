"""Operations-grade runs: a unit that always fails, interrupts, moved/copied/reused run folders, a lost APDB,
damaged unit files, dead services and secrets, each against an uninterrupted reference run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits

from dialab.apdb import open_apdb
from dialab.cli import main
from dialab.pipeline.config import load_pipeline
from dialab.pipeline.runner import run_pipeline
from dialab.simulate.specs import get_spec
from dialab.simulate.survey import simulate_dataset

from .conftest import apdb_rows, postgres_url

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "pipelines" / "default.yaml"
FLAVOR = "convolveTemplate"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """hsc-sprint-mini: 12 (visit, detector) entries of 1024 x 1024 pixels, a few seconds each."""
    spec = get_spec("hsc-sprint-mini")
    return simulate_dataset(spec, tmp_path_factory.mktemp("ops-data"), seed=2, progress=False)


@pytest.fixture(scope="module")
def config():
    return load_pipeline([DEFAULT], {"flavors": [FLAVOR], "execution": {"workers": 2}})


@pytest.fixture(scope="module")
def reference(dataset, config, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted, resumed, moved or repaired run must end up equal to."""
    out = tmp_path_factory.mktemp("ops-reference")
    result = run_pipeline(dataset, config, out, progress=False)
    assert result.ok and result.stored[FLAVOR] == len(yaml.safe_load(dataset.read_text())["entries"])
    return out


def _assert_same_apdb(expected: Path, got: Path) -> None:
    want, have = apdb_rows(expected, FLAVOR), apdb_rows(got, FLAVOR)
    for name in want:
        pd.testing.assert_frame_equal(want[name], have[name], check_dtype=False)


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dialab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _run_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(dataset), "-p", str(DEFAULT), "-o", str(out), "--flavor", FLAVOR, "--workers", "2", *extra]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (its workers, their fork server, the resource tracker)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _wait_for_units(out: Path, at_least: int, process: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while len(list(out.glob(f"{FLAVOR}/*/*/*/unit.json"))) < at_least:
        assert process.poll() is None, process.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("sig, when", [(signal.SIGINT, "units"), (signal.SIGTERM, "units"),
                                       (signal.SIGTERM, "association")])
def test_interrupt_then_resume_equals_an_uninterrupted_run(dataset, reference, tmp_path, sig, when):
    total = len(yaml.safe_load(dataset.read_text())["entries"])
    process = _cli(*_run_args(dataset, tmp_path))
    _wait_for_units(tmp_path, 2 if when == "units" else total, process)
    helpers = _descendants(process.pid)
    assert helpers or when == "association", "the run should have worker processes"
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["status"] == "interrupted"
    deadline = time.time() + 10
    while _alive(helpers) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(helpers), "worker processes outlived the interrupted run"
    done = len(list(tmp_path.glob(f"{FLAVOR}/*/*/*/unit.json")))
    if when == "units":
        assert done < total  # queued units were cancelled, not run to the end
    resumed = run_pipeline(dataset, load_pipeline([DEFAULT], {"flavors": [FLAVOR], "execution": {"workers": 2}}),
                           tmp_path, resume=True, progress=False)
    assert resumed.ok and resumed.done == total - done
    _assert_same_apdb(reference, tmp_path)


def test_a_unit_that_always_fails_does_not_block_the_apdb_with_skip_failed(dataset, reference, config, tmp_path,
                                                                             capsys):
    manifest = yaml.safe_load(dataset.read_text())
    victim = sorted(manifest["entries"], key=lambda e: e["mjd"])[3]
    bad = dataset.parent / "all-nan.fits"
    fits.PrimaryHDU(np.full((1024, 1024), np.nan, np.float32)).writeto(bad, overwrite=True)
    victim["science"] = bad.name
    path = dataset.parent / "dataset-with-a-bad-exposure.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert main(_run_args(path, tmp_path, "--skip-failed")) == 1
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "association waits" not in printed
    handle = open_apdb(tmp_path / FLAVOR / "apdb.yaml")
    for e in manifest["entries"]:
        assert handle.contains(e["visit"], e["detector"]) == (e is not victim), e
    label = f"{FLAVOR}/{victim['band']}/{victim['visit']}/{victim['detector']}"
    assert label in (tmp_path / "failures.csv").read_text()
    record = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert record["status"] == "complete-with-failures" and record["failed_units"][0]["unit"] == label
    # the failure is final: a resume neither retries it nor stores anything twice
    again = run_pipeline(path, config, tmp_path, resume=True, progress=False, skip_failed=True)
    assert again.done == 0 and sum(again.stored.values()) == 0
    assert label in (tmp_path / "failures.csv").read_text()
    # every other unit's diaSources are the reference's (their objects differ: one visit is missing)
    ref = apdb_rows(reference, FLAVOR)["DiaSource"]
    got = apdb_rows(tmp_path, FLAVOR)["DiaSource"]
    ref = ref[~((ref.visit == victim["visit"]) & (ref.detector == victim["detector"]))].reset_index(drop=True)
    cols = [c for c in ref.columns if c != "diaObjectId"]
    pd.testing.assert_frame_equal(ref[cols], got[cols], check_dtype=False)


def test_copied_moved_and_lost_apdb_runs_resume_into_their_own_database(reference, dataset, config, tmp_path):
    rows_before = len(apdb_rows(reference, FLAVOR)["DiaSource"])
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    assert "/" not in (copy / FLAVOR / "apdb.yaml").read_text().split("sqlite:///", 1)[1].split()[0]
    resumed = run_pipeline(dataset, config, copy, resume=True, progress=False)
    assert resumed.done == 0 and sum(resumed.stored.values()) == 0
    assert str(copy) in open_apdb(copy / FLAVOR / "apdb.yaml").url
    # the copy's APDB is lost: made again, and every done unit stored again, as in the reference
    (copy / FLAVOR / "apdb.sqlite3").unlink()
    again = run_pipeline(dataset, config, copy, resume=True, progress=False)
    assert again.done == 0 and again.stored[FLAVOR] == again.skipped
    _assert_same_apdb(reference, copy)
    moved = tmp_path / "moved"
    shutil.move(copy, moved)
    assert main(_run_args(dataset, moved, "--resume")) == 0
    _assert_same_apdb(reference, moved)
    assert len(apdb_rows(reference, FLAVOR)["DiaSource"]) == rows_before  # the original was never written to


def test_a_damaged_unit_file_is_redone_on_resume(reference, dataset, config, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    victim = sorted(run.glob(f"{FLAVOR}/*/*/*/diaSources.parquet"))[2]
    original = pd.read_parquet(victim)
    victim.write_bytes(victim.read_bytes()[:200])
    resumed = run_pipeline(dataset, config, run, resume=True, progress=False)
    assert resumed.ok and resumed.done == 1
    pd.testing.assert_frame_equal(pd.read_parquet(victim), original)
    _assert_same_apdb(reference, run)


def test_dead_database_and_scheduler_fail_before_any_unit(dataset, tmp_path, capsys):
    for extra in (["--apdb", "postgresql://dialab@127.0.0.1:1/nowhere"],
                  ["--executor", "dask", "--scheduler", "tcp://127.0.0.1:1"]):
        out = tmp_path / extra[0].strip("-")
        t0 = time.perf_counter()
        assert main(_run_args(dataset, out, *extra)) == 2
        assert time.perf_counter() - t0 < 10
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "127.0.0.1:1" in err, err
        assert not list(out.glob(f"{FLAVOR}/*/*/*/unit.json")) and not (out / "run.yaml").exists()


def test_postgresql_runs_keep_no_password_and_a_reused_folder_starts_empty(dataset, config, tmp_path, caplog):
    url = postgres_url(with_password=True)
    password = url.split(":", 2)[2].split("@")[0]
    out = tmp_path / "run"
    first = run_pipeline(dataset, config, out, apdb_url=url, progress=False)
    assert first.ok
    for path in out.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    assert password not in caplog.text
    # the run is moved, one unit is lost, and a resume in a new process finds the password where an operator
    # keeps it (PGPASSWORD here): the unit is redone and stored in the run's own namespace, nothing twice
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    n_first = len(apdb_rows(moved, FLAVOR)["DiaSource"])
    next(moved.glob(f"{FLAVOR}/*/*/*/unit.json")).unlink()
    resumed = _cli(*_run_args(dataset, moved, "--resume", "--apdb", postgres_url()), env={"PGPASSWORD": password})
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert len(apdb_rows(moved, FLAVOR)["DiaSource"]) == n_first
    # the folder is deleted and reused with another threshold: the new run sees none of the old rows
    shutil.rmtree(moved)
    stricter = load_pipeline([DEFAULT], {"flavors": [FLAVOR], "execution": {"workers": 2},
                                         "detect": {"threshold": 8.0}})
    second = run_pipeline(dataset, stricter, out, apdb_url=url, progress=False)
    written = sum(len(pd.read_parquet(p)) for p in out.glob(f"{FLAVOR}/*/*/*/diaSources.parquet"))
    stored = apdb_rows(out, FLAVOR)["DiaSource"]
    assert second.ok and len(stored) == written < n_first
