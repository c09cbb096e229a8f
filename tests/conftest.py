"""Shared fixtures: the real-image folder (../shared) and small simulated fields."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dialab.exposure import Exposure, write_exposure

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIALAB_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real telescope images; skipped (with the reason) where ../shared is absent, never in CI."""
    if not REAL.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the real images at {REAL}")
        pytest.skip(f"real images not present at {REAL} (../shared is only beside the project in CI)")
    return REAL


def postgres_url(with_password: bool = False) -> str:
    """The test server's URL (``.ci/run`` starts one; its TCP logins need a password). Without
    ``with_password`` the password is left to PGPASSWORD, as an operator would set it: this process and its
    children get it there. Skips where no server is configured, never in CI."""
    url = os.environ.get("DIALAB_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide a PostgreSQL server in DIALAB_TEST_POSTGRES_URL (.ci/run starts one)")
        pytest.skip("no PostgreSQL server: set DIALAB_TEST_POSTGRES_URL (bash .ci/run starts one)")
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if parsed.password:
        os.environ["PGPASSWORD"] = str(parsed.password)
    if with_password:
        return url
    bare = sqlalchemy.engine.URL.create(parsed.drivername, username=parsed.username, host=parsed.host,
                                        port=parsed.port, database=parsed.database)
    return bare.render_as_string(hide_password=False)


def apdb_rows(out: Path, flavor: str) -> dict:
    """Every APDB table of a run's flavor, sorted by id, without the processing time (it differs per run)."""
    from dialab.apdb import open_apdb

    handle = open_apdb(Path(out) / flavor / "apdb.yaml")
    tables = {}
    for name, key in (("DiaSource", "diaSourceId"), ("DiaObject", "diaObjectId"),
                      ("DiaForcedSource", "diaForcedSourceId")):
        t = handle.table(name).drop(columns=["timeProcessedMjdTai"], errors="ignore")
        tables[name] = t.sort_values(key).reset_index(drop=True)
    return tables


def make_exposure(image: np.ndarray, variance: np.ndarray | float, **kwargs) -> Exposure:
    """An Exposure with an empty mask and a constant or given variance."""
    image = np.asarray(image, dtype=np.float32)
    var = np.broadcast_to(np.asarray(variance, dtype=np.float32), image.shape).copy()
    return Exposure(image=image, mask=np.zeros(image.shape, np.int32), variance=var, **kwargs)


@pytest.fixture
def write(tmp_path):
    """Write an Exposure to a temporary file and return its path."""
    def _write(exp: Exposure, name: str = "exp.fits") -> Path:
        path = tmp_path / name
        write_exposure(exp, path)
        return path
    return _write
