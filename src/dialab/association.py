"""Association of diaSources into diaObjects, object summaries, and forced photometry at objects.

Each (visit, detector) is matched against the latest diaObjects of its region: one-to-one by
smallest total distance (an optimal assignment that first pairs as many as it can), within 1 arcsec; the rest start new
objects. Summaries are updated incrementally from the stored statistics (exact: sums are recovered
from mean, sigma and count), so no source history has to be read back.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .apdb import APDB_BANDS, apdb_band, schema_columns, to_dia_sources
from .errors import BadInputError
from .exposure import Exposure
from .ids import pack_ids
from .lazy import lazy_module
from .matching import match_sky
from .photometry import forced_psf_flux
from .sky import running_mean

pd = lazy_module("pandas")

log = logging.getLogger(__name__)


class AssociateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    radius_arcsec: float = Field(1.0, gt=0, description="largest source-object distance that joins them")
    region_pad_arcsec: float = Field(10.0, ge=0, description="margin round the image when loading objects")
    forced_photometry: bool = True


def match_to_objects(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec: float) -> np.ndarray:
    """For each source the index of its object (-1: none), one-to-one within ``radius_arcsec``
    (the optimal assignment of :func:`dialab.matching.match_sky`, on the sphere)."""
    return match_sky(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec)[0]


def _band_columns(band: str) -> dict[str, str]:
    keys = ("psfFluxMean", "psfFluxMeanErr", "psfFluxSigma", "psfFluxNdata", "psfFluxMin", "psfFluxMax",
            "psfFluxErrMean", "scienceFluxMean", "scienceFluxMeanErr")
    return {k: f"{band}_{k}" for k in keys}


def _updated_stats(old: pd.DataFrame, src: pd.DataFrame, band: str) -> pd.DataFrame:
    """Per-band flux statistics after adding one source to each object (rows aligned)."""
    c = _band_columns(band)
    n0 = old[c["psfFluxNdata"]].fillna(0).to_numpy(np.int64)
    mean0 = np.nan_to_num(old[c["psfFluxMean"]].to_numpy(float))
    sig0 = np.nan_to_num(old[c["psfFluxSigma"]].to_numpy(float))
    s1 = mean0 * n0
    s2 = np.where(n0 >= 2, sig0**2 * (n0 - 1), 0.0) + n0 * mean0**2
    e2 = (np.nan_to_num(old[c["psfFluxMeanErr"]].to_numpy(float)) * n0) ** 2
    esum = np.nan_to_num(old[c["psfFluxErrMean"]].to_numpy(float)) * n0
    f, ferr = src.psfFlux.to_numpy(float), src.psfFluxErr.to_numpy(float)
    ok = np.isfinite(f) & np.isfinite(ferr)
    n = n0 + ok
    s1 = s1 + np.where(ok, f, 0)
    s2 = s2 + np.where(ok, f * f, 0)
    e2 = e2 + np.where(ok, ferr**2, 0)
    esum = esum + np.where(ok, ferr, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s1 / n, np.nan)
        sigma = np.where(n >= 2, np.sqrt(np.maximum(s2 - n * mean**2, 0) / (n - 1)), np.nan)
        out = {c["psfFluxNdata"]: n, c["psfFluxMean"]: mean, c["psfFluxSigma"]: sigma,
               c["psfFluxMeanErr"]: np.where(n > 0, np.sqrt(e2) / n, np.nan),
               c["psfFluxErrMean"]: np.where(n > 0, esum / n, np.nan),
               c["psfFluxMin"]: np.where(ok, np.fmin(old[c["psfFluxMin"]].to_numpy(float), f),
                                         old[c["psfFluxMin"]].to_numpy(float)),
               c["psfFluxMax"]: np.where(ok, np.fmax(old[c["psfFluxMax"]].to_numpy(float), f),
                                         old[c["psfFluxMax"]].to_numpy(float))}
        if "scienceFlux" in src:
            sf, sferr = src.scienceFlux.to_numpy(float), src.scienceFluxErr.to_numpy(float)
            sok = np.isfinite(sf) & np.isfinite(sferr)
            # science-flux mean over the sources that have one, its error from the summed variances
            sn0 = np.where(np.isfinite(old[c["scienceFluxMean"]].to_numpy(float)), n0, 0)
            ssum = np.nan_to_num(old[c["scienceFluxMean"]].to_numpy(float)) * sn0 + np.where(sok, sf, 0)
            se2 = (np.nan_to_num(old[c["scienceFluxMeanErr"]].to_numpy(float)) * sn0) ** 2 + np.where(sok, sferr**2, 0)
            sn = sn0 + sok
            out[c["scienceFluxMean"]] = np.where(sn > 0, ssum / sn, np.nan)
            out[c["scienceFluxMeanErr"]] = np.where(sn > 0, np.sqrt(se2) / sn, np.nan)
    return pd.DataFrame(out, index=old.index)


def empty_objects(n: int) -> pd.DataFrame:
    """n blank DiaObject rows: counts zero, every statistic unknown."""
    data = {"diaObjectId": np.zeros(n, np.int64), "ra": np.full(n, np.nan), "dec": np.full(n, np.nan),
            "nDiaSources": np.zeros(n, np.int64), "firstDiaSourceMjdTai": np.full(n, np.nan),
            "lastDiaSourceMjdTai": np.full(n, np.nan)}
    for band in APDB_BANDS:
        for key, col in _band_columns(band).items():
            data[col] = np.zeros(n, np.int64) if key == "psfFluxNdata" else np.full(n, np.nan)
    return pd.DataFrame(data)


def associate(sources: pd.DataFrame, objects: pd.DataFrame, config: AssociateConfig | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(sources with ``diaObjectId``, DiaObject rows to store: the updated and the new objects).

    ``sources`` are schema rows of one (visit, detector) (fluxes in nJy); ``objects`` the latest
    versions of the diaObjects that may overlap it.
    """
    cfg = config or AssociateConfig()
    sources = sources.reset_index(drop=True).copy()
    n = len(sources)
    if n == 0:
        sources["diaObjectId"] = pd.Series(dtype=np.int64)
        return sources, empty_objects(0)
    objects = objects.reset_index(drop=True)
    match = match_to_objects(sources.ra.to_numpy(), sources.dec.to_numpy(), objects.ra.to_numpy(float),
                             objects.dec.to_numpy(float), cfg.radius_arcsec) if len(objects) else np.full(n, -1)
    joined = match >= 0
    # The object before this visit: the stored row, or a blank one that the source starts.
    before = empty_objects(n)
    stored = objects.iloc[match[joined]].reset_index(drop=True)
    if joined.any():
        for col in before.columns:
            if col in stored:
                before.loc[joined, col] = stored[col].to_numpy()
    before.loc[~joined, "diaObjectId"] = sources.diaSourceId.to_numpy()[~joined]
    before.loc[~joined, "ra"] = sources.ra.to_numpy()[~joined]
    before.loc[~joined, "dec"] = sources.dec.to_numpy()[~joined]
    after = before.copy()
    n0 = before.nDiaSources.to_numpy(np.int64)
    after["nDiaSources"] = n0 + 1
    after["ra"], after["dec"] = running_mean(before.ra.to_numpy(float), before.dec.to_numpy(float), n0,
                                             sources.ra.to_numpy(float), sources.dec.to_numpy(float))
    t = sources.midpointMjdTai.to_numpy(float)
    after["firstDiaSourceMjdTai"] = np.fmin(before.firstDiaSourceMjdTai.to_numpy(float), t)
    after["lastDiaSourceMjdTai"] = np.fmax(before.lastDiaSourceMjdTai.to_numpy(float), t)
    for band in sources.band.dropna().unique():
        if band not in APDB_BANDS:
            continue
        rows = (sources.band == band).to_numpy()
        stats = _updated_stats(before[rows], sources[rows], band)
        for col in stats:
            after.loc[rows, col] = stats[col].to_numpy()
    # Keep the stored row's other columns (e.g. those another tool filled) on the new version.
    if joined.any():
        extra = [c for c in stored.columns if c not in after.columns and not c.startswith("validity")
                 and c != "pixelId"]
        for col in extra:
            after[col] = np.nan
            after.loc[joined, col] = stored[col].to_numpy()
    sources["diaObjectId"] = after.diaObjectId.to_numpy(np.int64)
    after["diaObjectId"] = after.diaObjectId.astype(np.int64)
    after["nDiaSources"] = after.nDiaSources.astype(np.int64)
    for band in APDB_BANDS:
        after[f"{band}_psfFluxNdata"] = after[f"{band}_psfFluxNdata"].astype(np.int64)
    return sources, after


def flux_scale(exp: Exposure | None) -> float:
    """nJy per count of an exposure; 1 (fluxes stay in counts) when it has no MAGZERO."""
    if exp is None:
        return 1.0
    scale = exp.njy_per_count
    return float(scale) if np.isfinite(scale) else 1.0


def forced_sources(objects: pd.DataFrame, difference: Exposure, science: Exposure | None, visit: int,
                   detector: int, band: str, mjd: float, processed_mjd: float) -> pd.DataFrame:
    """DiaForcedSource rows: PSF fluxes (nJy) on the difference and science at every object in the image."""
    cols = ["diaForcedSourceId", "diaObjectId", "ra", "dec", "visit", "detector", "psfFlux", "psfFluxErr",
            "scienceFlux", "scienceFluxErr", "midpointMjdTai", "band", "timeProcessedMjdTai"]
    if len(objects) == 0 or difference.wcs is None:
        return pd.DataFrame(columns=cols)
    xy = difference.wcs.all_world2pix(np.column_stack([objects.ra, objects.dec]), 0)
    ny, nx = difference.shape
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= nx - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= ny - 1)
    # Ordered by object id: forced-source ids must not depend on the order the database returned objects in.
    order = np.argsort(objects.diaObjectId.to_numpy(np.int64)[inside], kind="stable")
    obj, xy = objects[inside].iloc[order], xy[inside][order]
    scale = flux_scale(difference)
    diff = forced_psf_flux(difference, xy[:, 0], xy[:, 1])
    out = pd.DataFrame({
        "diaForcedSourceId": pack_ids(visit, detector, len(obj), "forced sources"),
        "diaObjectId": obj.diaObjectId.to_numpy(np.int64), "ra": obj.ra.to_numpy(float),
        "dec": obj.dec.to_numpy(float), "visit": visit, "detector": detector,
        "psfFlux": diff.psfFlux.to_numpy() * scale, "psfFluxErr": diff.psfFluxErr.to_numpy() * scale})
    if science is not None and science.psf is not None:
        sci = forced_psf_flux(science, xy[:, 0], xy[:, 1])
        out["scienceFlux"] = sci.psfFlux.to_numpy() * flux_scale(science)
        out["scienceFluxErr"] = sci.psfFluxErr.to_numpy() * flux_scale(science)
    else:
        out["scienceFlux"] = out["scienceFluxErr"] = np.nan
    out["midpointMjdTai"] = mjd
    out["band"] = apdb_band(band)
    out["timeProcessedMjdTai"] = processed_mjd
    return out[cols]


#: Days between two versions of a diaObject written in one visit (an object seen by two of its detectors).
VERSION_STEP_DAYS = 1e-6


def _version_time(mjd: float, existing: pd.DataFrame, objects: pd.DataFrame) -> float:
    """When the new diaObject versions start: the visit's time, or just after a version this visit already wrote.

    A diaObject version is keyed by its start time. Detectors of one visit that overlap on the sky (cutouts of
    one exposure, a mosaic with overlaps) update the same objects at the same time: the later detector's
    versions start ``VERSION_STEP_DAYS`` after the earlier ones instead of colliding with them.
    """
    column = "validityStartMjdTai"
    if column not in existing or not len(objects):
        return mjd
    start = existing.loc[existing.diaObjectId.isin(objects.diaObjectId), column].astype(float)
    return max(mjd, float(start.max()) + VERSION_STEP_DAYS) if len(start) and start.max() >= mjd else mjd


def store_visit_detector(handle, catalog: pd.DataFrame, difference: Exposure, science: Exposure | None = None,
                         config: AssociateConfig | None = None) -> dict:
    """Associate one (visit, detector) catalog with the APDB's diaObjects and store it, once.

    Parameters
    ----------
    handle : ApdbHandle
    catalog : pandas.DataFrame
        diaSources (fluxes in counts) of ``difference``.
    difference : Exposure
        Its WCS places the sources on the sky; its MAGZERO converts fluxes to nJy.
    science : Exposure, optional
        For forced science fluxes of every object in the image.
    config : AssociateConfig, optional

    Returns
    -------
    dict
        Counts: sources stored, objects new and updated, forced sources; ``stored`` is False when the
        APDB already held this (visit, detector).
    """
    cfg = config or AssociateConfig()
    visit, detector, band, mjd = difference.visit, difference.detector, difference.band, difference.mjd
    summary = {"visit": visit, "detector": detector, "stored": False, "sources": 0, "new_objects": 0,
               "updated_objects": 0, "forced_sources": 0}
    if handle.contains(visit, detector):
        return summary
    if difference.wcs is None:
        raise BadInputError(f"visit {visit} detector {detector} has no WCS: its diaSources cannot be placed on the "
                            "sky, so they are not associated or stored in the APDB", difference.path)
    if not np.isfinite(difference.njy_per_count):
        log.warning("visit %s detector %s has no MAGZERO: its APDB fluxes are in counts", visit, detector)
    rows = to_dia_sources(catalog, flux_scale(difference), schema_columns(handle, "DiaSource"))
    ny, nx = difference.shape
    corners = np.array([[0, 0], [nx - 1, 0], [nx - 1, ny - 1], [0, ny - 1]], float)
    ra, dec = difference.wcs.all_pix2world(corners, 0).T
    existing = handle.objects_in_region(ra, dec, cfg.region_pad_arcsec)
    rows, objects = associate(rows, existing, cfg)
    processed = float(rows.timeProcessedMjdTai.iloc[0]) if len(rows) else float(
        pd.Timestamp.now("UTC").to_julian_date() - 2400000.5)
    known = pd.concat([existing[~existing.diaObjectId.isin(objects.diaObjectId)], objects], ignore_index=True)
    forced = forced_sources(known, difference, science, visit, detector, band, mjd, processed) \
        if cfg.forced_photometry else None
    if handle.store(_version_time(mjd, existing, objects), objects, rows, forced):
        new = int((objects.nDiaSources == 1).sum())
        summary.update(stored=True, sources=len(rows), new_objects=new, updated_objects=len(objects) - new,
                       forced_sources=0 if forced is None else len(forced))
    return summary
