"""Executors: the same unit function on a local process pool or on a Dask cluster.

Results stream back as units finish, so the driver only ever holds small summaries. For a
cluster, start a scheduler and workers (e.g. with dask-jobqueue's SLURMCluster or
HTCondorCluster) and pass the scheduler address; without one a LocalCluster is started.
When the driver stops early (an interrupt), queued units are cancelled and the workers stopped:
no process goes on writing units.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from ..errors import BadInputError
from .config import PipelineConfig
from .manifest import Entry
from .repository import Unit
from .unit import run_units

Task = tuple[Unit, Entry]


def _groups(tasks: list[Task]) -> list[tuple[list[Unit], Entry]]:
    """The tasks of one (visit, detector) together (its flavors share one preparation), in first-seen order."""
    groups: dict[tuple[int, int], tuple[list[Unit], Entry]] = {}
    for unit, entry in tasks:
        groups.setdefault((unit.visit, unit.detector), ([], entry))[0].append(unit)
    return list(groups.values())


def worker_count(config: PipelineConfig) -> int:
    return config.execution.workers or os.cpu_count() or 1


def _ignore_interrupts() -> None:
    """Workers leave SIGINT (a terminal's Ctrl-C reaches the whole process group) to the driver."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _local(tasks: list[Task], root: str, config: PipelineConfig, out: str) -> Iterator[tuple[Unit, dict]]:
    groups = _groups(tasks)
    workers = min(worker_count(config), max(len(groups), 1))
    if workers == 1:
        for units, entry in groups:
            yield from run_units(units, entry, root, config, out)
        return
    # forkserver: workers start clean, not as forks of a driver that runs a progress-bar thread
    ctx = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_ignore_interrupts)
    try:
        futures = [pool.submit(run_units, units, entry, root, config, out) for units, entry in groups]
        for fut in as_completed(futures):
            yield from fut.result()
    except BaseException:  # an interrupt, or the driver closing this generator early
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel queued work and terminate the workers at once. The pool's manager thread may then die reading from
    a pipe the terminated workers closed: its error is expected and kept off stderr, so that an interrupted run
    ends with its one final line."""
    processes = list(getattr(pool, "_processes", {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    report = threading.excepthook

    def quiet(args):
        if args.thread is not manager:
            report(args)

    threading.excepthook = quiet
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(timeout=10)
    if manager is not None:
        manager.join(timeout=10)
    if manager is None or not manager.is_alive():
        threading.excepthook = report


def check_scheduler(config: PipelineConfig, timeout_s: float = 5.0) -> None:
    """Fail before any unit runs when the configured Dask scheduler does not answer."""
    if config.execution.executor != "dask" or not config.execution.scheduler:
        return
    from distributed import Client

    try:
        Client(config.execution.scheduler, timeout=f"{timeout_s}s").close()
    except (OSError, TimeoutError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BadInputError(f"the Dask scheduler does not answer ({reason[:200]})",
                            config.execution.scheduler) from None


def _dask(tasks: list[Task], root: str, config: PipelineConfig, out: str) -> Iterator[tuple[Unit, dict]]:
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_completed

    cluster = None
    if config.execution.scheduler:
        client = Client(config.execution.scheduler, timeout="10s")
    else:
        cluster = LocalCluster(n_workers=worker_count(config), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    futures = []
    run = uuid.uuid4().hex[:8]  # task keys unique to this run: a shared scheduler may hold another run's
    try:
        futures = [client.submit(run_units, units, entry, root, config, out, pure=False,
                                 key=f"units-{run}-{entry.visit}-{entry.detector}") for units, entry in _groups(tasks)]
        for fut in dask_completed(futures):
            yield from fut.result()
    except BaseException:
        client.cancel(list(futures), force=True)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def execute(tasks: list[Task], root: str, config: PipelineConfig, out: str) -> Iterator[tuple[Unit, dict]]:
    """(unit, summary) for every task, in completion order."""
    if not tasks:
        return iter(())
    run = _dask if config.execution.executor == "dask" else _local
    return run(tasks, root, config, out)
