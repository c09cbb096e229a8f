"""PSF models and their sizes.

A PSF here is the *effective* PSF: the profile sampled at pixel centres already includes the
pixel response, so a ``GaussianPsf(sigma)`` stamp is exp(-r^2 / 2 sigma^2) evaluated at pixel
centres. Gaussians then convolve exactly in quadrature, which the kernel tests rely on.
Every model returns odd-sized stamps with sum 1 centred on the central pixel.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import ndimage

from .errors import BadInputError
from .moments import adaptive_moments

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
    return adaptive_moments(stamp, c, c, guess).sigma


class Psf(ABC):
    """A point-spread function; position arguments are image pixels (0-based)."""

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

    def at(self, x: float, y: float) -> Psf:
        """The PSF at one image position, as a non-varying model."""
        return self

    @property
    @abstractmethod
    def default_size(self) -> int:
        """Odd stamp size (pixels) that holds the profile to a fraction of a percent."""

    @property
    def sigma(self) -> float:
        """Adaptive second-moment sigma, pixels."""
        return stamp_sigma(self.stamp())

    @property
    def fwhm(self) -> float:
        """Full width at half maximum, pixels."""
        return stamp_fwhm(self.stamp())

    @property
    def nea(self) -> float:
        """Noise-equivalent area 1 / sum(p^2), pixels^2."""
        p = self.stamp()
        return float(1.0 / np.sum(p.astype(float) ** 2))


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


def _resize(stamp: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a centred odd stamp to ``size``."""
    n = stamp.shape[0]
    if size == n:
        return stamp
    if size < n:
        o = (n - size) // 2
        return stamp[o : o + size, o : o + size]
    out = np.zeros((size, size), dtype=stamp.dtype)
    o = (size - n) // 2
    out[o : o + n, o : o + n] = stamp
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
        p = _resize(self.image, size)
        return p / p.sum()

    @property
    def default_size(self) -> int:
        return self.image.shape[0]

    @cached_property
    def sigma(self) -> float:
        return stamp_sigma(self.image)

    @cached_property
    def fwhm(self) -> float:
        return stamp_fwhm(self.image)

    @cached_property
    def nea(self) -> float:
        return float(1.0 / np.sum(self.image**2))


@dataclass
class GridPsf(Psf):
    """Spatially varying PSF: stamps at grid centres, bilinearly interpolated between them.

    ``stamps`` is (n, s, s) with centres ``xs``, ``ys`` (image pixels) on a regular nx x ny grid
    (any order); outside the grid the nearest edge value is used.
    """

    stamps: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

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

    def _weights(self, axis: np.ndarray, v: float) -> list[tuple[int, float]]:
        if len(axis) == 1 or v <= axis[0]:
            return [(0, 1.0)]
        if v >= axis[-1]:
            return [(len(axis) - 1, 1.0)]
        i = int(np.searchsorted(axis, v) - 1)
        t = (v - axis[i]) / (axis[i + 1] - axis[i])
        return [(i, 1.0 - t), (i + 1, t)]

    def interpolated(self, x: float, y: float) -> np.ndarray:
        """Full-size interpolated stamp at (x, y), sum 1."""
        out = np.zeros(self.stamps.shape[1:])
        for j, wy in self._weights(self.grid_y, y):
            for i, wx in self._weights(self.grid_x, x):
                out += wx * wy * self.stamps[self._node[j, i]]
        return out / out.sum()

    def stamp(self, size=None, x=None, y=None):
        cx, cy = self.center
        x = cx if x is None else x
        y = cy if y is None else y
        p = self.interpolated(x, y)
        if size is not None:
            p = _resize(p, _check_odd(size))
        return p / p.sum()

    def at(self, x, y):
        return ImagePsf(self.interpolated(x, y))

    def draw(self, dx, dy, size=None, x=None, y=None):
        cx, cy = self.center
        return self.at(cx if x is None else x, cy if y is None else y).draw(dx, dy, size)

    @property
    def default_size(self) -> int:
        return self.stamps.shape[1]


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class StarCandidates:
    """Bright point-like sources in an image (arrays of equal length, brightest first)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    snr: np.ndarray
    sigma: np.ndarray
    isolated: np.ndarray
    clean: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def select(self, keep: np.ndarray) -> StarCandidates:
        return StarCandidates(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))


def window_any(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, half: int) -> np.ndarray:
    """For each integer (x, y): any ``mask`` pixel in the (2 half + 1)^2 window round it (clipped at
    the borders). A few hundred windows cost far less than dilating the whole mask."""
    ny, nx = mask.shape
    out = np.zeros(len(xs), bool)
    if not mask.any():
        return out
    for i, (x, y) in enumerate(zip(np.asarray(xs, int), np.asarray(ys, int))):
        out[i] = mask[max(y - half, 0) : y + half + 1, max(x - half, 0) : x + half + 1].any()
    return out


def find_stars(exposure, sigma_guess_pix: float = 2.0, min_snr: float = 20.0, radius_pix: int | None = None,
               bad_planes: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "SUSPECT"),
               background=None, max_candidates: int = 600) -> StarCandidates:
    """Peaks above ``min_snr`` with centroid, adaptive size, and isolation/cleanliness flags.

    Only the ``max_candidates`` highest-S/N peaks are measured.
    ``clean``: no pixel of ``bad_planes`` within ``radius_pix`` and not at the border;
    ``isolated``: no other peak brighter than 10% of this one within ``radius_pix``.
    """
    from .background import estimate_background
    from .detection import find_peaks, gaussian_filtered_snr

    image = exposure.image
    bad = exposure.plane(*bad_planes)
    nodata = exposure.plane("NO_DATA", "BAD")
    bg = estimate_background(image, nodata) if background is None else background
    sub = image - bg.level
    var = exposure.variance
    noise = np.sqrt(var) if (var > 0).all() else np.sqrt(np.where(var > 0, var, bg.rms**2))
    snr = gaussian_filtered_snr(sub, noise, sigma_guess_pix, nodata)
    radius = int(radius_pix or max(5, math.ceil(4 * sigma_guess_pix)))
    ys, xs = find_peaks(snr, min(min_snr, 5.0), max(2, int(round(sigma_guess_pix))), exclude=nodata)
    peak_value = snr[ys, xs]
    strong = peak_value > min_snr
    ny, nx = image.shape
    rows = []
    all_pos = np.column_stack([xs, ys]).astype(float)
    all_amp = peak_value  # filtered S/N: relative brightness of neighbours where the noise is even
    for k in np.nonzero(strong)[0][:max_candidates]:
        x0, y0 = int(xs[k]), int(ys[k])
        if x0 < radius or y0 < radius or x0 >= nx - radius or y0 >= ny - radius:
            continue
        cut = sub[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        m = adaptive_moments(cut, radius, radius, sigma_guess_pix)
        if not (m.converged and np.isfinite(m.sigma)) or abs(m.x - radius) > 2 or abs(m.y - radius) > 2:
            continue
        d = np.hypot(all_pos[:, 0] - x0, all_pos[:, 1] - y0)
        neighbours = (d > 0) & (d <= 1.5 * radius) & (all_amp > 0.1 * all_amp[k])
        clean = not window_any(bad, [x0], [y0], radius)[0]
        rows.append((x0 - radius + m.x, y0 - radius + m.y, float(cut.sum()), float(peak_value[k]), m.sigma,
                     not neighbours.any(), clean))
    if not rows:
        empty = np.zeros(0)
        return StarCandidates(empty, empty, empty, empty, empty, empty.astype(bool), empty.astype(bool))
    arr = np.array(rows, dtype=float)
    return StarCandidates(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4], arr[:, 5].astype(bool),
                          arr[:, 6].astype(bool))


def stellar_locus(sigmas: np.ndarray, x: np.ndarray, y: np.ndarray, width: float = 0.12) -> np.ndarray:
    """Boolean selection of the tight sequence of sizes that stars form.

    Stars share one size (or one that varies smoothly over the image) while galaxies are
    larger and cosmic rays smaller. The densest +-0.35 window in log-size is found, a plane in
    (x, y) is fitted to it with clipping, and sources within ``width`` of the plane are kept.
    """
    logs = np.log(sigmas)
    if len(logs) < 3:
        return np.ones(len(logs), bool)
    counts = np.array([np.sum(np.abs(logs - c) < 0.35) for c in logs])
    centre = np.median(logs[counts == counts.max()])
    keep = np.abs(logs - centre) < 0.35
    design = np.column_stack([np.ones_like(x), x - x.mean(), y - y.mean()])
    for _ in range(5):
        coef, *_ = np.linalg.lstsq(design[keep], logs[keep], rcond=None)
        resid = logs - design @ coef
        spread = max(1.4826 * np.median(np.abs(resid[keep])), 0.02)
        keep = np.abs(resid) < min(width, 3 * spread) if keep.sum() > 3 else keep
    return np.abs(resid) < min(width, max(3 * spread, 0.05))


def _stack_stars(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """Recentre (cubic spline, sub-pixel) each star, normalise its flux, and take a clipped mean."""
    h = size // 2
    pad = h + 3
    cuts = []
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        box = image[iy - pad : iy + pad + 1, ix - pad : ix + pad + 1].astype(float)
        if box.shape != (2 * pad + 1, 2 * pad + 1):
            continue
        edge = np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]])
        box = box - np.median(edge)
        shifted = ndimage.shift(box, (iy - y, ix - x), order=3, mode="nearest")[3:-3, 3:-3]
        total = shifted.sum()
        if total > 0:
            cuts.append(shifted / total)
    if not cuts:
        return np.zeros((size, size))
    cube = np.array(cuts)
    if len(cube) < 3:
        return cube.mean(axis=0)
    med = np.median(cube, axis=0)
    spread = 1.4826 * np.median(np.abs(cube - med), axis=0) + 1e-12
    keep = np.abs(cube - med) < 3 * spread
    return np.where(keep, cube, 0).sum(axis=0) / np.maximum(keep.sum(axis=0), 1)


def _psf_stars(exposure, sigma_guess: float, snr_cut: float, background, max_stars: int) -> StarCandidates:
    """Clean (and, where enough, isolated) stars on the stellar locus, brightest first."""
    radius = max(5, int(math.ceil(4 * sigma_guess)))
    stars = find_stars(exposure, sigma_guess, snr_cut, radius, background=background)
    ok = stars.clean & stars.isolated
    stars = stars.select(ok if ok.sum() >= 5 else stars.clean)
    if len(stars) == 0:
        return stars
    stars = stars.select(stellar_locus(stars.sigma, stars.x, stars.y))
    return stars.select(np.arange(min(len(stars), max_stars)))


def measure_psf(exposure, grid: tuple[int, int] | None = None, size: int | None = None,
                max_stars: int = 300, min_stars: int = 5, min_snr: float = 30.0, background=None) -> Psf:
    """Measure the PSF from bright, isolated, unsaturated, star-like sources.

    Two passes: the first finds stars with a 2-px filter and estimates the size, the second
    uses a matched filter and a stamp of ~6 FWHM. With ``grid=(nx, ny)`` one stamp is stacked
    per cell (nearest stars when a cell has fewer than ``min_stars``) and a GridPsf returned.
    """
    from .background import estimate_background
    from .errors import PsfMeasurementError

    bg = background or estimate_background(exposure.image, exposure.plane("NO_DATA", "BAD"))
    sigma_guess = 2.0
    chosen = None
    for snr_cut in (min_snr, min_snr / 2):  # lower the cut only when too few stars are bright
        for _ in range(2):  # the second pass filters with the size found by the first
            stars = _psf_stars(exposure, sigma_guess, snr_cut, bg, max_stars)
            if len(stars) < min_stars:
                break
            chosen = stars
            sigma_guess = float(np.median(stars.sigma))
        if chosen is not None:
            break
    if chosen is None or len(chosen) < min_stars:
        found = 0 if chosen is None else len(chosen)
        raise PsfMeasurementError(
            f"{exposure.path or 'image'}: only {found} usable stars for the PSF (need {min_stars})")
    if size is None:
        size = odd_size(2 * math.ceil(3 * FWHM_PER_SIGMA * sigma_guess) + 1, minimum=11, maximum=75)
    sub = exposure.image - bg.level
    if grid is None:
        return ImagePsf(_stack_stars(sub, chosen.x, chosen.y, size))
    nx_cells, ny_cells = grid
    ny, nx = exposure.shape
    stamps, cx, cy = [], [], []
    for j in range(ny_cells):
        for i in range(nx_cells):
            x_c = (i + 0.5) * nx / nx_cells - 0.5
            y_c = (j + 0.5) * ny / ny_cells - 0.5
            inside = ((chosen.x >= i * nx / nx_cells) & (chosen.x < (i + 1) * nx / nx_cells)
                      & (chosen.y >= j * ny / ny_cells) & (chosen.y < (j + 1) * ny / ny_cells))
            if inside.sum() < min_stars:
                d = np.hypot(chosen.x - x_c, chosen.y - y_c)
                inside = d <= np.sort(d)[min_stars - 1]
            stamps.append(_stack_stars(sub, chosen.x[inside], chosen.y[inside], size))
            cx.append(x_c)
            cy.append(y_c)
    return GridPsf(np.array(stamps), np.array(cx), np.array(cy))
