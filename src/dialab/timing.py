"""Where the time and memory go: named steps timed by the wall clock into a per-process record.

Each step is logged at debug level (``-vv``) and summed by name, so ``bench/`` can print every step's
share of a run without a profiler (which slows numpy-heavy code unevenly); the process's peak resident
memory at the end of each step, and the step that last raised it (``peak_step``), show where memory goes.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)
_SECONDS: dict[str, float] = {}
_PEAK_MB: dict[str, float] = {}
_RAISED = {"step": None}  # the step during which the high-water mark last rose


@contextmanager
def timed(name: str):
    """Time the block under ``name`` (added to earlier blocks of the same name)."""
    t0, before = time.perf_counter(), peak_rss_mb()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        _SECONDS[name] = _SECONDS.get(name, 0.0) + dt
        _PEAK_MB[name] = peak_rss_mb()
        if _PEAK_MB[name] > before:
            _RAISED["step"] = name
        log.debug("%s: %.3f s, peak memory so far %.0f MB", name, dt, _PEAK_MB[name])


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB. Linux's ``ru_maxrss`` survives ``exec``: a child started by a
    larger parent reports at least the parent's peak, so the process's own high-water mark (VmHWM) is read
    where there is one."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def recorded(reset: bool = False) -> dict[str, float]:
    """Seconds per step name since the process started (or the last reset), in first-seen order."""
    out = dict(_SECONDS)
    if reset:
        _SECONDS.clear()
        _PEAK_MB.clear()
        _RAISED["step"] = None
    return out


def peak_memory() -> dict[str, float]:
    """The process's peak resident memory (MB) when each step last ended."""
    return dict(_PEAK_MB)


def peak_step() -> str | None:
    """The step during which the process's peak resident memory was last raised (of nested steps, the outer)."""
    return _RAISED["step"]
