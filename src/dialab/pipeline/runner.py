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
import re
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..apdb import ApdbMissingError, create_apdb, open_apdb, redact_url
from ..association import store_visit_detector
from ..errors import BadInputError, DialabError, RunInterrupted
from ..exposure import Exposure, read_exposure
from ..photometry import with_aperture_correction
from .config import PipelineConfig
from .executors import check_scheduler, execute, worker_count
from .manifest import Entry, Manifest, read_manifest
from .prepare import prepare_science
from .repository import (
    Unit,
    difference_dropped,
    drop_difference,
    failure_reason,
    flavor_dir,
    is_done,
    mark_failed,
    undo,
    unit_dir,
    verify_unit,
    write_text,
)

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


def _redacted(config: PipelineConfig) -> dict:
    """The config as run.yaml records it: a database URL without its password."""
    data = config.model_dump(mode="json")
    if data["apdb"]["url"]:
        data["apdb"]["url"] = redact_url(data["apdb"]["url"])
    return data


def _prepare_output(out: Path, manifest: Manifest, config: PipelineConfig, flavors: list[str], resume: bool) -> dict:
    """The run's record: a new one with a new run id, or the resumed run's (same config and manifest)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as exc:
        raise BadInputError(f"cannot write the run there ({exc.strerror or exc})", out) from None
    run_yaml = out / "run.yaml"
    run_id = uuid.uuid4().hex[:12]
    if run_yaml.exists():
        try:
            previous = yaml.safe_load(run_yaml.read_text()) or {}
        except yaml.YAMLError:
            raise BadInputError("run.yaml is not valid YAML: the run cannot be resumed", run_yaml) from None
        if not resume:
            raise BadInputError("holds a run already: pass --resume to continue it, or choose a new folder", out)
        if previous.get("config_sha256") != _config_digest(config):
            raise BadInputError("holds a run with another pipeline config: resume with the same config", out)
        if previous.get("manifest_sha256") != manifest.sha256:
            raise BadInputError("holds a run of another manifest (its hash differs)", out)
        flavors = sorted(set(previous.get("flavors", [])) | set(flavors))
        run_id = previous.get("run_id") or run_id
    return {"dialab_run": 1, "run_id": run_id, "manifest": str(manifest.path.resolve()),
            "manifest_sha256": manifest.sha256, "dataset": manifest.name, "flavors": flavors,
            "config_sha256": _config_digest(config), "config": _redacted(config), "versions": _versions(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"), "status": "running"}


def schema_name(prefix: str, run_id: str, flavor: str) -> str:
    """The flavor's PostgreSQL schema: lower case, anything but letters, digits and _ as _ (flavor.basis)."""
    return re.sub(r"[^a-z0-9_]", "_", f"{prefix}_{run_id}_{flavor}".lower())


def _flavor_apdb(out: Path, flavor: str, config: PipelineConfig, apdb_url: str | None, run_id: str):
    """The flavor's APDB, made on first use: a SQLite file in the flavor's folder (recreated when it has gone
    missing: every done unit is then stored again), or a PostgreSQL schema named after the run id, so a new run
    in a reused folder never sees an earlier run's rows."""
    folder = flavor_dir(out, flavor)
    config_path = folder / "apdb.yaml"
    url = apdb_url or config.apdb.url
    if config_path.exists():
        try:
            return open_apdb(config_path)
        except ApdbMissingError:
            log.warning("%s: the APDB file is missing; made again, and every done unit is stored again", folder)
            url = None
    if url is None:
        create_apdb(folder / "apdb.sqlite3", config_path)
    else:
        create_apdb(url, config_path, namespace=schema_name(config.apdb.namespace_prefix, run_id, flavor))
    return open_apdb(config_path)


class _Signals:
    """SIGINT and SIGTERM end the run cleanly: at once while units run (queued units are cancelled, workers
    stopped), between two (visit, detector) stores while the APDB is written."""

    def __init__(self):
        self.received: int | None = None
        self.defer = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        if not self.defer:
            raise RunInterrupted(signum)

    def check(self) -> None:
        if self.received is not None:
            raise RunInterrupted(self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _settled(out: Path, unit: Unit, skip_failed: bool) -> bool:
    return is_done(out, unit) or (skip_failed and failure_reason(out, unit) is not None)


@dataclass
class _Association:
    """One flavor's progress through association: units stored, the visit it stopped at, failures."""

    stored: int = 0
    stopped: int | None = None
    failures: list = field(default_factory=list)


class Association:
    """Every flavor's done units stored visit by visit in time order, into that flavor's APDB, as far as the
    finished units allow.

    ``advance`` is called each time a unit finishes, so the driver stores a visit while the workers go on with
    later ones (association no longer waits for the last unit), and once more at the end (``final``).
    Visits are taken in turn for all flavors together, so each (visit, detector)'s science image is read and
    repaired once for every flavor's forced photometry. Within a flavor, a visit with a unit that is neither
    done nor (with ``skip_failed``) failed for good is waited for; at the end it stops that flavor's association
    there, so that a resumed run stores in the same order. With ``skip_failed`` a unit that cannot be stored is
    recorded and passed over.
    """

    def __init__(self, out: Path, manifest: Manifest, units: list[Unit], config: PipelineConfig, handles: dict,
                 signals: _Signals | None = None, skip_failed: bool = False, on_store=None):
        self.out, self.manifest, self.config, self.handles = out, manifest, config, handles
        self.signals, self.skip_failed, self.on_store = signals, skip_failed, on_store
        self.entries = {(e.visit, e.detector): e for e in manifest.entries}
        self.by_visit: dict[int, list[Unit]] = defaultdict(list)
        for u in units:
            self.by_visit[u.visit].append(u)
        self.visits = sorted(self.by_visit, key=lambda v: (min(u.mjd for u in self.by_visit[v]), v))
        self.state = {f: _Association() for f in handles}
        self.next = dict.fromkeys(handles, 0)  # per flavor, the index of the next visit to store

    def _active(self) -> list[str]:
        return [f for f, p in self.state.items() if p.stopped is None and self.next[f] < len(self.visits)]

    def advance(self, final: bool = False) -> dict[str, _Association]:
        """Store every visit that can be stored now; with ``final``, an unsettled visit stops its flavor."""
        active = self._active()
        i = min((self.next[f] for f in active), default=len(self.visits))
        while i < len(self.visits):
            visit = self.visits[i]
            sciences: dict[int, Exposure] = {}  # detector -> the science as subtracted, shared by the flavors
            for flavor in [f for f in self._active() if self.next[f] == i]:
                group = sorted((u for u in self.by_visit[visit] if u.flavor == flavor), key=lambda u: u.detector)
                if not all(_settled(self.out, u, self.skip_failed) for u in group):
                    if final:
                        self.state[flavor].stopped = visit
                    continue
                self._store(flavor, visit, group, sciences)
                self.next[flavor] = i + 1
            if not any(self.next[f] == i + 1 for f in self._active()):
                break  # every flavor still going waits at this visit or an earlier one
            i += 1
        return self.state

    def _store(self, flavor: str, visit: int, group: list[Unit], sciences: dict[int, Exposure]) -> None:
        progress = self.state[flavor]
        for u in (u for u in group if is_done(self.out, u)):
            if self.signals is not None:
                self.signals.check()
            try:
                entry = self.entries[(u.visit, u.detector)]
                if u.detector not in sciences:
                    sciences[u.detector] = _science_as_subtracted(self.manifest, entry, self.config)
                progress.stored += _store_unit(self.out, sciences[u.detector], u, self.config, self.handles[flavor])
                if self.config.output.keep == "catalogs":
                    drop_difference(self.out, u)
            except (DialabError, OSError, ValueError) as exc:  # ValueError: a damaged Parquet or FITS file
                progress.failures.append((f"APDB {u.label}", " ".join(str(exc).split())))
                if not self.skip_failed:
                    progress.stopped = visit
                    break
                mark_failed(self.out, u, f"APDB: {progress.failures[-1][1]}")
            if self.on_store is not None:
                self.on_store(flavor, progress)


def _science_as_subtracted(manifest: Manifest, entry: Entry, config: PipelineConfig) -> Exposure:
    """The science image as it was subtracted (repaired, with its PSF; without the unit's fakes). Its aperture
    correction is the one its units measured, taken from their differences (``_with_units_correction``)."""
    return prepare_science(manifest.resolve(entry.science), manifest.resolve(entry.science_psf),
                           manifest.resolve(entry.science_noise), entry=entry, repair=config.repair,
                           aperture_correction=False)


def _with_units_correction(science: Exposure, difference: Exposure, config: PipelineConfig) -> Exposure:
    """``science`` with the aperture correction its unit measured on it: the difference's PSF carries the science's
    (in every flavor), so the driver need not find the stars again (0.3 s of its CPU per full-size image). A
    difference without one (written by an older version) has it measured here."""
    if not config.subtract.aperture_correction or science.psf is None or science.psf.aperture_correction is not None:
        return science
    measured = difference.psf.aperture_correction if difference.psf is not None else None
    science.psf = science.psf.with_aperture_correction(measured) if measured is not None \
        else with_aperture_correction(science)
    return science


def _store_unit(out: Path, science: Exposure, unit: Unit, config: PipelineConfig, handle) -> int:
    where = unit_dir(out, unit)
    if difference_dropped(out, unit):
        if handle.contains(unit.visit, unit.detector):
            return 0  # stored before its difference was dropped
        raise DialabError(f"{unit.label}: its difference was not kept (output.keep: catalogs) and the APDB lacks it "
                          f"(made again?): delete {where / 'unit.json'} and resume to run the unit again")
    catalog = pd.read_parquet(where / "diaSources.parquet")
    difference = read_exposure(where / "difference.fits")
    science = _with_units_correction(science, difference, config)
    return int(store_visit_detector(handle, catalog, difference, science, config.associate)["stored"])


def _units_to_run(out: Path, planned: list[tuple[Unit, Entry]], resume: bool, skip_failed: bool,
                  result: RunResult) -> list[tuple[Unit, Entry]]:
    """Every unit not done yet; on resume a done unit whose files fail their checksums is redone."""
    todo = []
    for unit, entry in planned:
        if resume and is_done(out, unit):
            problem = verify_unit(out, unit)
            if problem is None:
                result.skipped += 1
                continue
            log.warning("%s: %s; the unit is run again", unit.label, problem)
            undo(out, unit)
        if resume and skip_failed and failure_reason(out, unit) is not None:
            continue  # failed for good in an earlier run
        todo.append((unit, entry))
    return todo


def _run_units(todo, manifest: Manifest, config: PipelineConfig, out: Path, skip_failed: bool, bar, tasks,
               result: RunResult, association: Association, signals: _Signals) -> None:
    failed_per_flavor: dict[str, int] = defaultdict(int)
    units = execute(todo, str(manifest.root.resolve()), config, str(out))
    try:
        for unit, summary in units:
            if summary.get("status") == "done":
                result.done += 1
            else:
                reason = summary.get("reason", "unknown")
                result.failures.append((unit.label, reason))
                failed_per_flavor[unit.flavor] += 1
                if skip_failed:
                    mark_failed(out, unit, reason)
                bar.console.log(f"FAILED {unit.label}: {reason}")
            bar.update(tasks[unit.flavor], advance=1, failed=failed_per_flavor[unit.flavor])
            signals.defer = True  # an interrupt now takes effect between two stores, not inside one
            association.advance()
            signals.defer = False
            signals.check()
    finally:
        if hasattr(units, "close"):
            units.close()  # on an interrupt: cancels queued units and stops the workers


def _progress_bar(progress: bool) -> Progress:
    console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not progress)


def run_pipeline(manifest_path: str | Path, config: PipelineConfig, out: str | Path, flavors: list[str] | None = None,
                 resume: bool = False, apdb_url: str | None = None, progress: bool = True,
                 skip_failed: bool = False) -> RunResult:
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
        Continue a run in ``out``: finished (and intact) units are kept, the rest done.
    apdb_url : str, optional
        A PostgreSQL URL instead of one SQLite APDB per flavor (passwords from PGPASSWORD or ~/.pgpass).
    progress : bool
        Show a progress bar.
    skip_failed : bool
        Units that fail are final: recorded in ``failures.csv`` and ``run.yaml``, and association goes on
        past them.

    Returns
    -------
    RunResult

    Raises
    ------
    RunInterrupted
        On SIGINT or SIGTERM; ``run.yaml`` then says "interrupted" and ``--resume`` continues exactly.
    """
    t0 = time.perf_counter()
    manifest = read_manifest(manifest_path)
    out = Path(out)
    flavors = flavors or config.flavors_to_run()
    record = _prepare_output(out, manifest, config, flavors, resume)
    check_scheduler(config)  # a dead scheduler or database is found before any unit runs
    handles = {f: _flavor_apdb(out, f, config, apdb_url, record["run_id"]) for f in flavors}
    write_text(yaml.safe_dump(record, sort_keys=False), out / "run.yaml")
    planned = plan_units(manifest, flavors)
    result = RunResult(out=out)
    todo = _units_to_run(out, planned, resume, skip_failed, result)
    log.info("%d units to run (%d already done) with %s x %d", len(todo), result.skipped,
             config.execution.executor, worker_count(config))
    try:
        with _Signals() as signals, _progress_bar(progress) as bar:
            tasks = {f: bar.add_task(f, total=sum(u.flavor == f for u, _ in planned), failed=0,
                                     completed=sum(u.flavor == f for u, _ in planned) - sum(u.flavor == f for u, _ in todo))
                     for f in flavors}
            apdb_tasks = {f: bar.add_task(f"APDB {f}", total=None, failed=0) for f in handles}
            association = Association(
                out, manifest, [u for u, _ in planned], config, handles, signals, skip_failed,
                on_store=lambda f, p: bar.update(apdb_tasks[f], completed=p.stored, failed=len(p.failures)))
            _run_units(todo, manifest, config, out, skip_failed, bar, tasks, result, association, signals)
            signals.defer = True
            _associate(association, bar, apdb_tasks, result)
    except RunInterrupted:
        _finish(out, record, result, planned, t0, interrupted=True)
        raise
    _finish(out, record, result, planned, t0)
    return result


def _associate(association: Association, bar, tasks, result: RunResult) -> None:
    """The association's last pass, after every unit: what it stored and where each flavor stopped."""
    state = association.advance(final=True)
    for flavor, progress in state.items():
        result.stored[flavor] = progress.stored
        for label, reason in progress.failures:
            result.failures.append((label, reason))
            bar.console.log(f"FAILED {label}: {reason}")
        if progress.stopped is not None:
            result.association_stopped[flavor] = progress.stopped
            bar.console.log(f"{flavor}: association stopped at visit {progress.stopped} (a unit is not done; "
                            "resume the run to continue, or pass --skip-failed)")
        bar.update(tasks[flavor], total=progress.stored, completed=progress.stored, failed=len(progress.failures))


def _finish(out: Path, record: dict, result: RunResult, planned, t0: float, interrupted: bool = False) -> None:
    """failures.csv and run.yaml: the status, this run's failures and every unit failed for good."""
    final = {u.label: reason for u, _ in planned if (reason := failure_reason(out, u)) is not None}
    failures = list(dict([*final.items(), *result.failures]).items())
    _write_failures(out, failures)
    if interrupted:
        status = "interrupted"
    elif result.association_stopped or any(label.removeprefix("APDB ") not in final for label, _ in result.failures):
        status = "incomplete"
    else:  # every unit settled; some may have failed for good (--skip-failed)
        status = "complete-with-failures" if final else "complete"
    result.seconds = time.perf_counter() - t0
    record.update(status=status, finished=datetime.now(UTC).isoformat(timespec="seconds"),
                  units={"planned": len(planned), "done_now": result.done, "skipped": result.skipped,
                         "failed": len(failures)},
                  failed_units=[{"unit": label, "reason": reason} for label, reason in failures])
    write_text(yaml.safe_dump(record, sort_keys=False), out / "run.yaml")


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
