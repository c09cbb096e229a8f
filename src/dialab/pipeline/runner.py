"""Running a pipeline over a dataset: units in parallel, then association into the APDB in time order.

A run is resumable: done units are skipped, and association stops at the first visit (in time
order) with a unit that is not done, so that a resumed run stores every (visit, detector) once and
in the same order as an uninterrupted run, giving the same diaObjects.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..apdb import create_apdb, open_apdb
from ..association import store_visit_detector
from ..errors import BadInputError, DialabError
from ..exposure import read_exposure
from .config import PipelineConfig
from .executors import execute, worker_count
from .manifest import Entry, Manifest, read_manifest
from .prepare import prepare_science
from .repository import Unit, flavor_dir, is_done, unit_dir, write_text

log = logging.getLogger(__name__)
VERSIONED = ("dialab", "numpy", "scipy", "astropy", "galsim", "pandas", "lsst-dax-apdb", "sqlalchemy", "dask",
             "distributed")


@dataclass
class RunResult:
    out: Path
    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)
    association_stopped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def plan_units(manifest: Manifest, flavors: list[str]) -> list[tuple[Unit, Entry]]:
    """Every (entry, flavor), in time order."""
    entries = sorted(manifest.entries, key=lambda e: (e.mjd, e.visit, e.detector))
    return [(Unit(f, e.band, e.visit, e.detector, e.mjd), e) for f in flavors for e in entries]


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _config_digest(config: PipelineConfig) -> str:
    """What must not change between a run and its resumption (the executor may)."""
    frozen = config.model_dump(mode="json", exclude={"execution"})
    return hashlib.sha256(json.dumps(frozen, sort_keys=True).encode()).hexdigest()


def _prepare_output(out: Path, manifest: Manifest, config: PipelineConfig, flavors: list[str], resume: bool) -> dict:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as exc:
        raise BadInputError(f"cannot write the run there ({exc.strerror or exc})", out) from None
    run_yaml = out / "run.yaml"
    if run_yaml.exists():
        previous = yaml.safe_load(run_yaml.read_text()) or {}
        if not resume:
            raise BadInputError("holds a run already: pass --resume to continue it, or choose a new folder", out)
        if previous.get("config_sha256") != _config_digest(config):
            raise BadInputError("holds a run with another pipeline config: resume with the same config", out)
        if previous.get("manifest_sha256") != manifest.sha256:
            raise BadInputError("holds a run of another manifest (its hash differs)", out)
        flavors = sorted(set(previous.get("flavors", [])) | set(flavors))
    record = {"dialab_run": 1, "manifest": str(manifest.path.resolve()), "manifest_sha256": manifest.sha256,
              "dataset": manifest.name, "flavors": flavors, "config_sha256": _config_digest(config),
              "config": config.model_dump(mode="json"), "versions": _versions(),
              "started": datetime.now(UTC).isoformat(timespec="seconds"), "status": "running"}
    write_text(yaml.safe_dump(record, sort_keys=False), run_yaml)
    return record


def _flavor_apdb(out: Path, flavor: str, config: PipelineConfig, apdb_url: str | None):

    config_path = flavor_dir(out, flavor) / "apdb.yaml"
    if not config_path.exists():
        url = apdb_url or config.apdb.url
        if url is None:
            create_apdb(flavor_dir(out, flavor) / "apdb.sqlite3", config_path)
        else:
            run_id = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]
            namespace = f"{config.apdb.namespace_prefix}_{run_id}_{flavor}".lower()
            create_apdb(url, config_path, namespace=namespace)
    return open_apdb(config_path)


def associate_flavor(out: Path, manifest: Manifest, flavor: str, units: list[Unit], config: PipelineConfig,
                     apdb_url: str | None) -> tuple[int, int | None, list[tuple[str, str]]]:
    """Store the flavor's done units visit by visit in time order.

    Returns (units stored, the visit it stopped at or None, failures). A unit that cannot be stored
    (e.g. no WCS) stops the flavor's association there, so that a later resume keeps the order.
    """
    handle = _flavor_apdb(out, flavor, config, apdb_url)
    entries = {(e.visit, e.detector): e for e in manifest.entries}
    by_visit: dict[int, list[Unit]] = defaultdict(list)
    for u in units:
        by_visit[u.visit].append(u)
    stored = 0
    for visit in sorted(by_visit, key=lambda v: (min(u.mjd for u in by_visit[v]), v)):
        group = sorted(by_visit[visit], key=lambda u: u.detector)
        if not all(is_done(out, u) for u in group):
            return stored, visit, []
        for u in group:
            where = unit_dir(out, u)
            try:
                catalog = pd.read_parquet(where / "diaSources.parquet")
                difference = read_exposure(where / "difference.fits")
                entry = entries[(u.visit, u.detector)]
                # the science image as it was subtracted (repaired, with its PSF; without the unit's fakes)
                science = prepare_science(manifest.resolve(entry.science), manifest.resolve(entry.science_psf),
                                          manifest.resolve(entry.science_noise), entry=entry, repair=config.repair)
                stored += store_visit_detector(handle, catalog, difference, science, config.associate)["stored"]
            except DialabError as exc:
                return stored, visit, [(f"APDB {u.label}", str(exc))]
    return stored, None, []


def run_pipeline(manifest_path: str | Path, config: PipelineConfig, out: str | Path, flavors: list[str] | None = None,
                 resume: bool = False, apdb_url: str | None = None, progress: bool = True) -> RunResult:
    """Run every (entry, flavor) unit of a manifest, then associate and store each flavor's diaSources.

    Parameters
    ----------
    manifest_path : str or Path
        The dataset's ``dataset.yaml``.
    config : PipelineConfig
        See :func:`dialab.load_pipeline`.
    out : str or Path
        The run folder.
    flavors : list of str, optional
        Default: the configuration's.
    resume : bool
        Continue a run in ``out``: finished units are kept, the rest done.
    apdb_url : str, optional
        A PostgreSQL URL instead of one SQLite APDB per flavor.
    progress : bool
        Show a progress bar.

    Returns
    -------
    RunResult
    """
    t0 = time.perf_counter()
    manifest = read_manifest(manifest_path)
    out = Path(out)
    flavors = flavors or config.flavors_to_run()
    record = _prepare_output(out, manifest, config, flavors, resume)
    planned = plan_units(manifest, flavors)
    result = RunResult(out=out)
    todo = []
    for unit, entry in planned:
        if resume and is_done(out, unit):
            result.skipped += 1
        else:
            todo.append((unit, entry))
    console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn())
    log.info("%d units to run (%d already done) with %s x %d", len(todo), result.skipped,
             config.execution.executor, worker_count(config))
    with Progress(*columns, console=console, disable=not progress) as bar:
        tasks = {f: bar.add_task(f, total=sum(u.flavor == f for u, _ in planned), failed=0,
                                 completed=sum(u.flavor == f and is_done(out, u) for u, _ in planned) if resume else 0)
                 for f in flavors}
        failed_per_flavor: dict[str, int] = defaultdict(int)
        for unit, summary in execute(todo, str(manifest.root.resolve()), config, str(out)):
            if summary.get("status") == "done":
                result.done += 1
            else:
                result.failures.append((unit.label, summary.get("reason", "unknown")))
                failed_per_flavor[unit.flavor] += 1
                bar.console.log(f"FAILED {unit.label}: {summary.get('reason')}")
            bar.update(tasks[unit.flavor], advance=1, failed=failed_per_flavor[unit.flavor])
        for flavor in flavors:
            units = [u for u, _ in planned if u.flavor == flavor]
            assoc = bar.add_task(f"APDB {flavor}", total=None, failed=0)
            n, stopped, failed = associate_flavor(out, manifest, flavor, units, config, apdb_url)
            result.stored[flavor] = n
            for label, reason in failed:
                result.failures.append((label, reason))
                bar.console.log(f"FAILED {label}: {reason}")
            if stopped is not None:
                result.association_stopped[flavor] = stopped
                bar.console.log(f"{flavor}: association stopped at visit {stopped} (a unit is not done; "
                                "resume the run to continue)")
            bar.update(assoc, total=1, completed=1)
    _write_failures(out, result.failures)
    result.seconds = time.perf_counter() - t0
    record.update(status="complete" if result.ok and not result.association_stopped else "incomplete",
                  finished=datetime.now(UTC).isoformat(timespec="seconds"),
                  units={"planned": len(planned), "done_now": result.done, "skipped": result.skipped,
                         "failed": len(result.failures)})
    write_text(yaml.safe_dump(record, sort_keys=False), out / "run.yaml")
    return result


def _write_failures(out: Path, failures: list[tuple[str, str]]) -> None:
    path = out / "failures.csv"
    if not failures:
        if path.exists():
            path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["unit", "reason"])
        writer.writerows(failures)
    tmp.replace(path)
