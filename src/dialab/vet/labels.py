"""Vetting labels, kept durably in the run folder (``labels.sqlite``): one row per (flavor, diaSourceId),
the latest label with the time it was given. SQLite commits each label before the page hears back, so
a label survives the server's crash or restart; the reliability training reads the same file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from ..errors import BadInputError

LABELS = ("real", "bogus", "skip")
LABELS_FILE = "labels.sqlite"

_SCHEMA = """CREATE TABLE IF NOT EXISTS labels (
    flavor TEXT NOT NULL,
    diaSourceId INTEGER NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('real', 'bogus', 'skip')),
    labelledAt TEXT NOT NULL,
    PRIMARY KEY (flavor, diaSourceId))"""


class LabelStore:
    """The labels of one run; a connection per call, so the server's threads never share one."""

    def __init__(self, run: str | Path):
        self.path = Path(run) / LABELS_FILE
        with self._connect() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection whose work is committed (or rolled back) and which is closed on leaving."""
        try:
            db = sqlite3.connect(self.path, timeout=10)
        except sqlite3.Error as exc:
            raise BadInputError(f"cannot open the labels database ({exc})", self.path) from None
        try:
            with db:
                yield db
        finally:
            db.close()

    def put(self, flavor: str, dia_source_id: int, label: str) -> str:
        """Store (or replace) one label; returns its UTC time (ISO 8601)."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, not {label!r}")
        when = datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as db:
            db.execute("INSERT INTO labels VALUES (?, ?, ?, ?) ON CONFLICT (flavor, diaSourceId) "
                       "DO UPDATE SET label = excluded.label, labelledAt = excluded.labelledAt",
                       (flavor, int(dia_source_id), label, when))
        return when

    def table(self) -> pd.DataFrame:
        """Every label: flavor, diaSourceId, label, labelledAt."""
        with self._connect() as db:
            return pd.read_sql_query("SELECT flavor, diaSourceId, label, labelledAt FROM labels "
                                     "ORDER BY labelledAt, flavor, diaSourceId", db)

    def export_csv(self, path: str | Path) -> int:
        """Write every label as CSV; returns how many."""
        table = self.table()
        table.to_csv(path, index=False)
        return len(table)
