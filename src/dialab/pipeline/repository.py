"""The output repository: where each unit's files live, atomic writes, and what counts as done.

``<out>/<flavor>/<band>/<visit>/<detector>/`` holds ``difference.fits``, ``diaSources.parquet``,
``fakes.parquet`` and ``fakes_matched.parquet`` (with injection), and ``unit.json`` written last:
a unit is done exactly when its ``unit.json`` exists. ``<out>/<flavor>/apdb.yaml`` points at the
flavor's APDB; ``<out>/run.yaml`` holds the frozen config and provenance; ``failures.csv`` the
units that failed, with their reasons.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .. import __version__
from ..exposure import QUANTIZE_LEVEL, image_hdu, typical_noise, write_exposure


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


#: Files of a unit folder that describe it rather than belong to its result.
_BOOKKEEPING = ("unit.json", "failed.json", "error.log")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_done(out: str | Path, unit: Unit, summary: dict) -> None:
    """Write ``unit.json`` last, with a checksum of every result file (verified when a run resumes)."""
    where = unit_dir(out, unit)
    files = {p.name: _sha256(p) for p in sorted(where.iterdir())
             if p.is_file() and p.name not in _BOOKKEEPING and not p.name.endswith(".tmp")}
    (where / "failed.json").unlink(missing_ok=True)
    write_text(json.dumps({**asdict(unit), **summary, "files": files}, indent=1, default=float), where / "unit.json")


def verify_unit(out: str | Path, unit: Unit) -> str | None:
    """None when a done unit's files are all there and unchanged, else what is wrong (the unit is then redone)."""
    where = unit_dir(out, unit)
    try:
        files = json.loads((where / "unit.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unit.json unreadable"
    for name, digest in files.items():
        path = where / name
        if not path.is_file():
            return f"{name} missing"
        if _sha256(path) != digest:
            return f"{name} changed or corrupt"
    return None


def undo(out: str | Path, unit: Unit) -> None:
    """Forget a unit's result, so that it is run again."""
    (unit_dir(out, unit) / "unit.json").unlink(missing_ok=True)


def mark_failed(out: str | Path, unit: Unit, reason: str) -> None:
    """Record a final failure (``--skip-failed``): association goes on past the unit."""
    write_text(json.dumps({**asdict(unit), "status": "failed", "reason": reason}, indent=1),
               unit_dir(out, unit) / "failed.json")


def failure_reason(out: str | Path, unit: Unit) -> str | None:
    """The reason of a unit's recorded final failure, or None."""
    try:
        return json.loads((unit_dir(out, unit) / "failed.json").read_text())["reason"]
    except (OSError, ValueError, KeyError):
        return None


def write_difference(result, path: str | Path, compression: str = "none", quantize_level: float = QUANTIZE_LEVEL
                     ) -> None:
    """The difference Exposure plus the kernel image (``KERNEL``, A&L flavors) and ``SCORE`` (preconvolution: the
    score image; zogy: S_corr); its primary header records how it was made (flavor, convolved image, kernel sum
    or flux ratio, noise ratio, dialab version). ``compression``: one of ``exposure.COMPRESSIONS``."""
    import numpy as np
    from astropy.io import fits

    d = result.diagnostics
    header = result.difference.header
    header["DIAFLAV"] = (d.flavor, "dialab subtraction flavor")
    header["DIACONV"] = (d.convolved, "image convolved by the matching kernel")
    header["KERNSUM"] = (float(d.kernel_sum), "matching kernel sum (photometric scale)")
    header["NOISERAT"] = (float(d.noise_ratio), "measured / propagated noise of the difference")
    header["DIALABV"] = (__version__, "dialab version")
    extra = [] if result.kernel is None else [fits.ImageHDU(result.kernel.center_image.astype(np.float32),
                                                             name="KERNEL")]
    if result.score is not None and result.score is not result.difference:
        s_corr = result.score.image / np.sqrt(np.maximum(result.score.variance, 1e-30))
        extra.append(image_hdu(s_corr.astype(np.float32), None, "SCORE", compression, 1.0 / quantize_level,
                               quantize_level))
    elif result.score is not None:
        extra.append(image_hdu(result.score.image, None, "SCORE", compression,
                               typical_noise(result.score.variance) / quantize_level, quantize_level))
    write_exposure(result.difference, path, extra_hdus=extra, compression=compression, quantize_level=quantize_level)
