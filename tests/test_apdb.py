"""APDB storage and association, against SQLite and a real PostgreSQL server.

PostgreSQL tests use the server whose URL is in DIALAB_TEST_POSTGRES_URL (``.ci/run`` starts one);
in CI a missing URL fails them, elsewhere it skips them with the reason.
"""

import multiprocessing
import uuid

import numpy as np
import pandas as pd
import pytest

from dialab.apdb import create_apdb, open_apdb
from dialab.association import AssociateConfig, associate, match_to_objects, store_visit_detector
from dialab.cli import main
from dialab.exposure import Exposure
from dialab.psf import GaussianPsf
from dialab.simulate.observe import tan_wcs

from .conftest import postgres_url

RA0, DEC0 = 150.1, 2.2
SHAPE = (200, 200)
ARCSEC = 1 / 3600


def _postgres_url() -> str:
    return postgres_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def apdb_config(request, tmp_path):
    """A fresh APDB config path on each backend (PostgreSQL: a new schema namespace per test)."""
    if request.param == "sqlite":
        return create_apdb(tmp_path / "apdb.sqlite3", tmp_path / "apdb.yaml")
    return create_apdb(_postgres_url(), tmp_path / "apdb.yaml", namespace=f"t_{uuid.uuid4().hex[:12]}")


def difference(visit: int, detector: int = 1, band: str = "r", mjd: float | None = None) -> Exposure:
    rng = np.random.default_rng(visit)
    return Exposure(rng.normal(0, 1, SHAPE), np.zeros(SHAPE, np.int32), np.ones(SHAPE),
                    psf=GaussianPsf(sigma_pix=2.0), wcs=tan_wcs(SHAPE, 0.2, RA0, DEC0), visit=visit, detector=detector,
                    band=band, mjd=60000.0 + visit if mjd is None else mjd, magzero=31.4)


def catalog(exp: Exposure, offsets_arcsec: list[tuple[float, float]], fluxes: list[float]) -> pd.DataFrame:
    """A measured catalog (fluxes in counts) at offsets (east, north) from the field centre."""
    ra = np.array([RA0 + dx * ARCSEC / np.cos(np.deg2rad(DEC0)) for dx, _ in offsets_arcsec])
    dec = np.array([DEC0 + dy * ARCSEC for _, dy in offsets_arcsec])
    x, y = exp.wcs.all_world2pix(np.column_stack([ra, dec]), 0).T
    n = len(ra)
    return pd.DataFrame({
        "diaSourceId": (exp.visit * 1000 + exp.detector) * 100_000 + np.arange(1, n + 1), "visit": exp.visit,
        "detector": exp.detector, "band": exp.band, "midpointMjdTai": exp.mjd, "ra": ra, "dec": dec, "x": x, "y": y,
        "psfFlux": np.asarray(fluxes, float), "psfFluxErr": np.full(n, 10.0), "snr": np.asarray(fluxes) / 10.0,
        "scienceFlux": np.full(n, 500.0), "scienceFluxErr": np.full(n, 5.0), "isNegative": False, "isDipole": False,
        "pixelFlags_bad": False, "peakSnr": 7.0, "bboxSize": 9})


def test_optimal_assignment_beats_greedy():
    # greedy would give source 0 the object it is nearest (object 0), leaving source 1 without one
    src_ra = np.array([0.0, -0.7]) * ARCSEC
    obj_ra = np.array([-0.1, 0.8]) * ARCSEC
    zeros = np.zeros(2)
    match = match_to_objects(src_ra + 10, zeros, obj_ra + 10, zeros, 1.0)
    assert list(match) == [1, 0]


def test_association_across_three_visits(apdb_config):
    handle = open_apdb(apdb_config)
    # visit 1: star A at the centre, star B 5" east
    e1 = difference(1)
    store_visit_detector(handle, catalog(e1, [(0, 0), (5, 0)], [100, 200]), e1)
    # visit 2: A again (0.3" off), and a source 1.5" north of A: too far, a new object
    e2 = difference(2)
    store_visit_detector(handle, catalog(e2, [(0.3, 0), (0, 1.5), (5.1, 0.1)], [110, 50, 210]), e2)
    # visit 3: two sources near A (0.2" and 0.7"): only the nearer joins it
    e3 = difference(3)
    store_visit_detector(handle, catalog(e3, [(0, 0.2), (-0.7, 0), (4.9, 0)], [130, 60, 190]), e3)

    objects = handle.table("DiaObject")
    sources = handle.table("DiaSource")
    assert len(sources) == 8
    assert len(objects) == 4  # A, B, the 1.5" source and the 0.7" one
    per_object = sources.groupby("diaObjectId").size()
    assert sorted(per_object.tolist()) == [1, 1, 3, 3]
    a_id = int(sources[sources.diaSourceId == 100_001 + 1000 * 100_000].diaObjectId.iloc[0])
    a = objects[objects.diaObjectId == a_id].iloc[0]
    a_src = sources[sources.diaObjectId == a_id]
    assert a.nDiaSources == 3
    assert a.ra == pytest.approx(a_src.ra.mean(), abs=1e-10)
    assert a.dec == pytest.approx(a_src.dec.mean(), abs=1e-10)
    flux_njy = np.array([100.0, 110.0, 130.0]) * e1.njy_per_count
    assert a.r_psfFluxNdata == 3 and a.g_psfFluxNdata == 0
    assert a.r_psfFluxMean == pytest.approx(flux_njy.mean())
    assert a.r_psfFluxSigma == pytest.approx(flux_njy.std(ddof=1))
    assert a.r_psfFluxMin == pytest.approx(flux_njy.min()) and a.r_psfFluxMax == pytest.approx(flux_njy.max())
    assert a.firstDiaSourceMjdTai == pytest.approx(60001.0) and a.lastDiaSourceMjdTai == pytest.approx(60003.0)
    # region reads: round the field centre all eight sources, far away none
    box = np.array([-10, 10]) * ARCSEC
    ra_c = RA0 + np.array([box[0], box[1], box[1], box[0]]) / np.cos(np.deg2rad(DEC0))
    dec_c = DEC0 + np.array([box[0], box[0], box[1], box[1]])
    assert len(handle.sources_in_region(ra_c, dec_c, pad_arcsec=1.0)) == 8
    assert len(handle.sources_in_region(ra_c + 1.0, dec_c, pad_arcsec=1.0)) == 0
    assert len(handle.objects_in_region(ra_c, dec_c, pad_arcsec=1.0)) >= 4
    # the 0.7" source of visit 3 went to a new object, not to A
    far = sources[(sources.visit == 3) & (np.abs(sources.ra - (RA0 - 0.7 * ARCSEC / np.cos(np.deg2rad(DEC0)))) < 1e-9)]
    assert int(far.diaObjectId.iloc[0]) != a_id
    # forced photometry at every object known in the image, every visit
    forced = handle.table("DiaForcedSource")
    assert set(forced.visit) == {1, 2, 3} and (forced.groupby("visit").size().to_dict() == {1: 2, 2: 3, 3: 4})


def test_storing_a_visit_twice_leaves_one_copy(apdb_config):
    handle = open_apdb(apdb_config)
    e = difference(7)
    cat = catalog(e, [(0, 0), (3, 3)], [100, 100])
    first = store_visit_detector(handle, cat, e)
    again = store_visit_detector(handle, cat, e)
    assert first["stored"] and not again["stored"]
    assert len(handle.table("DiaSource")) == 2 and len(handle.table("DiaObject")) == 2


def _store_visits(config_path, visits):
    handle = open_apdb(config_path)
    for v in visits:
        e = difference(v, detector=v % 7)
        offsets = [(dx, dy) for dx in range(-8, 9, 4) for dy in range(-8, 9, 4)]
        store_visit_detector(handle, catalog(e, offsets, [100.0] * len(offsets)), e,
                             config=AssociateConfig(forced_photometry=False))


def test_concurrent_writers_lose_nothing_in_postgresql(tmp_path):
    config = create_apdb(_postgres_url(), tmp_path / "apdb.yaml", namespace=f"t_{uuid.uuid4().hex[:12]}")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_store_visits, args=(config, range(start, start + 6))) for start in (10, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    sources = open_apdb(config).table("DiaSource")
    assert len(sources) == 12 * 25 and sources.diaSourceId.is_unique


def test_catalog_missing_a_column_names_it(tmp_path):
    handle = open_apdb(create_apdb(tmp_path / "a.sqlite3", tmp_path / "apdb.yaml"))
    e = difference(1)
    with pytest.raises(Exception, match="psfFluxErr"):
        store_visit_detector(handle, catalog(e, [(0, 0)], [1.0]).drop(columns="psfFluxErr"), e)


def test_associate_without_objects_starts_one_per_source():
    e = difference(1)
    from dialab.apdb import to_dia_sources

    rows = to_dia_sources(catalog(e, [(0, 0), (0.5, 0)], [1, 2]), 1.0, list(catalog(e, [(0, 0)], [1]).columns))
    sources, objects = associate(rows, pd.DataFrame(columns=["diaObjectId", "ra", "dec"]))
    assert len(objects) == 2 and list(sources.diaObjectId) == list(sources.diaSourceId)


def test_unreachable_database_is_one_line_without_password(tmp_path, capsys):
    code = main(["apdb", "create", "postgresql://alice:s3cret@127.0.0.1:1/nowhere", "-c", str(tmp_path / "a.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "127.0.0.1:1" in err and "nowhere" in err and "s3cret" not in err


def test_wrong_url_is_one_line(tmp_path, capsys):
    assert main(["apdb", "create", "nosuchdb://x/y", "-c", str(tmp_path / "a.yaml")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_apdb_cli_create_and_summary(tmp_path, capsys):
    assert main(["apdb", "create", str(tmp_path / "db.sqlite3"), "-c", str(tmp_path / "apdb.yaml")]) == 0
    handle = open_apdb(tmp_path / "apdb.yaml")
    e = difference(1)
    store_visit_detector(handle, catalog(e, [(0, 0), (3, 0)], [10, 20]), e)
    capsys.readouterr()
    assert main(["apdb", "summary", str(tmp_path / "apdb.yaml")]) == 0
    out = capsys.readouterr().out
    assert "DiaSource" in out and "DiaObject" in out and "2" in out


def test_ids_pack_and_unpack_with_range_checks():
    from dialab.errors import BadInputError
    from dialab.ids import MAX_VISIT, pack_ids, unpack_id

    ids = pack_ids(MAX_VISIT, 999, 3)
    visit, detector, index = unpack_id(ids)
    assert (visit == MAX_VISIT).all() and (detector == 999).all() and list(index) == [1, 2, 3]
    assert len(set(pack_ids(7, 3, 5)) & set(pack_ids(7, 4, 5))) == 0
    for visit, detector, n in [(-1, 0, 1), (MAX_VISIT + 1, 0, 1), (1, 1000, 1), (1, 0, 100_000)]:
        with pytest.raises(BadInputError, match="cannot number"):
            pack_ids(visit, detector, n)


def test_forced_source_ids_do_not_depend_on_the_order_objects_come_in():
    from dialab.association import forced_sources

    e = difference(3)
    rng = np.random.default_rng(0)
    objects = pd.DataFrame({"diaObjectId": np.arange(100, 130) * 7, "ra": RA0 + rng.uniform(-5, 5, 30) * ARCSEC,
                            "dec": DEC0 + rng.uniform(-5, 5, 30) * ARCSEC})
    one = forced_sources(objects, e, None, 3, 1, "r", 60000.0, 60000.1)
    two = forced_sources(objects.sample(frac=1, random_state=1), e, None, 3, 1, "r", 60000.0, 60000.1)
    pd.testing.assert_frame_equal(one.reset_index(drop=True), two.reset_index(drop=True))
    assert one.diaForcedSourceId.is_unique


def test_detectors_of_one_visit_that_overlap_update_their_shared_objects(apdb_config):
    """Two overlapping detectors of one visit (cutouts of one exposure) see the same star: the second update of
    its diaObject is a later version, not a collision with the first."""
    handle = open_apdb(apdb_config)
    e1, e2 = difference(4, detector=1), difference(4, detector=2)
    store_visit_detector(handle, catalog(e1, [(0, 0), (5, 0)], [100, 200]), e1)
    stored = store_visit_detector(handle, catalog(e2, [(0.2, 0), (-6, 0)], [110, 50]), e2)
    assert stored["stored"] and stored["updated_objects"] == 1
    objects = handle.table("DiaObject")
    assert len(objects) == 3 and sorted(objects.nDiaSources) == [1, 1, 2]
    versions = handle.table("DiaObject", latest=False)
    shared = versions[versions.diaObjectId == objects[objects.nDiaSources == 2].diaObjectId.iloc[0]]
    assert len(shared) == 2 and shared.validityStartMjdTai.nunique() == 2
    assert shared.validityStartMjdTai.min() == pytest.approx(60004.0)


def test_a_database_error_is_the_drivers_one_line_not_the_sql(apdb_config):
    from dialab.apdb import ApdbError

    handle = open_apdb(apdb_config)
    e1, e2 = difference(5, detector=1), difference(5, detector=2)
    store_visit_detector(handle, catalog(e1, [(0, 0)], [100]), e1)
    objects = handle.table("DiaObject").drop(columns=["validityStartMjdTai", "validityEndMjdTai"])
    sources = catalog(e2, [(0, 0)], [100]).assign(diaObjectId=objects.diaObjectId.iloc[0])
    rows = sources[[c for c in handle.table("DiaSource").columns if c in sources]]
    with pytest.raises(ApdbError) as info:  # the same object version again, at the same time
        handle.store(60005.0, objects, rows)
    message = str(info.value)
    assert "INSERT" not in message and len(message) < 400 and len(message.splitlines()) == 1
