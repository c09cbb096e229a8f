"""The output repository: where each unit's files live, atomic writes, and what counts as done.

``<out>/<flavor>/<band>/<visit>/<detector>/`` holds ``difference.fits``, ``diaSources.parquet``,
``fakes.parquet`` and ``fakes_matched.parquet`` (with injection), and ``unit.json`` written last:
a unit is done exactly when its ``unit.json`` exists. ``<out>/<flavor>/apdb.yaml`` points at the
flavor's APDB; ``<out>/run.yaml`` holds the frozen config and provenance; ``failures.csv`` the
units that failed, with their reasons.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .. import __version__
from ..exposure import write_exposure


@dataclass(frozen=True)
class Unit:
    """One unit of work: a (visit, detector) entry of the manifest, subtracted with one flavor."""

    flavor: str
    band: str
    visit: int
    detector: int
    mjd: float

    @property
    def label(self) -> str:
        return f"{self.flavor}/{self.band}/{self.visit}/{self.detector}"


def unit_dir(out: str | Path, unit: Unit) -> Path:
    return Path(out) / unit.flavor / unit.band / str(unit.visit) / str(unit.detector)


def flavor_dir(out: str | Path, flavor: str) -> Path:
    return Path(out) / flavor


def is_done(out: str | Path, unit: Unit) -> bool:
    return (unit_dir(out, unit) / "unit.json").is_file()


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_done(out: str | Path, unit: Unit, summary: dict) -> None:
    write_text(json.dumps({**asdict(unit), **summary}, indent=1, default=float), unit_dir(out, unit) / "unit.json")


def write_difference(result, path: str | Path) -> None:
    """The difference Exposure plus the kernel image (``KERNEL``) and, for preconvolution, ``SCORE``; its
    primary header records how it was made (flavor, convolved image, kernel sum, noise ratio, dialab version)."""
    import numpy as np
    from astropy.io import fits

    d = result.diagnostics
    header = result.difference.header
    header["DIAFLAV"] = (d.flavor, "dialab subtraction flavor")
    header["DIACONV"] = (d.convolved, "image convolved by the matching kernel")
    header["KERNSUM"] = (float(d.kernel_sum), "matching kernel sum (photometric scale)")
    header["NOISERAT"] = (float(d.noise_ratio), "measured / propagated noise of the difference")
    header["DIALABV"] = (__version__, "dialab version")
    extra = [fits.ImageHDU(result.kernel.center_image.astype(np.float32), name="KERNEL")]
    if result.score is not None:
        extra.append(fits.ImageHDU(result.score.image, name="SCORE"))
    write_exposure(result.difference, path, extra_hdus=extra)
