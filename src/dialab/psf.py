"""PSF models and their sizes.

A PSF here is the *effective* PSF: the profile sampled at pixel centres already includes the
pixel response, so a ``GaussianPsf(sigma)`` stamp is exp(-r^2 / 2 sigma^2) evaluated at pixel
centres. Gaussians then convolve exactly in quadrature, which the kernel tests rely on.
Every model returns odd-sized stamps with sum 1 centred on the central pixel.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from scipy import ndimage

from .background import sky_background, sky_subtracted
from .errors import BadInputError, PsfMeasurementError
from .imageops import Chebyshev2D, stamp_index
from .moments import adaptive_moments
from .stars import ArrayColumns, peak_positions, psf_filter_sigma, select_psf_stars, stellar_locus

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def odd_size(n: float, minimum: int = 11, maximum: int = 101) -> int:
    """Round up to an odd integer within [minimum, maximum]."""
    n = int(math.ceil(n))
    n = max(minimum, min(maximum, n))
    return n if n % 2 == 1 else n + 1


def stamp_fwhm(stamp: np.ndarray, oversample: int = 8) -> float:
    """FWHM (pixels) of a stamp from the area above half maximum, on a spline-upsampled stamp.

    For an elliptical profile this is the geometric mean of the two axes' FWHM.
    """
    n = stamp.shape[0]
    c = (np.arange(n * oversample) + 0.5) / oversample - 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    fine = ndimage.map_coordinates(stamp.astype(float), [yy, xx], order=3, mode="constant")
    half = 0.5 * fine.max()
    area = np.count_nonzero(fine >= half) / oversample**2
    return 2.0 * math.sqrt(area / math.pi)


def stamp_sigma(stamp: np.ndarray) -> float:
    """Adaptive second-moment sigma (pixels) of a centred stamp."""
    c = (stamp.shape[0] - 1) / 2
    guess = max(stamp_fwhm(stamp) / FWHM_PER_SIGMA, 0.5)
    return adaptive_moments(stamp, c, c, guess, upsample_on_failure=True).sigma


def _centre_distances(stamp: np.ndarray) -> np.ndarray:
    """Each pixel centre's distance from the stamp's central pixel."""
    h = stamp.shape[0] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    return np.hypot(xx, yy)


def encircled_fraction(stamp: np.ndarray, radius: float) -> float:
    """Fraction of a PSF stamp's flux whose pixel centres lie within ``radius`` of its centre."""
    return float(stamp[_centre_distances(stamp) <= radius].sum() / stamp.sum())


def light_radius(stamp: np.ndarray, fraction: float = 0.9) -> float:
    """The smallest radius at which ``encircled_fraction`` reaches ``fraction``: how far a profile with bright
    structured wings (Airy rings, diffraction spikes) reaches, which its sigma does not say."""
    r = _centre_distances(stamp).ravel()
    order = np.argsort(r, kind="stable")
    light = np.cumsum(np.asarray(stamp, float).ravel()[order])
    return float(r[order][min(np.searchsorted(light, fraction * light[-1]), len(r) - 1)])


@dataclass(frozen=True)
class ApertureCorrection:
    """Aperture / PSF-model flux of point sources as a plane over the image, held at its value at the edge of the
    stars' extent beyond it: ``value + gx (x - x0) + gy (y - y0)``. A model that misses the PSF's variation
    across the CCD (or gets it a few per cent wrong, as one measured from few stars does) calibrates fluxes by
    different amounts across it; LSST fits its aperture corrections as fields for the same reason."""

    value: float
    x0: float = 0.0
    y0: float = 0.0
    gx: float = 0.0
    gy: float = 0.0
    half_x: float = 0.0  # the stars' half-extent: beyond it the plane is held
    half_y: float = 0.0
    error: float = float("nan")
    n_stars: int = 0
    source: str = "stars"  # "stars": their ratio; "model": a given model's own, confirmed by n_stars stars

    def __call__(self, x, y) -> np.ndarray:
        dx = np.clip(np.asarray(x, float) - self.x0, -self.half_x, self.half_x)
        dy = np.clip(np.asarray(y, float) - self.y0, -self.half_y, self.half_y)
        return self.value + self.gx * dx + self.gy * dy

    def header_cards(self) -> dict:
        """FITS cards (8-character keys) that ``from_header`` reads back."""
        return {"APCORR": self.value, "APCORRX0": self.x0, "APCORRY0": self.y0, "APCORRGX": self.gx,
                "APCORRGY": self.gy, "APCORRHX": self.half_x, "APCORRHY": self.half_y, "APCORRN": self.n_stars,
                "APCORSRC": self.source}

    @classmethod
    def from_header(cls, header) -> ApertureCorrection | None:
        if "APCORR" not in header:
            return None
        get = lambda k: float(header.get(k, 0.0))  # noqa: E731
        return cls(get("APCORR"), get("APCORRX0"), get("APCORRY0"), get("APCORRGX"), get("APCORRGY"),
                   get("APCORRHX"), get("APCORRHY"), n_stars=int(header.get("APCORRN", 0)),
                   source=str(header.get("APCORSRC", "stars")))


class Psf(ABC):
    """A point-spread function; position arguments are image pixels (0-based)."""

    #: Measured from the image's stars (``measure_psf``), not given: its stamp misses the light beyond it, and its
    #: outer wings hold what is left of the neighbours' light, so its fluxes need an aperture correction.
    from_stars: bool = False
    #: Aperture / PSF-model flux of the image's bright stars (``photometry.aperture_correction``); None until
    #: measured. PSF fluxes are multiplied by it and fakes drawn with the model divided by it.
    aperture_correction: ApertureCorrection | None = None

    def flux_correction(self, x, y) -> np.ndarray:
        """The aperture correction at image positions (1 where none was measured)."""
        if self.aperture_correction is None:
            return np.ones(np.broadcast(np.asarray(x), np.asarray(y)).shape)
        return self.aperture_correction(x, y)

    @property
    def aperture_correction_value(self) -> float | None:
        """The correction's value at the stars' centre (None when none was measured), for catalogs and unit.json."""
        return None if self.aperture_correction is None else self.aperture_correction.value

    @property
    def aperture_correction_source(self) -> str | None:
        """Where the correction came from ("model": a given model's own; "stars": their ratio), for unit.json."""
        return None if self.aperture_correction is None else self.aperture_correction.source

    def with_aperture_correction(self, value: ApertureCorrection | float | None) -> Psf:
        """This model with another aperture correction (a copy: a model may be shared by several images)."""
        if value is not None and not isinstance(value, ApertureCorrection):
            value = ApertureCorrection(float(value))
        out = copy.copy(self)
        object.__setattr__(out, "aperture_correction", value)  # frozen models too
        return out

    @abstractmethod
    def stamp(self, size: int | None = None, x: float | None = None, y: float | None = None) -> np.ndarray:
        """Centred stamp of odd ``size`` with sum 1 (for a varying PSF, at image position x, y)."""

    def draw(self, dx: float, dy: float, size: int | None = None, x: float | None = None,
             y: float | None = None) -> np.ndarray:
        """Stamp with the PSF centre offset by (dx, dy) pixels from the central pixel.

        Normalised like the centred stamp, so a PSF fit at any sub-pixel offset gives the flux.
        """
        base = self.stamp(size, x, y)
        if dx == 0 and dy == 0:
            return base
        shifted = ndimage.shift(base, (dy, dx), order=3, mode="constant")
        total = shifted.sum()
        return shifted / total if total > 0 else shifted

    def stamps_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, s, s) centred unit-sum stamps of the default size at image positions."""
        return np.array([self.stamp(None, xi, yi) for xi, yi in zip(x, y)]).reshape(-1, *(self.default_size,) * 2)

    def draw_many(self, dx: np.ndarray, dy: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``draw(dx[i], dy[i], None, x[i], y[i])`` for every i, (n, s, s), in a few array operations: forced
        photometry draws the PSF at every diaObject of every image."""
        return shift_stamps(self.stamps_at(x, y), np.asarray(dx, float), np.asarray(dy, float))

    def at(self, x: float, y: float) -> Psf:
        """The PSF at one image position, as a non-varying model."""
        return self

    @property
    @abstractmethod
    def default_size(self) -> int:
        """Odd stamp size (pixels) that holds the profile to a fraction of a percent."""

    # Sizes (at the centre, for a varying PSF) are computed once: measurement asks for them per source.
    @cached_property
    def sigma(self) -> float:
        """Adaptive second-moment sigma, pixels."""
        return stamp_sigma(self.stamp())

    @cached_property
    def fwhm(self) -> float:
        """Full width at half maximum, pixels."""
        return stamp_fwhm(self.stamp())

    @cached_property
    def nea(self) -> float:
        """Noise-equivalent area 1 / sum(p^2), pixels^2."""
        p = self.stamp()
        return float(1.0 / np.sum(p.astype(float) ** 2))


def shift_stamps(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Each stamp moved by its (dx, dy) as :meth:`Psf.draw` moves one (cubic spline, zero outside, renormalised;
    unmoved stamps returned as they are). The shift is separable, M(dy) @ stamp @ M(dx)^T, and the 1-d operator
    M(s) is a cubic polynomial in s between integers, so it is interpolated exactly from four samples."""
    n = stamps.shape[-1]
    out = _shift_operators(n, dy) @ stamps @ _shift_operators(n, dx).transpose(0, 2, 1)
    total = out.sum(axis=(1, 2))
    moved = (dx != 0) | (dy != 0)
    out[moved] /= np.where(total[moved] > 0, total[moved], 1.0)[:, None, None]
    out[~moved] = stamps[~moved]
    return out


def shifted_centres(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """The central pixel of each stamp as ``shift_stamps`` would move and renormalise it, from the operators'
    central rows and column sums alone: a score image's flux needs only the PSF's peak, not its whole stamp."""
    n = stamps.shape[-1]
    my, mx = _shift_operators(n, dy), _shift_operators(n, dx)
    centre = np.einsum("ki,kij,kj->k", my[:, n // 2], stamps, mx[:, n // 2])
    total = np.einsum("ki,kij,kj->k", my.sum(axis=1), stamps, mx.sum(axis=1))
    moved = (dx != 0) | (dy != 0)
    return np.where(moved & (total > 0), centre / np.where(total > 0, total, 1.0), stamps[:, n // 2, n // 2])


#: Shifts at which the 1-d spline shift operator is sampled on each side of zero (one polynomial piece each).
_SHIFT_NODES = np.array([0.2, 0.4, 0.6, 0.8])


@cache
def _shift_samples(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The operators M(s) of ``ndimage.shift`` (order 3, zero outside) at +-``_SHIFT_NODES``, each (4, n, n)."""
    def sample(sign):
        return np.array([ndimage.shift(np.eye(n), (sign * s, 0), order=3, mode="constant") for s in _SHIFT_NODES])
    return sample(1.0), sample(-1.0)


def _shift_operators(n: int, shifts: np.ndarray) -> np.ndarray:
    """M(s) for every shift, (len(shifts), n, n): Lagrange interpolation through the samples on its side of zero
    (exact for |s| < 1), the identity at 0, and ``ndimage.shift`` itself for larger shifts."""
    positive, negative = _shift_samples(n)
    a = np.abs(shifts)
    weights = np.ones((len(shifts), len(_SHIFT_NODES)))
    for i, node in enumerate(_SHIFT_NODES):
        for j, other in enumerate(_SHIFT_NODES):
            if i != j:
                weights[:, i] *= (a - other) / (node - other)
    out = np.einsum("kq,qij->kij", weights * (shifts > 0)[:, None], positive) \
        + np.einsum("kq,qij->kij", weights * (shifts < 0)[:, None], negative)
    out[shifts == 0] = np.eye(n)
    for k in np.flatnonzero(a >= 1):
        out[k] = ndimage.shift(np.eye(n), (shifts[k], 0), order=3, mode="constant")
    return out


def _shear_inverse(g1: float, g2: float) -> np.ndarray:
    """Inverse of the area-preserving shear matrix for reduced shear (g1, g2)."""
    g2sum = g1 * g1 + g2 * g2
    if g2sum >= 1:
        raise BadInputError(f"PSF shear |g| = {math.sqrt(g2sum):.3f} must be below 1")
    a = np.array([[1 + g1, g2], [g2, 1 - g1]]) / math.sqrt(1 - g2sum)
    return np.linalg.inv(a)


@dataclass(frozen=True)
class AnalyticPsf(Psf):
    """A circular profile, optionally sheared by (g1, g2), evaluated at pixel centres."""

    g1: float = 0.0
    g2: float = 0.0

    @abstractmethod
    def _radial(self, r2: np.ndarray) -> np.ndarray:
        """Unnormalised profile as a function of squared radius."""

    def _evaluate(self, dx: float, dy: float, size: int) -> np.ndarray:
        h = size // 2
        yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
        xx -= dx
        yy -= dy
        if self.g1 or self.g2:
            inv = _shear_inverse(self.g1, self.g2)
            xx, yy = inv[0, 0] * xx + inv[0, 1] * yy, inv[1, 0] * xx + inv[1, 1] * yy
        return self._radial(xx * xx + yy * yy)

    def stamp(self, size=None, x=None, y=None):
        size = self.default_size if size is None else _check_odd(size)
        p = self._evaluate(0.0, 0.0, size)
        return p / p.sum()

    def draw(self, dx, dy, size=None, x=None, y=None):
        size = self.default_size if size is None else _check_odd(size)
        return self._evaluate(dx, dy, size) / self._evaluate(0.0, 0.0, size).sum()

    def draw_many(self, dx, dy, x, y):
        return np.array([self.draw(a, b) for a, b in zip(dx, dy)]).reshape(-1, *(self.default_size,) * 2)


@dataclass(frozen=True)
class GaussianPsf(AnalyticPsf):
    """Gaussian of standard deviation ``sigma_pix`` (effective PSF, pixel response included)."""

    sigma_pix: float = 2.0

    def __post_init__(self):
        if not self.sigma_pix > 0:
            raise BadInputError(f"Gaussian PSF sigma must be positive, got {self.sigma_pix}")

    def _radial(self, r2):
        return np.exp(-0.5 * r2 / self.sigma_pix**2)

    @property
    def default_size(self) -> int:
        return odd_size(2 * math.ceil(4.5 * self.sigma_pix) + 1)

    @property
    def sigma(self) -> float:
        return self.sigma_pix

    @property
    def fwhm(self) -> float:
        return FWHM_PER_SIGMA * self.sigma_pix


@dataclass(frozen=True)
class MoffatPsf(AnalyticPsf):
    """Moffat profile (1 + r^2/alpha^2)^-beta given by its FWHM (pixels) and beta."""

    fwhm_pix: float = 4.0
    beta: float = 3.0

    def __post_init__(self):
        if not (self.fwhm_pix > 0 and self.beta > 1):
            raise BadInputError(f"Moffat PSF needs fwhm > 0 and beta > 1, got {self.fwhm_pix}, {self.beta}")

    @property
    def alpha(self) -> float:
        """Scale radius alpha = FWHM / (2 sqrt(2^(1/beta) - 1)), pixels."""
        return self.fwhm_pix / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def _radial(self, r2):
        return (1.0 + r2 / self.alpha**2) ** (-self.beta)

    @property
    def default_size(self) -> int:
        # Radius holding all but ~0.5% of the flux: (1 + r^2/alpha^2)^(1-beta) = 0.005.
        r = self.alpha * math.sqrt(0.005 ** (1.0 / (1.0 - self.beta)) - 1.0)
        return odd_size(2 * r + 1, maximum=201)

    @property
    def fwhm(self) -> float:
        return self.fwhm_pix


def _check_odd(size: int) -> int:
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise BadInputError(f"PSF stamp size must be a positive odd number, got {size}")
    return size


def resize_stamp(stamp: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a centred odd stamp (or a stack of them, (..., n, n)) to ``size``."""
    n = stamp.shape[-1]
    if size == n:
        return stamp
    if size < n:
        o = (n - size) // 2
        return stamp[..., o : o + size, o : o + size]
    out = np.zeros((*stamp.shape[:-2], size, size), dtype=stamp.dtype)
    o = (size - n) // 2
    out[..., o : o + n, o : o + n] = stamp
    return out


def validate_stamp(stamp: np.ndarray, source: object = None) -> np.ndarray:
    """Check a PSF stamp (2-d, square, odd, finite, positive sum) and normalise it to sum 1."""
    stamp = np.asarray(stamp, dtype=float)
    if stamp.ndim != 2 or stamp.shape[0] != stamp.shape[1]:
        raise BadInputError(f"PSF stamp must be a square 2-d image, got shape {stamp.shape}", source)
    if stamp.shape[0] % 2 == 0:
        raise BadInputError(f"PSF stamp has even size {stamp.shape[0]}; it must be odd", source)
    if not np.all(np.isfinite(stamp)):
        raise BadInputError("PSF stamp has non-finite pixels", source)
    total = stamp.sum()
    if not total > 0:
        raise BadInputError(f"PSF stamp sum is {total:g}; it must be positive", source)
    return stamp if abs(total - 1.0) < 1e-12 else stamp / total


class ImagePsf(Psf):
    """A PSF given as a pixel stamp (odd size, normalised on construction)."""

    def __init__(self, stamp: np.ndarray, source: object = None):
        self.image = validate_stamp(stamp, source)

    def stamp(self, size=None, x=None, y=None):
        size = self.default_size if size is None else _check_odd(size)
        p = resize_stamp(self.image, size)
        return p / p.sum()

    def stamps_at(self, x, y):
        return np.broadcast_to(self.stamp(), (len(x), *self.image.shape))

    @property
    def default_size(self) -> int:
        return self.image.shape[0]



@dataclass
class GridPsf(Psf):
    """Spatially varying PSF: stamps at grid centres, bilinearly interpolated between them.

    ``stamps`` is (n, s, s) with centres ``xs``, ``ys`` (image pixels) on a regular nx x ny grid
    (any order); outside the grid the nearest edge value is used.
    """

    stamps: np.ndarray
    xs: np.ndarray
    ys: np.ndarray

    def __post_init__(self):
        self.stamps = np.asarray(self.stamps, dtype=float)
        self.xs = np.asarray(self.xs, dtype=float)
        self.ys = np.asarray(self.ys, dtype=float)
        if self.stamps.ndim != 3 or len(self.stamps) != len(self.xs) or len(self.xs) != len(self.ys):
            raise BadInputError("PSF grid needs n stamps and n (x, y) centres")
        self.stamps = np.stack([validate_stamp(s) for s in self.stamps])
        self.grid_x = np.unique(self.xs)
        self.grid_y = np.unique(self.ys)
        if len(self.grid_x) * len(self.grid_y) != len(self.xs):
            raise BadInputError("PSF grid centres do not form a regular grid")
        index = {(x, y): i for i, (x, y) in enumerate(zip(self.xs, self.ys))}
        self._node = np.array([[index[(x, y)] for x in self.grid_x] for y in self.grid_y])

    @property
    def center(self) -> tuple[float, float]:
        return float(np.mean(self.grid_x)), float(np.mean(self.grid_y))

    def interpolated(self, x: float, y: float) -> np.ndarray:
        """Full-size interpolated stamp at (x, y), sum 1."""
        return self.stamps_at([x], [y])[0]

    def stamps_at(self, x, y):
        out = np.zeros((len(x), *self.stamps.shape[1:]))
        (jy, wy), (ix, wx) = _bilinear(self.grid_y, np.asarray(y, float)), _bilinear(self.grid_x, np.asarray(x, float))
        for a in range(2):
            for b in range(2):
                out += (wy[:, a] * wx[:, b])[:, None, None] * self.stamps[self._node[jy[:, a], ix[:, b]]]
        return out / out.sum(axis=(1, 2))[:, None, None]

    def stamp(self, size=None, x=None, y=None):
        cx, cy = self.center
        x = cx if x is None else x
        y = cy if y is None else y
        p = self.interpolated(x, y)
        if size is not None:
            p = resize_stamp(p, _check_odd(size))
        return p / p.sum()

    def at(self, x, y):
        return ImagePsf(self.interpolated(x, y))

    def draw(self, dx, dy, size=None, x=None, y=None):
        cx, cy = self.center
        return self.at(cx if x is None else x, cy if y is None else y).draw(dx, dy, size)

    @property
    def default_size(self) -> int:
        return self.stamps.shape[1]


def _bilinear(axis: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value, the two grid nodes either side and their linear weights ((n, 2) each); beyond the ends the
    nearest node, with weight 1."""
    if len(axis) == 1:
        return np.zeros((len(v), 2), int), np.column_stack([np.ones(len(v)), np.zeros(len(v))])
    i = np.clip(np.searchsorted(axis, v) - 1, 0, len(axis) - 2)
    t = np.clip((v - axis[i]) / (axis[i + 1] - axis[i]), 0.0, 1.0)
    return np.column_stack([i, i + 1]), np.column_stack([1.0 - t, t])


def map_stamps(psf: Psf, fn) -> Psf:
    """A PSF of the same kind with ``fn(stamp, x, y)`` applied to each of its stamps (x, y = None for a
    PSF that does not vary): convolving or filtering a PSF keeps its spatial variation and aperture correction."""
    if isinstance(psf, GridPsf):
        out = GridPsf(np.array([fn(st, x, y) for st, x, y in zip(psf.stamps, psf.xs, psf.ys)]), psf.xs, psf.ys)
    else:
        out = ImagePsf(fn(psf.stamp(), None, None))
    # the model of the same sources through a filter or kernel: what it misses of their light is the same share
    return out.with_aperture_correction(psf.aperture_correction)


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class StarStamps(ArrayColumns):
    """Star stamps normalised to unit flux, recentred and as they fall on their pixels, with their positions and
    noise (same units)."""

    stamps: np.ndarray  # (n, size, size) each shifted so its centroid falls on the central pixel
    sigma: np.ndarray  # (n, size, size) 1-sigma noise of each normalised pixel (where it falls: not shifted)
    x: np.ndarray
    y: np.ndarray
    snr: np.ndarray
    on_pixels: np.ndarray  # (n, size, size) unshifted: the star at (x - round(x), y - round(y)) from the centre


@dataclass(frozen=True)
class Neighbours:
    """Sources with PSF-fit fluxes from a model, and the model drawn at each (once, however many stars' stamps it
    reaches): their modelled light can be taken out of a star's stamp (as DAOPHOT takes the neighbours out of its
    PSF stars; Stetson 1987)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    psf: Psf
    stamps: np.ndarray  # (n, s, s) the model at each source's sub-pixel position, centred on its nearest pixel

    def light(self, shape: tuple[int, int], x0: int, y0: int, star: tuple[float, float]) -> np.ndarray:
        """Their light on a box of ``shape`` whose first pixel is (x0, y0), less the source at ``star`` itself
        (within half a FWHM): each flux times its model stamp."""
        ny, nx = shape
        s = self.stamps.shape[-1]
        h = s // 2
        ix, iy = np.rint(self.x).astype(int) - x0, np.rint(self.y).astype(int) - y0  # on the box
        near = ((ix >= -h) & (ix < nx + h) & (iy >= -h) & (iy < ny + h) & (self.flux > 0)
                & (np.hypot(self.x - star[0], self.y - star[1]) > max(0.5 * self.psf.fwhm, 1.5)))
        out = np.zeros((ny + 2 * s, nx + 2 * s))  # the box with a stamp's margin on every side
        for k in np.flatnonzero(near):
            cx, cy = ix[k] + s - h, iy[k] + s - h
            out[cy : cy + s, cx : cx + s] += self.flux[k] * self.stamps[k]
        return out[s : s + ny, s : s + nx]


def find_neighbours(exposure, image, psf: Psf, xs: np.ndarray, ys: np.ndarray, reach: float) -> Neighbours | None:
    """The image's 5-sigma peaks (found with the PSF's filter) within ``reach`` (in x and y) of any of the stars at
    (xs, ys), the stars among them (each is the others' neighbour), with unweighted PSF-fit fluxes on ``image``
    (sky-subtracted, read in windows); None when there are none."""
    px, py = peak_positions(exposure, psf_filter_sigma(psf))
    if not len(px) or not len(xs):
        return None
    dx, dy = np.abs(px[:, None] - np.asarray(xs)[None]), np.abs(py[:, None] - np.asarray(ys)[None])
    near = ((dx < reach) & (dy < reach)).any(axis=1)
    if not near.any():
        return None
    px, py = px[near].astype(float), py[near].astype(float)
    ix, iy = np.rint(px), np.rint(py)
    stamps = psf.draw_many(px - ix, py - iy, px, py)
    return Neighbours(px, py, _fitted_fluxes(image, stamps, px, py), psf, stamps)


def cut_star_stamps(image: np.ndarray, variance: np.ndarray, xs, ys, snr, size: int,
                    norm_radius: float | None = None, neighbours: Neighbours | None = None) -> StarStamps:
    """Each star cut from the sky-subtracted ``image``, the modelled light of the ``neighbours`` subtracted, the
    remaining light of other sources around it (``neighbour_light``) removed, shifted by cubic spline so its
    centroid falls on the central pixel (and also kept unshifted), and normalised by its flux within
    ``norm_radius`` (default: the stamp's inscribed circle's third; in a crowded field the whole stamp's sum is
    mostly neighbours and sky error).

    No sky is measured per star: any local estimate around a star holds the star's own wings and its
    neighbours' (a stamp-border median takes half the light beyond 2 FWHM away from the model).
    """
    h = size // 2
    pad = h + 3
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    core_radius = norm_radius or max(h / 3, 2.0)
    core = np.hypot(xx, yy) <= core_radius
    cut = []  # (padded box, noise, sub-pixel offset, star) of every star whose box lies on finite pixels
    for x, y, s in zip(xs, ys, snr):
        ix, iy = int(round(x)), int(round(y))
        window = np.s_[iy - pad : iy + pad + 1, ix - pad : ix + pad + 1]
        box = image[window].astype(float)
        if box.shape == (2 * pad + 1, 2 * pad + 1) and np.isfinite(box).all():
            if neighbours is not None:
                box -= neighbours.light(box.shape, ix - pad, iy - pad, (x, y))
            noise = np.sqrt(np.maximum(variance[window][3:-3, 3:-3].astype(float), 0))
            cut.append((box, noise, (iy - y, ix - x), (x, y, s)))
    out = []
    if cut:
        light = neighbour_light(np.array([c[0][3:-3, 3:-3] for c in cut]), core_radius)
        for box, noise, offset, star in cut:
            box = box - light
            shifted = ndimage.shift(box, offset, order=3, mode="nearest")[3:-3, 3:-3]
            total = shifted[core].sum()
            if total > 0:
                out.append((shifted / total, noise / total, *star, box[3:-3, 3:-3] / total))
    if not out:
        return StarStamps(np.zeros((0, size, size)), np.zeros((0, size, size)), *np.zeros((3, 0)),
                          np.zeros((0, size, size)))
    stamps, noise, x, y, snr, on_pixels = (np.array(c, float) for c in zip(*out))
    return StarStamps(stamps, noise, x, y, snr, on_pixels)


def _fitted_fluxes(image, models: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unweighted PSF-fit fluxes with the ``models`` (n, s, s) centred on the pixels nearest (x, y), on ``image``
    (read in windows); 0 where a model's window leaves it: enough to take a neighbour's light out of a star's
    stamp."""
    ny, nx = image.shape
    h = models.shape[-1] // 2
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    ok = np.flatnonzero((ix >= h) & (ix < nx - h) & (iy >= h) & (iy < ny - h))
    flux = np.zeros(len(x))
    for start in range(0, len(ok), 512):
        idx = ok[start : start + 512]
        at, _ = stamp_index(ix[idx], iy[idx], h, image.shape)
        flux[idx] = np.einsum("kij,kij->k", models[idx], image[at]) / np.einsum("kij,kij->k", models[idx], models[idx])
    return flux


#: Rings (in stamp half-sizes) whose levels ``neighbour_light`` fits: the stamp's outer part, the last ring its
#: corners. Beyond the stamp the neighbours' light is higher (the PSF stars were chosen isolated); inside 0.4 the
#: star's own light rules.
NEIGHBOUR_RINGS = (0.4, 0.55, 0.7, 0.85, 1.0, 2.0)


def neighbour_light(boxes: np.ndarray, core_radius: float) -> float:
    """The mean light (counts per pixel) that other sources add around the stars (``boxes``: (n, size, size), each
    centred on its star, the global sky subtracted).

    A star's level in a ring of its stamp is its own wing (proportional to its flux) plus its neighbours'
    light (not): a robust fit of the levels in a few rings against the core fluxes, one slope per ring and one
    intercept for all, gives the latter. One number for all stars: per star it would be as noisy as the ring.
    Beyond the stamp it is higher (the stars were chosen isolated), so only the stamp's own rings count.
    """
    h = boxes.shape[-1] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.hypot(xx, yy)
    edges = h * np.array(NEIGHBOUR_RINGS)
    rings = [(r >= a) & (r < b) for a, b in zip(edges[:-1], edges[1:])]
    flux = boxes[:, r <= core_radius].sum(axis=1)
    levels = np.stack([np.nanmedian(boxes[:, ring], axis=1) for ring in rings], axis=1)
    ok = np.isfinite(flux) & np.isfinite(levels).all(axis=1)
    flux, levels = flux[ok], levels[ok]
    if len(flux) < 8 or not flux.min() > 0 or flux.max() < 2 * flux.min():
        return 0.0  # too few stars, or too narrow a range of fluxes, to tell the two apart: the global sky alone
    # one row per star and ring: the ring's slope times the star's flux, plus the shared intercept
    design = np.zeros((len(flux), len(rings), len(rings) + 1))
    design[:, np.arange(len(rings)), np.arange(len(rings))] = flux[:, None]
    design[..., -1] = 1.0
    design, level = design.reshape(-1, len(rings) + 1), levels.ravel()
    w = np.ones_like(level)
    coef = np.zeros(design.shape[1])
    for _ in range(10):  # Huber's iteratively reweighted least squares
        coef, *_ = np.linalg.lstsq(design * np.sqrt(w)[:, None], level * np.sqrt(w), rcond=None)
        resid = level - design @ coef
        scale = 1.4826 * np.median(np.abs(resid)) + 1e-12
        w = np.minimum(1.0, 1.345 * scale / np.maximum(np.abs(resid), 1e-12))
    # at most the level of the outermost ring: beyond it the stars' own wings would come out negative
    return float(min(coef[-1], np.median(levels[:, -1])))


def _star_weights(snr: np.ndarray) -> np.ndarray:
    """Each PSF star's weight: its S/N squared, capped so that the few brightest stars do not decide the model
    alone."""
    return np.minimum(snr, np.percentile(snr, 75)) ** 2


def _fit_spatial_stamps(stars: StarStamps, terms: np.ndarray, clip: float = 4.0) -> np.ndarray:
    """Per pixel, the weighted least-squares polynomial (``terms``: (n_terms, n_stars)) through the stars'
    normalised values, with one round of clipping of outlying pixels (neighbours, cosmic rays)."""
    n, size, _ = stars.stamps.shape
    values = stars.stamps.reshape(n, -1)
    w = _star_weights(stars.snr)
    # outliers first judged against the per-pixel median (robust to a neighbour in a few stamps), then
    # against the weighted fit itself
    resid = values - np.median(values, axis=0)
    coef = None
    for _ in range(2):
        spread = 1.4826 * np.median(np.abs(resid), axis=0) + 1e-12
        weights = np.where(np.abs(resid) < clip * spread, w[:, None], 0.0)
        m = np.einsum("in,jn,np->pij", terms, terms, weights)
        b = np.einsum("in,np,np->pi", terms, weights, values)
        m += 1e-9 * np.trace(m, axis1=1, axis2=2)[:, None, None] * np.eye(len(terms)) + 1e-300
        coef = np.linalg.solve(m, b[..., None])[..., 0]  # (pixels, n_terms)
        resid = values - (coef @ terms).T
    return coef.T.reshape(len(terms), size, size)


def _excess_residual(stars: StarStamps, model_stamps: np.ndarray, radius: float, stamps=None) -> np.ndarray:
    """Per star, (residual power - noise power) / model power inside ``radius``: ~0 for a star, large for a
    galaxy, a blend or a cosmic ray, and independent of brightness (``stamps``: the stars as the model is
    drawn, default the recentred ones)."""
    stamps = stars.stamps if stamps is None else stamps
    size = stamps.shape[1]
    yy, xx = np.mgrid[:size, :size] - size // 2
    core = (xx**2 + yy**2) <= radius**2
    resid2 = ((stamps - model_stamps)[:, core] ** 2).sum(axis=1)
    noise2 = (stars.sigma[:, core] ** 2).sum(axis=1)
    return (resid2 - noise2) / (model_stamps[:, core] ** 2).sum(axis=1)


def _smooth_wings(stamps: np.ndarray, fwhm: float, far_wings: bool = False) -> np.ndarray:
    """Stamps with the wings (beyond 1.5 FWHM, fully from 2.5) replaced by a Gaussian smoothing of width FWHM / 3,
    and with ``far_wings`` the far wings (beyond 4.5 FWHM, fully from 5.5) by their azimuthal mean.

    Each pixel of a stacked PSF carries the stars' noise; in the wings, where the profile is smooth and
    faint, that noise is most of sum(p^2), so an unsmoothed model understates the NEA by ~10%. An undersampled
    PSF's stamp reaches far beyond 4.5 FWHM (it is 31 px); there its noise was 2-6x the profile, and
    preconvolution's filter put that speckle into every bright star, where the kernel cannot match it: false
    detections in rings around them.
    """
    h = stamps.shape[-1] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.hypot(xx, yy)
    ramp = np.clip((r - 1.5 * fwhm) / fwhm, 0.0, 1.0)
    smooth = ndimage.gaussian_filter(stamps, (0,) * (stamps.ndim - 2) + (max(fwhm / 3, 0.7),) * 2, mode="constant")
    out = (1 - ramp) * stamps + ramp * smooth
    far = np.clip((r - 4.5 * fwhm) / fwhm, 0.0, 1.0)
    if far_wings and far.any():
        ring = np.rint(r).astype(int)
        counts = np.bincount(ring.ravel())
        flat = out.reshape(-1, r.size)
        mean = np.array([np.bincount(ring.ravel(), st) / counts for st in flat])  # (stamps, radii)
        radial = np.array([np.interp(r.ravel(), np.arange(len(m)), m) for m in mean]).reshape(out.shape)
        out = (1 - far) * out + far * radial
    return out


def _psf_from_stars(stars: StarStamps, shape: tuple[int, int], order: int,
                    effective: EffectiveCore | None = None) -> tuple[Psf, np.ndarray]:
    """A constant (order 0) or polynomially varying PSF fitted to the stars, as a GridPsf on nodes that
    reproduce the polynomial, spread over the stars' extent (beyond it GridPsf holds the edge value rather
    than extrapolate). With an ``effective`` PSF (``_effective_psf``: undersampled stars) the model's mean is that,
    and it also returns the model drawn at each star as the star falls on its pixels (else None: ``_star_models``
    draws the chosen model)."""
    ny, nx = shape
    cheb = Chebyshev2D(order, nx, ny)
    terms = cheb.terms(stars.x, stars.y)
    coef, model = _fit_spatial_stamps(stars, terms), None
    if effective is not None:
        # the core's mean from the stars on their pixels, its variation and the wings from the interpolated stars
        # (smooth there, so interpolation does not broaden them); joined over the core's outer 40%
        core, model, extent = effective.stamp, effective.model, effective.extent
        h = coef.shape[1] // 2
        yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
        join = np.clip((extent - np.hypot(xx, yy)) / (0.4 * extent), 0.0, 1.0)
        coef[0] += join * (core - np.einsum("k,kij->ij", terms.mean(axis=1), coef))
    # a negative pedestal left by sky estimates biased by neighbours (crowded fields) would dominate the sum
    h = coef.shape[1] // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    rim = xx**2 + yy**2 >= (0.8 * h) ** 2
    coef -= np.minimum(np.median(coef[:, rim], axis=1), 0)[:, None, None]  # real wings are positive: kept
    # a PSF is positive: beyond the first radius where the mean profile is not, what is left is sky error
    r = np.hypot(xx, yy)
    ring = np.round(r).astype(int)
    profile = np.bincount(ring.ravel(), coef[0].ravel()) / np.bincount(ring.ravel())
    nonpositive = np.nonzero(profile[1:] <= 0)[0]
    if len(nonpositive):
        coef[:, ring > nonpositive[0] + 1] = 0.0
    fwhm = stamp_fwhm(coef[0])
    coef = _smooth_wings(coef, fwhm, far_wings=effective is not None)
    # the variation is measured where the stars have signal: beyond 2.5 FWHM each pixel's polynomial would be
    # fitted to noise and neighbours (NEA errors of +-5% across the CCD); the wings there are the mean's
    coef[1:] *= np.clip(3.5 - r / fwhm, 0.0, 1.0)
    if order == 0:
        psf = ImagePsf(coef[0])
    else:
        nodes = 2 * order + 1
        gx, gy = np.meshgrid(np.linspace(stars.x.min(), stars.x.max(), nodes),
                             np.linspace(stars.y.min(), stars.y.max(), nodes))
        psf = GridPsf(np.einsum("kn,kyx->nyx", cheb.terms(gx.ravel(), gy.ravel()), coef), gx.ravel(), gy.ravel())
    return psf, model


def _star_models(psf: Psf, stars: StarStamps) -> np.ndarray:
    """The model at each star, to judge it by."""
    return np.array([psf.stamp(x=x, y=y) for x, y in zip(stars.x, stars.y)])


@dataclass(frozen=True)
class EffectiveCore:
    """The core of undersampled stars' effective PSF as a stamp normalised like theirs, the model at each star on
    its pixels (both zero beyond the core), the core's half-size, and the fit they came from."""

    stamp: np.ndarray
    model: np.ndarray
    extent: int
    fit: object  # epsf.EffectivePsf


def _effective_psf(stars: StarStamps, fwhm: float, start=None) -> EffectiveCore:
    """The core (six FWHM, ``fwhm`` the stars' estimate) of the stars' mean effective PSF (``epsf.fit_effective_psf``
    from ``start`` if given, the stars weighted by ``_star_weights``)."""
    from .epsf import fit_effective_psf

    size = stars.stamps.shape[-1]
    weights = _star_weights(stars.snr)
    inner = min(odd_size(2 * math.ceil(3 * fwhm) + 1), size)
    fit = fit_effective_psf(resize_stamp(stars.on_pixels, inner), resize_stamp(stars.sigma, inner),
                            stars.x - np.rint(stars.x), stars.y - np.rint(stars.y), weights / weights.mean(), fwhm,
                            start=start)
    return EffectiveCore(resize_stamp(fit.grid.native_stamp(inner), size), resize_stamp(fit.model, size), inner // 2,
                         fit)


def _sane_psf_from_stars(stars: StarStamps, shape: tuple[int, int], order: int,
                         effective: EffectiveCore | None = None) -> tuple[Psf, np.ndarray]:
    """``_psf_from_stars`` at the highest order (up to ``order``) whose every node is a PSF: positive sum, a
    size within 30% of the constant model's. Few or unevenly spread stars can make a polynomial swing. Returns
    the model at each star too."""
    chosen, model = _psf_from_stars(stars, shape, 0, effective)
    for o in range(order, 0, -1):
        try:
            psf, varying_model = _psf_from_stars(stars, shape, o, effective)
        except BadInputError:
            continue
        if all(abs(ImagePsf(st).sigma / chosen.sigma - 1) < 0.3 for st in psf.stamps):
            chosen, model = psf, varying_model
            break
    return chosen, _star_models(chosen, stars) if model is None else model


def variation_order(x: np.ndarray, y: np.ndarray, sizes: np.ndarray, shape: tuple[int, int],
                    max_order: int = 2, p_value: float = 1e-3) -> int:
    """The polynomial order of the PSF's variation that the stars' sizes demand: each order is kept only when
    it explains significantly more of their scatter than the one below (an F test), with 12 stars per term.
    A constant PSF from the stars is less noisy than any varying one, so the variation must be shown."""
    from scipy.special import fdtrc  # the F distribution's survival function (scipy.stats costs 0.5 s to import)

    ny, nx = shape
    values = np.log(sizes)
    best, rss_prev, p_prev = 0, float(np.sum((values - values.mean()) ** 2)), 1
    for order in range(1, max_order + 1):
        t = Chebyshev2D(order, nx, ny).terms(x, y).T
        if len(values) < 12 * t.shape[1]:
            break
        fit, *_ = np.linalg.lstsq(t, values, rcond=None)
        rss = float(np.sum((values - t @ fit) ** 2))
        dof = len(values) - t.shape[1]
        f = ((rss_prev - rss) / (t.shape[1] - p_prev)) / max(rss / dof, 1e-30)
        if fdtrc(t.shape[1] - p_prev, dof, f) > p_value:
            break
        best, rss_prev, p_prev = order, rss, t.shape[1]
    return best


#: Smallest cell (pixels) of the sky under the PSF stars' stamps (cells are at least a stamp wide, so that they
#: do not follow the stars' own wings). Moffat star fields with two bright galaxy halos: NEA +5.7% and -2.1% with
#: the image's 64-px sky, +1.6% and +0.2% with 32 px; galaxy-rich fields slightly better too.
PSF_SKY_MESH = 32
#: Stars' FWHM (pixels) below which the PSF's core is fitted as an effective PSF on a finer grid (``epsf``).
UNDERSAMPLED_FWHM = 3.0
#: Smallest stamp (pixels) of an undersampled PSF measured from stars: the light beyond it leaves its NEA 2.0% short
#: for Kolmogorov x Airy at FWHM 2.1 px, 3.5-5.6% for an unobscured Airy of FWHM 1.6-2.6 px (25 px: 2.6, 4.3-6.9%).
UNDERSAMPLED_SIZE = 31
#: Fewest stars for an effective PSF on the finer grid (16 nodes per pixel): the 8 stars of a 900^2 NIRCam stamp
#: made it 4-37% broader than their interpolated stack, where it should be narrower.
EPSF_MIN_STARS = 30


def measure_psf(exposure, size: int | None = None, max_stars: int = 300, min_stars: int = 5,
                min_snr: float = 30.0, order: int | None = None) -> Psf:
    """Measure the (effective) PSF from bright, clean, isolated stars on the stellar locus.

    Stars are found twice (the second time with a filter of the size the first found), then the model is
    refined in up to three rounds: fitted per pixel as a polynomial of the position (constant, linear or
    quadratic, as the stars' sizes show significant variation, or ``order``), and every source whose excess
    residual against it is an outlier (a galaxy, blend or cosmic ray that passed the size cut) is dropped. The
    model is then made again from stamps with their neighbours' light (fitted with the first model) taken out.

    Parameters
    ----------
    exposure : Exposure
        The image to measure.
    size : int, optional
        Odd stamp size; default six FWHM, between 11 and 75 pixels.
    max_stars, min_stars : int
        Most stars used; fewest accepted.
    min_snr : float
        Lowest S/N of a PSF star.
    order : int, optional
        Polynomial order of the spatial variation (default: chosen by an F test on the stars' sizes).

    Returns
    -------
    Psf
        An ``ImagePsf``, or a ``GridPsf`` when the PSF varies.

    Raises
    ------
    PsfMeasurementError
        When too few usable stars are found.
    """
    found = select_psf_stars(exposure, min_snr, max_stars, min_stars)
    if len(found) < min_stars:
        raise PsfMeasurementError(
            f"{exposure.path or 'image'}: only {len(found)} usable stars for the PSF (need {min_stars}); give the "
            "PSF as a stamp file (dialab subtract --science-psf/--template-psf, a manifest's science_psf/template_psf)")
    sigma = float(np.median(found.sigma))
    # an undersampled PSF's core on a finer grid, where the stars sample enough sub-pixel positions for it
    oversampled = FWHM_PER_SIGMA * sigma < UNDERSAMPLED_FWHM and len(found) >= EPSF_MIN_STARS
    if size is None:
        # six FWHM; an undersampled PSF's wings hold more light beyond that than a sampled one's (Kolmogorov x Airy
        # at FWHM 2.1 px: a 15-px stamp holds 97.5% of it, and its NEA is 4.8% short)
        size = odd_size(2 * math.ceil(3 * FWHM_PER_SIGMA * sigma) + 1, minimum=UNDERSAMPLED_SIZE if oversampled else 11,
                        maximum=75)
    # the sky under the stamps on cells of the stamp's size: the image's own 64-px sky leaves smaller structure
    # (a bright galaxy's halo under some of the stars) in them, and no star has a sky of its own here
    sky = sky_background(exposure, max(PSF_SKY_MESH, size))
    image = sky_subtracted(exposure.image, sky)
    variation = variation_order(found.x, found.y, found.sigma, exposure.shape) if order is None else order
    stars = cut_star_stamps(image, exposure.variance, found.x, found.y, found.snr, size)
    psf = _refined_psf(stars, exposure.shape, variation, sigma, min_stars)
    # once more with the neighbours' light taken out of the stamps: in a broad PSF most stars have another within
    # their stamp (a Moffat field of FWHM 8 px, star pairs 2.5-3 FWHM apart: NEA +10 to +18% -> -2 to -3%); and an
    # undersampled PSF fitted on a finer grid to the stars as they fall on their pixels: interpolated to a common
    # centre they are broadened (FWHM 2.1 px: +7%; ``epsf``). The first model is good enough for the neighbours'
    # fluxes.
    neighbours = find_neighbours(exposure, image, psf, stars.x, stars.y, size // 2 + psf.default_size // 2 + 1)
    if neighbours is not None or oversampled:
        stars = cut_star_stamps(image, exposure.variance, found.x, found.y, found.snr, size, neighbours=neighbours)
        psf = _refined_psf(stars, exposure.shape, variation, sigma, min_stars, oversampled, fixed_order=order is not None)
    psf.from_stars = True
    return psf


def _refined_psf(stars: StarStamps, shape: tuple[int, int], order: int, sigma: float, min_stars: int,
                 oversampled: bool = False, fixed_order: bool = True) -> Psf:
    """The model from the stars in up to three rounds (six undersampled), each dropping the sources whose excess
    residual against it is an outlier (a galaxy, blend or cosmic ray that passed the size cut); an undersampled star
    also when its size, against the model's at its sub-pixel position, is off the stellar locus. Unless
    ``fixed_order``, those sizes then also decide the variation's order: the pixel phase's scatter hid it in the
    sizes measured on the pixels."""
    # an undersampled field's compact galaxies differ from its stars by little: each round's sharper model shows more
    # of them (FWHM 1.5 px, galaxies 3:1: NEA +27% after three rounds, +11% after six)
    fit = None
    for _ in range(6 if oversampled else 3):
        on_grid = oversampled and len(stars) >= EPSF_MIN_STARS
        core = _effective_psf(stars, FWHM_PER_SIGMA * sigma, fit) if on_grid else None
        psf, model = _sane_psf_from_stars(stars, shape, order, core)
        excess = _excess_residual(stars, model, max(2.0, 2.0 * FWHM_PER_SIGMA * sigma / 2),
                                  stars.on_pixels if on_grid else None)
        med = np.median(excess)
        spread = 1.4826 * np.median(np.abs(excess - med)) + 1e-4
        keep = excess < med + 4 * spread
        settled = True
        if on_grid:
            sizes = _phase_corrected_sizes(stars, model, sigma)
            keep &= stellar_locus(sizes, stars.x, stars.y)
            if not fixed_order:
                new = variation_order(stars.x[keep], stars.y[keep], sizes[keep], shape)
                settled, order = new == order, new
        if (keep.all() and settled) or keep.sum() < min_stars:
            break
        stars = stars.select(keep)
        fit = core.fit.select(keep) if core is not None else None
    return psf


def _phase_corrected_sizes(stars: StarStamps, model: np.ndarray, sigma: float) -> np.ndarray:
    """Each undersampled star's moment size times the model's size centred on a pixel over the model's at the
    star's own sub-pixel position: where a star falls on its pixel changes its measured size by up to ~10% at FWHM
    2 px, which hides a compact galaxy among the stars until the pixel phase is taken out."""
    h = stars.stamps.shape[-1] // 2
    cx, cy = h + stars.x - np.rint(stars.x), h + stars.y - np.rint(stars.y)

    def sizes(stamps):
        return np.array([adaptive_moments(st, x, y, sigma, upsample_on_failure=True).sigma
                         for st, x, y in zip(stamps, cx, cy)])
    model_sizes = sizes(model)
    return sizes(stars.on_pixels) * np.nanmedian(model_sizes) / model_sizes


def gaussian_broadened(stamp: np.ndarray, sigma: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """``stamp`` convolved with a Gaussian of ``sigma`` px and shifted by (dx, dy), in Fourier space (exact for a
    band-limited stamp, as an effective PSF sampled at or above Nyquist is), padded by four sigmas and renormalised."""
    pad = int(math.ceil(4 * sigma))
    padded = resize_stamp(np.asarray(stamp, float), stamp.shape[0] + 2 * pad)
    f = np.fft.fftfreq(padded.shape[0])
    fx, fy = np.meshgrid(f, f)
    transfer = np.exp(-2 * math.pi**2 * sigma**2 * (fx**2 + fy**2) - 2j * math.pi * (fx * dx + fy * dy))
    out = np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(padded)) * transfer).real)
    return out / out.sum()


def broadening_sigma(given: np.ndarray, stars: np.ndarray) -> float:
    """The sigma (px) of the Gaussian that, convolved with the ``given`` stamp, best fits the model made from the
    stars (least squares over the stars' stamp, with a free scale and a free sub-pixel offset, so a model centred a
    fraction of a pixel off is not taken for a broader one)."""
    from scipy.optimize import least_squares

    n = stars.shape[0]
    target = stars / stars.sum()

    def residuals(p):
        model = resize_stamp(gaussian_broadened(given, p[0], p[1], p[2]), n)
        scale = np.sum(model * target) / np.sum(model * model)
        return (scale * model - target).ravel()

    limit = stamp_sigma(stars) * 2
    fit = least_squares(residuals, [0.5, 0.0, 0.0], bounds=([0.0, -1.0, -1.0], [limit, 1.0, 1.0]))
    return float(fit.x[0])


def check_given_psf(exposure, given: Psf, tolerance: float = 0.1, broaden_above: float = 0.05) -> Psf:
    """A given PSF checked against the exposure's stars, with their spatial variation added to it.

    A given stamp sharper than the stars by more than ``broaden_above`` in FWHM (its measurement's error is 1-3%) is
    convolved with the Gaussian that makes it fit them, keeping the shape (spikes, far wings) the stars are too few
    to show. A WebbPSF model of a drizzled NIRCam image lacks the drizzle's, the jitter's and the detector's blur:
    each of its stars is the model convolved with a Gaussian of sigma 0.55-0.8 px, fitted with half the chi^2 of
    the model as given. One broader than the stars by more than ``tolerance`` is logged as a warning (no blur turns
    it into them). When the stars show significant variation, the measured model's departure from its own constant
    part is added to the stamp at each grid node.
    """
    import logging

    log = logging.getLogger(__name__)
    if isinstance(given, GridPsf):
        return given  # already spatially varying: taken as given (a single stamp is what needs checking)
    try:
        measured = measure_psf(exposure)
    except PsfMeasurementError:
        return given  # too few stars to check anything
    constant = measure_psf(exposure, order=0) if isinstance(measured, GridPsf) else measured
    given_fwhm = given.fwhm
    ratio = measured.fwhm / given_fwhm
    base = given.stamp()
    name = exposure.path or "image"
    if ratio > 1 + broaden_above:
        sigma = broadening_sigma(base, constant.stamp())
        base = gaussian_broadened(base, sigma)
        given = ImagePsf(base)
        log.warning("%s: the given PSF (FWHM %.2f px) is sharper than the stars (%.2f px): convolved with a Gaussian "
                    "of sigma %.2f px to fit them (FWHM %.2f px)", name, given_fwhm, measured.fwhm, sigma, given.fwhm)
    elif ratio < 1 - tolerance:
        log.warning("%s: the given PSF's FWHM %.2f px is broader than the stars' %.2f px by %.0f%%", name, given.fwhm,
                    measured.fwhm, 100 * (1 / ratio - 1))
    if not isinstance(measured, GridPsf):
        return given
    constant_stamp = constant.stamp(measured.default_size)
    size = max(base.shape[0], measured.default_size)
    stamps = [resize_stamp(base, size) + resize_stamp(s - constant_stamp, size) for s in measured.stamps]
    return GridPsf(np.array(stamps), measured.xs, measured.ys)
