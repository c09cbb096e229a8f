"""Row ids for catalogs and the APDB: one packing of (visit, detector, running index), range-checked.

id = (visit * DETECTORS + detector) * ROWS_PER_UNIT + index, index counted from 1. Ids are then unique
across a run and reproducible whatever the order a database returns rows in; out-of-range parts are refused
rather than wrapped into another unit's ids.
"""

from __future__ import annotations

import numpy as np

from .errors import BadInputError

DETECTORS = 1000
ROWS_PER_UNIT = 100_000
MAX_VISIT = np.iinfo(np.int64).max // (DETECTORS * ROWS_PER_UNIT) - 1


def pack_ids(visit: int, detector: int, n: int, what: str = "rows") -> np.ndarray:
    """Ids 1..n of (visit, detector)'s ``what`` (named in the error when a part is out of range)."""
    problems = []
    if not 0 <= int(visit) <= MAX_VISIT:
        problems.append(f"visit {visit} outside 0..{MAX_VISIT}")
    if not 0 <= int(detector) < DETECTORS:
        problems.append(f"detector {detector} outside 0..{DETECTORS - 1}")
    if not 0 <= int(n) < ROWS_PER_UNIT:
        problems.append(f"{n} {what} in one (visit, detector), at most {ROWS_PER_UNIT - 1}")
    if problems:
        raise BadInputError(f"cannot number {what}: " + "; ".join(problems))
    return (np.int64(visit) * DETECTORS + np.int64(detector)) * ROWS_PER_UNIT + np.arange(1, n + 1, dtype=np.int64)


def unpack_id(packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(visit, detector, index) of packed ids."""
    packed = np.asarray(packed, np.int64)
    unit, index = np.divmod(packed, ROWS_PER_UNIT)
    visit, detector = np.divmod(unit, DETECTORS)
    return visit, detector, index
