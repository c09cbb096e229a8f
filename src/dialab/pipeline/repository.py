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
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..exposure import QUANTIZE_LEVEL, image_hdu, typical_noise, write_exposure
from ..imageops import cut_stamps

if TYPE_CHECKING:  # pandas is imported where tables are made: `dialab subtract` never needs it
    import pandas as pd


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
    from astropy.io import fits

    d = result.diagnostics
    header = result.difference.header
    header["DIAFLAV"] = (d.flavor, "dialab subtraction flavor")
    header["DIACONV"] = (d.convolved, "image convolved by the matching kernel")
    header["KERNBAS"] = (d.kernel_basis if result.kernel is not None else "none", "matching kernel basis")
    if d.kernel_basis == "delta":
        header["KERNREG"] = (float(d.regularization), "delta kernel penalty strength (relative)")
    if result.kernel is not None:
        header["KERNSPO"] = (int(d.kernel_spatial_order), "matching kernel's spatial (Chebyshev) order")
        header["DECONV"] = (bool(d.deconvolving), "the kernel narrows the convolved image's PSF somewhere")
    header["KERNSUM"] = (float(d.kernel_sum), "matching kernel sum (photometric scale)")
    header["KSUMSRC"] = (d.sum_source, "what set it: the free fit, or the stars' flux ratio")
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


#: Side of the stamps in ``cutouts.fits`` (pixels).
CUTOUT_SIZE = 51


def cutout_rows(catalog: pd.DataFrame, fakes: pd.DataFrame | None) -> pd.DataFrame:
    """One row per stamp: every diaSource (``fake`` = -1), then every fake (``diaSourceId`` = 0, ``fake`` = its
    row in the unit's fakes table), with the pixel position to centre on."""
    import pandas as pd

    rows = pd.DataFrame({"diaSourceId": catalog.diaSourceId.to_numpy(np.int64) if len(catalog) else np.zeros(0, np.int64),
                         "fake": np.full(len(catalog), -1, np.int32), "x": catalog.x.to_numpy(float) if len(catalog) else [],
                         "y": catalog.y.to_numpy(float) if len(catalog) else []})
    if fakes is not None and len(fakes):
        rows = pd.concat([rows, pd.DataFrame({"diaSourceId": 0, "fake": np.arange(len(fakes), dtype=np.int32),
                                              "x": fakes.x.to_numpy(float), "y": fakes.y.to_numpy(float)})],
                         ignore_index=True)
    return rows


CUTOUT_PLANES = ("TEMPLATE", "SCIENCE", "DIFFERENCE")


def write_cutouts(path: Path, difference, science, template, catalog: pd.DataFrame, fakes: pd.DataFrame | None,
                  compression: str = "quantized", quantize_level: float = QUANTIZE_LEVEL) -> None:
    """Template, science and difference stamps (``CUTOUT_SIZE`` square, NaN off the image) of every diaSource
    and fake: what a survey keeps of a difference to look at its candidates. HDUs ``SOURCES`` (diaSourceId,
    fake index, x, y) and the cubes ``TEMPLATE``, ``SCIENCE``, ``DIFFERENCE`` (one stamp per row)."""
    from astropy.io import fits

    rows = cutout_rows(catalog, fakes)
    hdus = [fits.PrimaryHDU(), fits.BinTableHDU.from_columns(
        [fits.Column(name="diaSourceId", format="K", array=rows.diaSourceId.to_numpy(np.int64)),
         fits.Column(name="fake", format="J", array=rows.fake.to_numpy(np.int32)),
         fits.Column(name="x", format="D", array=rows.x.to_numpy(float)),
         fits.Column(name="y", format="D", array=rows.y.to_numpy(float))], name="SOURCES")]
    for name, exp in zip(CUTOUT_PLANES, (template, science, difference)):
        stamps = cut_stamps(exp.image, rows.x, rows.y, CUTOUT_SIZE)
        hdus.append(image_hdu(stamps, None, name, compression, typical_noise(exp.variance) / quantize_level,
                              quantize_level))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def read_cutouts(path: Path) -> tuple[pd.DataFrame, dict]:
    """The stamp rows and the ``CUTOUT_PLANES`` cubes of a ``cutouts.fits``."""
    import pandas as pd
    from astropy.io import fits

    with fits.open(path) as hdul:
        table = hdul["SOURCES"].data
        rows = pd.DataFrame({name: table[name].astype(kind) for name, kind in
                             (("diaSourceId", "i8"), ("fake", "i4"), ("x", "f8"), ("y", "f8"))})
        return rows, {name: hdul[name].data for name in CUTOUT_PLANES}


#: What unit.json says of a difference deleted after storage (``output.keep: catalogs``).
DROPPED = "dropped after storage (output.keep: catalogs)"


def drop_difference(out: str | Path, unit: Unit) -> None:
    """Delete a stored unit's difference.fits and take it out of the unit's checksums (its cutouts stay)."""
    where = unit_dir(out, unit)
    record = json.loads((where / "unit.json").read_text())
    record["files"].pop("difference.fits", None)
    record["difference"] = DROPPED
    write_text(json.dumps(record, indent=1, default=float), where / "unit.json")
    (where / "difference.fits").unlink(missing_ok=True)


def difference_dropped(out: str | Path, unit: Unit) -> bool:
    try:
        return json.loads((unit_dir(out, unit) / "unit.json").read_text()).get("difference") == DROPPED
    except (OSError, ValueError):
        return False
