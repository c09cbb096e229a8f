"""`dialab run` on real telescope files: plain FITS in, diaSources and an APDB out."""

import re

import pandas as pd
import yaml

from dialab.analysis.report import build_report
from dialab.apdb import open_apdb
from dialab.cli import main
from dialab.exposure import write_exposure

from .test_subtraction_real import _decam_reference

NIRCAM = "jw{}-{}-o001_{}_nircam_clear-f200w_i2d_stamp"
T001 = NIRCAM.format("01324001001", "01324", "t001")
T003 = NIRCAM.format("02561001002", "02561", "t003")


def test_real_pairs_run_end_to_end(real_data, tmp_path):
    """DECam frames (plain FITS, PSFs measured, no MAGZERO) against a coadded reference, and the NIRCam
    pair with its given PSFs and noise maps (a JWST filter name has no APDB band)."""
    write_exposure(_decam_reference(real_data), tmp_path / "DEC-OBS18-mean.fits")
    nircam = real_data / "nircam"
    entries = [{"visit": 400 + i, "detector": 6, "band": "i", "mjd": 58334.0 + 0.01 * i,
                "science": str(real_data / "decam" / f"DEC-OBS04{c}.mini.fits"), "template": "DEC-OBS18-mean.fits"}
               for i, c in enumerate("abc")]
    entries.append({"visit": 3, "detector": 1, "band": "F200W", "mjd": 59890.0,
                    "science": str(nircam / f"{T003}.fits"), "template": str(nircam / f"{T001}.fits"),
                    "science_psf": str(nircam / f"{T003}.WebbPSF.fits"),
                    "template_psf": str(nircam / f"{T001}.WebbPSF.fits"),
                    "science_noise": str(nircam / f"{T003}.noise.fits"),
                    "template_noise": str(nircam / f"{T001}.noise.fits")})
    manifest = tmp_path / "dataset.yaml"
    manifest.write_text(yaml.safe_dump({"name": "real", "entries": entries}))
    out = tmp_path / "run"
    assert main(["run", str(manifest), "-o", str(out), "--workers", "2", "--flavor", "convolveTemplate",
                 "--flavor", "auto"]) == 0
    for flavor in ("convolveTemplate", "auto"):
        handle = open_apdb(out / flavor / "apdb.yaml")
        sources = handle.table("DiaSource")
        assert set(sources.visit) == {400, 401, 402, 3}
        assert sources.diaSourceId.is_unique and sources.ra.notna().all()
        assert set(sources.band.dropna()) == {"i"} and sources[sources.visit == 3].band.isna().all()
        objects = handle.table("DiaObject")
        assert 0 < len(objects) < len(sources)  # the same DECam sources recur across the three frames
        assert (objects.i_psfFluxNdata > 0).any()
        for e in entries:
            cat = pd.read_parquet(out / flavor / e["band"] / str(e["visit"]) / str(e["detector"]) / "diaSources.parquet")
            assert (cat.visit == e["visit"]).all() and (cat.detector == e["detector"]).all()
    _check_report_without_fakes(out, tmp_path / "report")


def _check_report_without_fakes(run, folder):
    """A real run without fakes or truth: no claim of a better flavor, no empty or all-NaN panels and columns."""
    index = build_report([run], folder)
    text = index.read_text()
    assert "No fakes and no truth" in text and "better than" not in text and "Detections by likely cause" in text
    assert "Efficiency vs" not in text
    summary = pd.read_csv(folder / "summary.csv")
    assert not any(c.startswith("fakes") or "contamina" in c for c in summary.columns)
    assert summary.notna().all().all()
    per_object = pd.read_csv(folder / "sources_per_object.csv")
    assert per_object.nDiaSources.is_monotonic_increasing
    images = re.findall(r'<img src="([^"]+)"', text)
    assert any(i.startswith("psf_") for i in images) and any(i.startswith("side_by_side_") for i in images)
    for name in images:
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"


def test_frames_without_wcs_are_recorded_as_association_failures(real_data, tmp_path, capsys):
    """pyDIA frames have no WCS: catalogs are written, the APDB step fails with a clear reason."""
    pydia = real_data / "pydia"
    entries = [{"visit": 100, "detector": 0, "band": "i", "mjd": 56507.8, "science": str(pydia / "AKB13475I0100.fits"),
                "template": str(pydia / "AKB13475I0028.fits")}]
    manifest = tmp_path / "dataset.yaml"
    manifest.write_text(yaml.safe_dump({"name": "pydia", "entries": entries}))
    out = tmp_path / "run"
    assert main(["run", str(manifest), "-o", str(out), "--flavor", "auto", "--workers", "1"]) == 1
    assert (out / "auto" / "i" / "100" / "0" / "diaSources.parquet").is_file()
    printed = capsys.readouterr().out
    assert "no WCS" in printed and "failed" in printed
    failures = pd.read_csv(out / "failures.csv")
    assert len(failures) == 1 and "no WCS" in failures.reason.iloc[0]


def test_decam_run_with_fakes(real_data, tmp_path):
    """The README's DECam example with --fakes: 0.2.0 failed every unit ('NoneType' object has no attribute
    'default_size': the template's PSF was not measured before injection)."""
    write_exposure(_decam_reference(real_data), tmp_path / "DEC-OBS18-mean.fits")
    entries = [{"visit": 400 + i, "detector": 6, "band": "i", "mjd": 58334.0 + 0.01 * i,
                "science": str(real_data / "decam" / f"DEC-OBS04{c}.mini.fits"), "template": "DEC-OBS18-mean.fits"}
               for i, c in enumerate("abc")]
    manifest = tmp_path / "dataset.yaml"
    manifest.write_text(yaml.safe_dump({"name": "decam", "entries": entries}))
    out = tmp_path / "run"
    assert main(["run", str(manifest), "-o", str(out), "--workers", "1", "--flavor", "convolveTemplate",
                 "--fakes"]) == 0
    for e in entries:
        where = out / "convolveTemplate" / "i" / str(e["visit"]) / "6"
        fakes = pd.read_parquet(where / "fakes.parquet")
        matched = pd.read_parquet(where / "fakes_matched.parquet")
        assert len(fakes) >= 20 and (fakes.target == "template").any()
        assert (matched.diaSourceId > 0).sum() >= 5
