"""APDB storage speed: one visit of 6 detectors x 300 diaSources into SQLite (association included).

Run: python bench/apdb.py   (prints seconds per visit, the first visit and a later one that associates)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dialab.apdb import create_apdb, open_apdb
from dialab.association import AssociateConfig, store_visit_detector
from dialab.exposure import Exposure
from dialab.psf import GaussianPsf
from dialab.simulate.observe import tan_wcs

SHAPE = (4176, 2048)


def unit(visit: int, detector: int, rng: np.random.Generator) -> tuple[pd.DataFrame, Exposure]:
    wcs = tan_wcs(SHAPE, 0.168, 150.1 + 0.1 * (detector % 2), 2.2 + 0.2 * (detector // 2))
    exp = Exposure(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.int32), np.ones(SHAPE, np.float32),
                   psf=GaussianPsf(sigma_pix=2.0), wcs=wcs, visit=visit, detector=detector, band="r",
                   mjd=60000.0 + visit, magzero=31.0)
    n = 300
    x, y = rng.uniform(20, SHAPE[1] - 20, n), rng.uniform(20, SHAPE[0] - 20, n)
    ra, dec = wcs.all_pix2world(np.column_stack([x, y]), 0).T
    cat = pd.DataFrame({"diaSourceId": (visit * 1000 + detector) * 100_000 + np.arange(1, n + 1), "visit": visit,
                        "detector": detector, "band": "r", "midpointMjdTai": exp.mjd, "ra": ra, "dec": dec, "x": x,
                        "y": y, "psfFlux": rng.normal(500, 50, n), "psfFluxErr": np.full(n, 50.0),
                        "pixelFlags_bad": False, "isNegative": False, "isDipole": False, "bboxSize": 11})
    return cat, exp


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        handle = open_apdb(create_apdb(Path(tmp) / "apdb.sqlite3", Path(tmp) / "apdb.yaml"))
        for visit in (1, 2):
            units = [unit(visit, d, np.random.default_rng(d)) for d in range(6)]
            t0 = time.perf_counter()
            for cat, exp in units:
                store_visit_detector(handle, cat, exp, config=AssociateConfig(forced_photometry=False))
            seconds = time.perf_counter() - t0
            print(f"visit {visit}: 6 detectors x 300 diaSources stored in {seconds:.2f} s (SQLite, association "
                  f"{'against the first visit' if visit > 1 else 'into an empty APDB'}, no forced photometry)")


if __name__ == "__main__":
    main()
