"""A thin layer over Rubin's Alert Production Database (``lsst-dax-apdb``).

The APDB holds the real DiaObject / DiaSource / DiaForcedSource schema in SQLite (default: one
file per run and flavor) or PostgreSQL (concurrent writers, large runs; one schema namespace per
run). This module turns dialab catalogs (fluxes in counts) into schema rows (nJy, NOT NULL
columns filled), stores one (visit, detector) at a time, never twice, and reads back regions or
whole tables for analysis. Passwords never appear in errors or logs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError, DialabError
from .lazy import lazy_module
from .sky import from_tangent, mean_position, tangent_offsets

pd = lazy_module("pandas")

log = logging.getLogger(__name__)

#: Bands with per-band columns in the DiaObject table.
APDB_BANDS = ("u", "g", "r", "i", "z", "y")
#: Catalog columns in image counts that the APDB holds in nJy.
FLUX_COLUMNS = ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "scienceFlux", "scienceFluxErr", "templateFlux",
                "templateFluxErr", "dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr",
                "trailFlux", "trailFluxErr")
REQUIRED_SOURCE_COLUMNS = ("diaSourceId", "visit", "detector", "band", "midpointMjdTai", "ra", "dec", "x", "y",
                           "psfFlux", "psfFluxErr")


class ApdbError(DialabError):
    """The database cannot be reached or used (message names host/database, never the password)."""


def database_url(url: str | Path) -> str:
    """An SQLAlchemy URL from a URL or a plain SQLite file path (made absolute so configs travel).

    ``postgresql://`` URLs get the psycopg2 driver (psycopg 3 sends all-null columns as VARCHAR,
    which the DiaObject insert rejects).
    """
    import sqlalchemy

    text = str(url)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    try:
        parsed = sqlalchemy.engine.make_url(text)
        _ = parsed.port
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise BadInputError(f"not a database URL: {redact_url(text)!r}") from None
    backend = parsed.drivername.split("+")[0]
    if backend not in ("sqlite", "postgresql", "postgres"):
        raise BadInputError(f"{backend}:// databases are not supported: use a SQLite file or a PostgreSQL URL "
                            f"({redact_url(text)!r})")
    if backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    if parsed.drivername.startswith("sqlite") and parsed.database:
        parsed = parsed.set(database=str(Path(parsed.database).expanduser().resolve()))
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with its password masked (for files, logs and errors)."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL may still hold a password: keep only the scheme
        return url.split("://", 1)[0] + "://..."


def _describe(url: str) -> str:
    import sqlalchemy

    u = sqlalchemy.engine.make_url(url)
    if u.drivername.startswith("sqlite"):
        return f"SQLite file {u.database}"
    return f"database {u.database!r} on {u.host or 'localhost'}:{u.port or 5432}"


def _database_error(url: str, exc: Exception) -> ApdbError:
    """One line: the database driver's own message (found down the exception chain), not the failed SQL."""
    cause, reason = exc, None
    while cause is not None and reason is None:
        reason = getattr(cause, "orig", None)
        cause = cause.__cause__ or cause.__context__
    text = str(reason or exc).strip()
    if "Execution failed on sql" in text:  # pandas quotes the whole statement before the driver's message
        text = text.rsplit("': ", 1)[-1]
    lines = text.splitlines() or [type(exc).__name__]
    return ApdbError(f"cannot use {_describe(url)}: {lines[0][:300]}")


def create_apdb(url: str | Path, config_path: str | Path, namespace: str | None = None) -> Path:
    """Make the APDB tables at ``url`` and write the APDB config file.

    Parameters
    ----------
    url : str or Path
        A SQLite file path or URL, or a PostgreSQL URL.
    config_path : str or Path
        Where to write the config (``apdb.yaml``).
    namespace : str, optional
        The PostgreSQL schema.

    Returns
    -------
    Path
        The config file.
    """
    import sqlalchemy
    from lsst.dax.apdb.sql import ApdbSql

    db = database_url(url)
    config_path = Path(config_path)
    _check_writable(config_path)
    if db.startswith("sqlite"):
        Path(sqlalchemy.engine.make_url(db).database).parent.mkdir(parents=True, exist_ok=True)
    try:
        config = ApdbSql.init_database(db, namespace=namespace, connection_timeout=10)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _database_error(db, exc) from None
    config.model_copy(update={"db_url": _stored_url(db, config_path.parent)}).save(str(config_path))
    log.info("created APDB (%s), config %s", _describe(db), config_path)
    return config_path


#: Passwords given inside a URL, for this process only (files never hold them): redacted URL -> password.
_PASSWORDS: dict[str, str] = {}


def _check_writable(config_path: Path) -> None:
    """Refuse a config path that cannot be written before any table is made (nothing is left behind)."""
    if config_path.is_dir():
        raise BadInputError("is a folder: give the config file's name (e.g. apdb.yaml)", config_path)
    try:
        config_path.parent.mkdir(parents=True, exist_ok=True)
        probe = config_path.with_name(f".{config_path.name}.{os.getpid()}.probe")
        probe.write_text("")
        probe.unlink()
        if config_path.exists() and not os.access(config_path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise BadInputError(f"cannot write the APDB config there ({exc.strerror or exc})", config_path) from None


def _stored_url(db: str, folder: Path) -> str:
    """The URL as apdb.yaml holds it: never a password (libpq finds it in PGPASSWORD, ~/.pgpass or a service
    file; one given in the URL is remembered for this process); a SQLite file beside the config as a relative
    path, so that a moved or copied run keeps using its own database."""
    import sqlalchemy

    u = sqlalchemy.engine.make_url(db)
    if u.drivername.startswith("sqlite"):
        path = Path(u.database).resolve()
        try:
            return f"sqlite:///{path.relative_to(folder.resolve())}"
        except ValueError:
            return f"sqlite:///{path}"
    if u.password is not None:
        bare = _without_password(u).render_as_string(hide_password=False)
        _PASSWORDS[bare] = str(u.password)
        log.warning("the database password in the URL is used by this process only and written nowhere; set "
                    "PGPASSWORD or use ~/.pgpass so that a resumed run can connect")
        return bare
    return u.render_as_string(hide_password=False)


def _without_password(u):
    import sqlalchemy

    return sqlalchemy.engine.URL.create(u.drivername, username=u.username, host=u.host, port=u.port,
                                        database=u.database, query=u.query)


def _usable_url(stored: str, folder: Path) -> str:
    """The stored URL made usable: a relative SQLite path resolved against the config's folder (opened
    read-write, never created empty), a password remembered from this process's URL."""
    import sqlalchemy

    u = sqlalchemy.engine.make_url(stored)
    if u.drivername.startswith("sqlite"):
        if not u.database or u.database.startswith("file:"):
            return stored
        path = Path(u.database) if Path(u.database).is_absolute() else folder / u.database
        if not path.is_file():
            raise ApdbMissingError(f"its SQLite database {path} is missing", folder / "apdb.yaml")
        return f"sqlite:///file:{path.resolve()}?mode=rw&uri=true"
    if u.password is None and stored in _PASSWORDS:
        return u.set(password=_PASSWORDS[stored]).render_as_string(hide_password=False)
    return stored


class ApdbMissingError(BadInputError):
    """The APDB config is there but its SQLite database file is not."""


@dataclass
class ApdbHandle:
    """An open APDB and its config path."""

    apdb: object
    config_path: Path

    @property
    def url(self) -> str:
        return self.apdb.getConfig().db_url

    @property
    def namespace(self) -> str | None:
        return self.apdb.getConfig().namespace

    def engine(self):
        import sqlalchemy

        return sqlalchemy.create_engine(self.url)

    def contains(self, visit: int, detector: int) -> bool:
        return bool(self.apdb.containsVisitDetector(int(visit), int(detector)))

    def objects_in_region(self, ra: np.ndarray, dec: np.ndarray, pad_arcsec: float = 10.0) -> pd.DataFrame:
        """Latest versions of the diaObjects inside the polygon of sky points (ra, dec), padded."""
        region = sky_polygon(ra, dec, pad_arcsec)
        try:
            objects = self.apdb.getDiaObjects(region)
        except Exception as exc:
            raise _database_error(self.url, exc) from None
        return objects

    def sources_in_region(self, ra: np.ndarray, dec: np.ndarray, pad_arcsec: float = 10.0,
                          since_mjd: float = 0.0) -> pd.DataFrame:
        """diaSources inside the polygon of sky points (ra, dec), padded, observed since ``since_mjd``."""
        import astropy.time

        region = sky_polygon(ra, dec, pad_arcsec)
        start = astropy.time.Time(max(since_mjd, 1.0), format="mjd", scale="tai")
        try:
            found = self.apdb.getDiaSources(region, None, astropy.time.Time.now(), start_time=start)
        except Exception as exc:
            raise _database_error(self.url, exc) from None
        if found is None or found.empty:
            return found if found is not None else pd.DataFrame()
        # the APDB returns whole index pixels: keep what is inside the padded polygon
        from lsst.sphgeom import LonLat, UnitVector3d

        inside = [region.contains(UnitVector3d(LonLat.fromDegrees(float(a), float(d))))
                  for a, d in zip(found.ra, found.dec)]
        return found[np.asarray(inside, bool)].reset_index(drop=True)

    def store(self, mjd: float, objects: pd.DataFrame, sources: pd.DataFrame,
              forced_sources: pd.DataFrame | None = None) -> bool:
        """Store one (visit, detector) unless the APDB already has it; True when written."""
        import astropy.time

        if len(sources):
            visit, detector = int(sources.visit.iloc[0]), int(sources.detector.iloc[0])
        elif forced_sources is not None and len(forced_sources):
            visit, detector = int(forced_sources.visit.iloc[0]), int(forced_sources.detector.iloc[0])
        else:
            return False
        if self.contains(visit, detector):
            log.info("APDB already holds visit %d detector %d: not stored again", visit, detector)
            return False
        visit_time = astropy.time.Time(mjd, format="mjd", scale="tai")
        try:
            self.apdb.store(visit_time, objects, sources, forced_sources)
        except Exception as exc:
            raise _database_error(self.url, exc) from None
        return True

    def table(self, name: str, latest: bool = True) -> pd.DataFrame:
        """A whole table as a DataFrame (for DiaObject only the latest version of each object)."""
        import sqlalchemy

        engine = self.engine()
        try:
            with engine.connect() as conn:
                meta = sqlalchemy.MetaData(schema=self.namespace)
                table = sqlalchemy.Table(name, meta, autoload_with=conn)
                query = sqlalchemy.select(table)
                if name == "DiaObject" and latest:
                    query = query.where(table.c.validityEndMjdTai.is_(None))
                return pd.read_sql(query, conn)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise _database_error(self.url, exc) from None
        finally:
            engine.dispose()

    def counts(self) -> pd.DataFrame:
        """Rows per table and band (DiaObject: objects with data in that band)."""
        rows = []
        for name in ("DiaSource", "DiaForcedSource"):
            t = self.table(name)
            for band, n in (t.groupby("band").size().items() if len(t) else []):
                rows.append((name, band, int(n)))
            rows.append((name, "all", len(t)))
        objects = self.table("DiaObject")
        for band in APDB_BANDS:
            n = int((objects[f"{band}_psfFluxNdata"] > 0).sum()) if len(objects) else 0
            if n:
                rows.append(("DiaObject", band, n))
        rows.append(("DiaObject", "all", len(objects)))
        return pd.DataFrame(rows, columns=["table", "band", "rows"])


def open_apdb(config_path: str | Path) -> ApdbHandle:
    """Open an APDB from its config file, checking that the database answers.

    Parameters
    ----------
    config_path : str or Path

    Returns
    -------
    ApdbHandle
        Reads regions and stores visits.
    """
    from lsst.dax.apdb import ApdbConfig
    from lsst.dax.apdb.factory import make_apdb

    config_path = Path(config_path)
    if not config_path.is_file():
        raise BadInputError("APDB config file not found (make one with `dialab apdb create`)", config_path)
    try:
        config = ApdbConfig.from_uri(str(config_path.resolve()))
    except Exception as exc:
        raise BadInputError(f"not an APDB config ({str(exc).splitlines()[0]})", config_path) from None
    config = config.model_copy(update={"db_url": _usable_url(config.db_url, config_path.parent)})
    try:
        apdb = make_apdb(config)
    except Exception as exc:
        raise _database_error(config.db_url, exc) from None
    handle = ApdbHandle(apdb, config_path)
    for attempt in range(3):
        try:
            with handle.engine().connect():
                break
        except Exception as exc:
            if attempt == 2:
                raise _database_error(handle.url, exc) from None
            time.sleep(0.5)
    return handle


def sky_polygon(ra: np.ndarray, dec: np.ndarray, pad_arcsec: float):
    """A convex sky polygon through points (ordered round the region), pushed out by ``pad_arcsec``."""
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    cra, cdec = mean_position(ra, dec)
    xi, eta = tangent_offsets(ra, dec, cra, cdec)  # on the plane tangent at the centre: fine at the poles
    grow = 1 + pad_arcsec / np.maximum(np.hypot(xi, eta), 1e-6)
    pra, pdec = from_tangent(xi * grow, eta * grow, cra, cdec)
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(a), float(d))) for a, d in zip(pra, pdec)])


def schema_columns(handle: ApdbHandle, table: str) -> list[str]:
    from lsst.dax.apdb import ApdbTables

    return [c.name for c in handle.apdb.tableDef(ApdbTables[table]).columns]


def check_columns(catalog: pd.DataFrame, required: tuple[str, ...], what: str) -> None:
    missing = [c for c in required if c not in catalog.columns]
    if missing:
        raise BadInputError(f"{what} lacks required column(s): {', '.join(missing)}")


def apdb_band(band: str | None) -> str | None:
    """The schema's one-letter band (u, g, r, i, z, y) for a filter name, or None when it has none
    (e.g. JWST F200W): such sources are stored without a band and without per-band summaries."""
    import re

    for token in re.split(r"[\s._\-/]+", (band or "").strip().lower()):
        if token in APDB_BANDS:
            return token
    return None


def to_dia_sources(catalog: pd.DataFrame, njy_per_count: float, columns: list[str]) -> pd.DataFrame:
    """Schema rows from a dialab catalog: fluxes to nJy, NOT NULL columns filled, extras dropped."""
    check_columns(catalog, REQUIRED_SOURCE_COLUMNS, "diaSource catalog")
    out = catalog.copy()
    out["band"] = out["band"].map(apdb_band)
    for col in FLUX_COLUMNS:
        if col in out:
            out[col] = out[col].astype(float) * njy_per_count
    now = float(pd.Timestamp.now("UTC").to_julian_date() - 2400000.5)
    defaults = {"psfNdata": 0, "trailNdata": 0, "dipoleNdata": 0, "bboxSize": 0, "timeProcessedMjdTai": now}
    for col, value in defaults.items():
        out[col] = out[col].fillna(value) if col in out else value
    for col in ("psfNdata", "trailNdata", "dipoleNdata", "bboxSize"):
        out[col] = out[col].astype(np.int64)
    return out[[c for c in columns if c in out.columns]]
