"""The C allocator's handling of large arrays, set once per process that runs dialab's work.

glibc serves an allocation above its mmap threshold (at most 32 MiB by its own dynamic rule) with fresh pages
from the kernel and returns them when the array is freed. A full-size float32 plane of a 2896 x 2896 image is
33.5 MB, so every temporary of that size costs one page fault per 4 KiB page on first touch: a third of a
subtraction's time was system time. Raising the threshold and the trim threshold keeps freed planes in the heap
for the next array of the same size, as a long-running numpy process wants. The peak resident memory is
unchanged (freed memory is reused, not added to); the process keeps its high-water mark until it ends.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

#: Arrays up to this size come from (and go back to) the heap; larger ones are still mapped on their own.
HEAP_LIMIT_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters in glibc's malloc.h


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed large arrays for reuse (once per process). False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, libc's among them (find_library would
        # start a subprocess: 26 ms of every CLI start)
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_LIMIT_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_LIMIT_BYTES))
    log.debug("large arrays kept in the heap up to %d MB: %s", HEAP_LIMIT_BYTES >> 20, ok)
    return ok
