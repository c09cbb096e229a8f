"""Real/bogus reliability of diaSources: features of each detection and a shipped gradient-boosted model.

Every survey filters its difference-image detections with a classifier before anyone looks at them. The
features here are what a vetter looks at: the template / science / difference cutouts round the
detection (is the difference a PSF-like blob, a dipole, a sharp hit; is there a bright source in the
template or the science), and the measured columns (S/N, PSF-fit chi2, size against the PSF, flags, forced
fluxes). The model is a scikit-learn histogram gradient-boosting classifier exported to plain arrays (JSON),
so that scoring needs neither scikit-learn nor a pickle, and a calibration (isotonic, on held-out units)
that makes ``reliability`` a probability. :mod:`dialab.analysis.reliability_training` trains it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import BadInputError
from .imageops import cut_stamps
from .lazy import lazy_module

pd = lazy_module("pandas")

#: Side of the stamps the features look at (the vetting page's cutouts).
STAMP = 51
#: Flags given to the model as 0/1 features (those a catalog lacks count as 0).
FLAG_FEATURES = ("bad", "cr", "crCenter", "interpolated", "interpolatedCenter", "saturated", "saturatedCenter",
                 "edge", "suspect", "nodata", "offimage")
DEFAULT_MODEL = "reliability-v1.json"
#: The APDB's ``reliabilityVersion`` holds this many characters: a model's version is "r" and 6 hex digits of its hash.
VERSION_CHARS = 7


class ReliabilityConfig(BaseModel):
    """Real/bogus scoring of every diaSource in ``dialab run``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    model: str | None = Field(None, description="model file written by dialab train-reliability (default: the "
                                                "model shipped with dialab)")


def _ratio(a, b) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(a, float) / np.asarray(b, float)


def _column(catalog: pd.DataFrame, name: str) -> np.ndarray:
    return catalog[name].to_numpy(float) if name in catalog else np.full(len(catalog), np.nan)


def catalog_features(catalog: pd.DataFrame) -> dict[str, np.ndarray]:
    """Features from the measured columns: significance, sign, dipole, shape against the PSF, aperture against
    PSF flux, forced fluxes in the science and the template, flags."""
    flux = _column(catalog, "psfFlux")
    size = _column(catalog, "ixx") + _column(catalog, "iyy")
    size_psf = _column(catalog, "ixxPSF") + _column(catalog, "iyyPSF")
    e1 = _ratio(_column(catalog, "ixx") - _column(catalog, "iyy"), size)
    e2 = _ratio(2 * _column(catalog, "ixy"), size)
    out = {"abs_snr": np.abs(_column(catalog, "snr")), "negative": _column(catalog, "isNegative"),
           "dipole": _column(catalog, "isDipole"), "size_ratio": _ratio(size, size_psf), "ellipticity": np.hypot(e1, e2),
           "ap_to_psf": _ratio(_column(catalog, "apFlux"), flux),
           "science_snr": _ratio(_column(catalog, "scienceFlux"), _column(catalog, "scienceFluxErr")),
           "template_snr": _ratio(_column(catalog, "templateFlux"), _column(catalog, "templateFluxErr")),
           "template_to_difference": _ratio(np.abs(_column(catalog, "templateFlux")), np.abs(flux)),
           "science_to_difference": _ratio(_column(catalog, "scienceFlux"), flux)}
    for flag in FLAG_FEATURES:
        column = f"pixelFlags_{flag}"
        out[f"flag_{flag}"] = catalog[column].fillna(False).to_numpy(float) if column in catalog \
            else np.zeros(len(catalog))
    return out


def _outer_sigma(stamps: np.ndarray, radius: float = 15.0) -> np.ndarray:
    """Robust noise of each stamp from the pixels beyond ``radius`` of the centre."""
    h = stamps.shape[-1] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    ring = stamps[:, np.hypot(xx, yy) > radius]
    med = np.nanmedian(ring, axis=1, keepdims=True)
    return np.maximum(1.4826 * np.nanmedian(np.abs(ring - med), axis=1), 1e-30)


def stamp_features(triplets: np.ndarray, sign: np.ndarray) -> dict[str, np.ndarray]:
    """Features of (n, 3, 51, 51) template / science / difference stamps, the difference turned positive by
    ``sign`` (that of the diaSource's flux): how compact, centred and one-signed the difference is, how much
    of it is antisymmetric (a dipole), how much structure surrounds it, how bright the template and the
    science are under it."""
    n = len(triplets)
    if n == 0:
        return {name: np.zeros(0) for name in STAMP_FEATURES}
    h = STAMP // 2
    template, science, difference = (triplets[:, k] for k in range(3))
    d = difference * np.asarray(sign, float)[:, None, None] / _outer_sigma(difference)[:, None, None]
    core = np.nan_to_num(d[:, h - 3 : h + 4, h - 3 : h + 4])
    box = np.nan_to_num(d[:, h - 5 : h + 6, h - 5 : h + 6])
    rotated = box[:, ::-1, ::-1]
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    outer = np.hypot(xx, yy) > 8
    peak = np.argmax(core.reshape(n, -1), axis=1)
    t_core = template[:, h - 2 : h + 3, h - 2 : h + 3]
    s_core = science[:, h - 2 : h + 3, h - 2 : h + 3]
    t_sigma, s_sigma = _outer_sigma(template), _outer_sigma(science)
    t_med = np.nanmedian(template.reshape(n, -1), axis=1)
    s_med = np.nanmedian(science.reshape(n, -1), axis=1)
    return {
        "core_snr": core.sum(axis=(1, 2)) / 7.0,
        "core_negative_fraction": _ratio(np.clip(-core, 0, None).sum(axis=(1, 2)), np.abs(core).sum(axis=(1, 2))),
        "antisymmetry": _ratio(np.abs(box - rotated).sum(axis=(1, 2)), np.abs(box + rotated).sum(axis=(1, 2))),
        "peak_offset": np.hypot(peak // 7 - 3, peak % 7 - 3),
        "peak_sharpness": _ratio(core.max(axis=(1, 2)), np.clip(core, 0, None).sum(axis=(1, 2))),
        "outer_hot_fraction": (np.abs(np.nan_to_num(d[:, outer])) > 5).mean(axis=1),
        "outer_negative_min": np.nanmin(np.where(outer, d, np.nan).reshape(n, -1), axis=1),
        "template_core_snr": _ratio(np.nansum(t_core - t_med[:, None, None], axis=(1, 2)), 5.0 * t_sigma),
        "science_core_snr": _ratio(np.nansum(s_core - s_med[:, None, None], axis=(1, 2)), 5.0 * s_sigma),
        "template_peak_snr": _ratio(np.nanmax(t_core.reshape(n, -1), axis=1) - t_med, t_sigma),
        "off_image_fraction": np.isnan(difference).mean(axis=(1, 2)),
        "noise_correlation": _neighbour_correlation(np.where(outer, d, np.nan)),
    }


def _neighbour_correlation(d: np.ndarray) -> np.ndarray:
    """Correlation of horizontally adjacent pixels: ~0 for a decorrelated difference, high for a score image."""
    a, b = d[:, :, :-1], d[:, :, 1:]
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(ok, a, 0.0), np.where(ok, b, 0.0)
    n = np.maximum(ok.sum(axis=(1, 2)), 1)
    ma, mb = a.sum(axis=(1, 2)) / n, b.sum(axis=(1, 2)) / n
    cov = (a * b).sum(axis=(1, 2)) / n - ma * mb
    return _ratio(cov, np.sqrt(((a * a).sum(axis=(1, 2)) / n - ma**2) * ((b * b).sum(axis=(1, 2)) / n - mb**2)))


STAMP_FEATURES = ("core_snr", "core_negative_fraction", "antisymmetry", "peak_offset", "peak_sharpness",
                  "outer_hot_fraction", "outer_negative_min", "template_core_snr", "science_core_snr",
                  "template_peak_snr", "off_image_fraction", "noise_correlation")


def features(catalog: pd.DataFrame, triplets: np.ndarray) -> pd.DataFrame:
    """The model's inputs, one row per diaSource (``triplets`` in the catalog's order)."""
    sign = np.where(_column(catalog, "psfFlux") < 0, -1.0, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN stamps (off the image) give NaN features
        return pd.DataFrame({**catalog_features(catalog), **stamp_features(triplets, sign)}, index=catalog.index)


def triplets_of(catalog: pd.DataFrame, template, science, difference) -> np.ndarray:
    """(n, 3, 51, 51) stamps of the three images round each diaSource (NaN off the image)."""
    x, y = catalog.x.to_numpy(float), catalog.y.to_numpy(float)
    return np.stack([cut_stamps(exp.image, x, y, STAMP) for exp in (template, science, difference)], axis=1) \
        if len(catalog) else np.zeros((0, 3, STAMP, STAMP), np.float32)


@dataclass
class ReliabilityModel:
    """Gradient-boosted trees as arrays, and an isotonic calibration of their probability."""

    version: str
    feature_names: list[str]
    baseline: float
    trees: list[dict[str, np.ndarray]]
    calibration_x: np.ndarray
    calibration_y: np.ndarray
    provenance: dict

    def raw_score(self, table: pd.DataFrame) -> np.ndarray:
        """The trees' summed log-odds (what scikit-learn's ``decision_function`` gives)."""
        x = table[self.feature_names].to_numpy(float)
        total = np.full(len(x), self.baseline)
        rows = np.arange(len(x))
        for tree in self.trees:
            node = np.zeros(len(x), int)
            active = ~tree["is_leaf"][node]
            while active.any():
                at = node[active]
                value = x[rows[active], tree["feature"][at]]
                left = np.where(np.isnan(value), tree["missing_left"][at], value <= tree["threshold"][at])
                node[active] = np.where(left, tree["left"][at], tree["right"][at])
                active = ~tree["is_leaf"][node]
            total += tree["value"][node]
        return total

    def probability(self, table: pd.DataFrame) -> np.ndarray:
        uncalibrated = 1.0 / (1.0 + np.exp(-self.raw_score(table)))
        return np.interp(uncalibrated, self.calibration_x, self.calibration_y)

    def to_json(self, with_provenance: bool = True) -> str:
        return json.dumps({"version": self.version, "feature_names": self.feature_names, "baseline": self.baseline,
                           "trees": [{k: v.tolist() for k, v in t.items()} for t in self.trees],
                           "calibration": {"x": self.calibration_x.tolist(), "y": self.calibration_y.tolist()},
                           **({"provenance": self.provenance} if with_provenance else {})})

    @classmethod
    def from_json(cls, text: str, source: object = "model") -> ReliabilityModel:
        try:
            data = json.loads(text)
            kinds = {"feature": int, "threshold": float, "missing_left": bool, "left": int, "right": int,
                     "is_leaf": bool, "value": float}
            trees = [{k: np.asarray(t[k], kinds[k]) for k in kinds} for t in data["trees"]]
            if not 0 < len(str(data["version"])) <= VERSION_CHARS:
                raise ValueError(f"version {data['version']!r} must have 1 to {VERSION_CHARS} characters")
            return cls(data["version"], list(data["feature_names"]), float(data["baseline"]), trees,
                       np.asarray(data["calibration"]["x"], float), np.asarray(data["calibration"]["y"], float),
                       dict(data.get("provenance", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"not a dialab reliability model ({type(exc).__name__}: {exc})", source) from None


def load_model(path: str | Path | None = None) -> ReliabilityModel:
    """A model file written by ``dialab train-reliability``, or the one shipped with dialab."""
    if path is None:
        return ReliabilityModel.from_json(files("dialab").joinpath("data", DEFAULT_MODEL).read_text(), DEFAULT_MODEL)
    try:
        return ReliabilityModel.from_json(Path(path).read_text(), path)
    except OSError as exc:
        raise BadInputError(f"cannot read the reliability model ({exc.strerror})", path) from None


@lru_cache(maxsize=4)
def cached_model(path: str | None) -> ReliabilityModel:
    """:func:`load_model`, once per process and file."""
    return load_model(path)


def score(catalog: pd.DataFrame, template, science, difference, model: ReliabilityModel) -> pd.DataFrame:
    """The catalog with ``reliability`` (probability that the detection is a real change) and
    ``reliabilityVersion`` filled."""
    out = catalog.copy()
    if len(out):
        out["reliability"] = model.probability(features(out, triplets_of(out, template, science, difference)))
    else:
        out["reliability"] = pd.Series(dtype=float)
    out["reliabilityVersion"] = model.version
    return out
