"""Detection on real differences: the properimage null pair and the `detect` CLI."""

import numpy as np
import pandas as pd

from dialab.cli import main
from dialab.exposure import read_exposure, write_exposure
from dialab.measurement import BAD_FLAGS, detect_and_measure
from dialab.subtraction import subtract
from dialab.warp import align_to


def test_properimage_null_pair_false_detections_per_megapixel(real_data):
    """Two frames 74 s apart: nothing changes, so every detection is an artifact (reported)."""
    d = real_data / "properimage"
    science = read_exposure(d / "aligned_eso085-030-005.fit")
    template = read_exposure(d / "aligned_eso085-030-004.fit")
    res = subtract(science, align_to(template, science))
    cat, _, _ = detect_and_measure(res, science, res.matched_image)
    mpix = science.image.size / 1e6
    good = cat[~cat[list(BAD_FLAGS)].any(axis=1)] if len(cat) else cat
    clean = good[~good.pixelFlags_cr]
    print(f"properimage null test: {len(cat) / mpix:.1f} detections/Mpix before the flag cut, "
          f"{len(good) / mpix:.1f} after, {len(clean) / mpix:.1f} after also cutting pixelFlags_cr "
          f"({len(cat)}, {len(good)}, {len(clean)} on {mpix:.2f} Mpix); noise ratio {res.diagnostics.noise_ratio:.3f}")
    assert 0.9 < res.diagnostics.noise_ratio < 1.1
    # The issue asks for the numbers (printed above); this only guards against a gross regression.
    # What is left after the cuts sits around the brightest, saturated stars.
    assert len(clean) / mpix < 30


def test_detect_cli_writes_apdb_named_parquet(real_data, tmp_path, capsys):
    d = real_data / "decam"
    science = read_exposure(d / "DEC-OBS04a.mini.fits")
    template = read_exposure(d / "DEC-OBS18c.mini.fits")
    diff = tmp_path / "diff.fits"
    write_exposure(subtract(science, align_to(template, science)).difference, diff)
    out = tmp_path / "src.parquet"
    assert main(["detect", str(diff), "-o", str(out), "--threshold", "5"]) == 0
    assert "diaSources" in capsys.readouterr().out
    cat = pd.read_parquet(out)
    for col in ("diaSourceId", "ra", "dec", "x", "y", "psfFlux", "psfFluxErr", "apFlux", "snr", "isNegative",
                "isDipole", *BAD_FLAGS, "pixelFlags_cr", "bboxSize", "centroid_flag", "psfFlux_flag"):
        assert col in cat.columns, col
    assert cat.diaSourceId.is_unique
    assert np.isfinite(cat.ra).all()
