"""Stars: finding point-like sources and selecting the ones a PSF or a kernel can trust.

Stars share one size (varying smoothly over the image) while galaxies are larger and cosmic rays
and hot pixels smaller: the stellar locus is the tight sequence at the *smallest* size that many
sources share, not the most populated size (in a deep field compact galaxies outnumber stars).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .background import sky_background, sky_subtracted
from .imageops import find_peaks, gaussian_filtered_snr
from .moments import adaptive_moments


class ArrayColumns:
    """A dataclass of equal-length arrays (one entry per star): its length, and the rows a mask keeps."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    def select(self, keep: np.ndarray):
        return type(self)(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class StarCandidates(ArrayColumns):
    """Bright point-like sources in an image (arrays of equal length, brightest first)."""

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    snr: np.ndarray
    sigma: np.ndarray
    ellipticity: np.ndarray
    isolated: np.ndarray
    clean: np.ndarray


def psf_filter_sigma(psf) -> float:
    """The matched filter's width for finding the stars of an image with this PSF: its sigma, at least 1 px.
    Registration, the kernel candidates and the stars' flux ratio all use it, so ``find_stars`` filters the
    image once for all of them."""
    return max(psf.sigma, 1.0)


#: Relative difference of matched-filter widths (in log) below which the peaks of one serve for the other.
FILTER_TOLERANCE = 0.2


def find_stars(exposure, sigma_guess_pix: float = 2.0, min_snr: float = 20.0, radius_pix: int | None = None,
               bad_planes: tuple[str, ...] = ("BAD", "SAT", "NO_DATA", "EDGE", "CR", "SUSPECT"),
               max_candidates: int = 600) -> StarCandidates:
    """Peaks above ``min_snr`` with centroid, adaptive size, and isolation/cleanliness flags.

    Only the ``max_candidates`` highest-S/N peaks are measured.
    ``clean``: no pixel of ``bad_planes`` within ``radius_pix`` and not at the border;
    ``isolated``: no other peak brighter than 10% of this one within ``radius_pix``.
    The peaks and their measurements are kept on the exposure (``Exposure.derived``): registration, the
    PSF, its check and the kernel candidates all look for stars in the same images.
    """
    radius = int(radius_pix or max(5, math.ceil(4 * sigma_guess_pix)))
    peaks = _peaks(exposure, sigma_guess_pix)
    # the strong peaks are a prefix of the S/N-ordered list
    rows = peaks.measured(radius, bad_planes, min(int(np.sum(peaks.value > min_snr)), max_candidates))
    return StarCandidates(*rows[:, :6].T, rows[:, 6].astype(bool), rows[:, 7].astype(bool))


def peak_positions(exposure, sigma_guess_pix: float, min_snr: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every peak of the image filtered at ``sigma_guess_pix`` whose filtered S/N reaches ``min_snr`` (the
    search keeps 5-sigma peaks; shared with ``find_stars``), measured or not: the neighbours that make a star unfit
    for an aperture, or the stars an undersampled image's cosmic-ray test must spare (HSM cannot measure a star
    centred on a pixel, but it is still a star)."""
    peaks = _peaks(exposure, sigma_guess_pix)
    strong = peaks.value >= min_snr
    return peaks.x[strong], peaks.y[strong]


def carry_stars(source, injected) -> None:
    """Give ``injected`` (a copy of ``source`` with fake sources added) the peaks ``source`` already has. Fakes
    are not stars: no star list may hold one (a fake differs between science and template by design), and
    the stars' windows they fall in are refused anyway (kernel candidates keep clear of INJECTED pixels).
    Stars measured from here on are measured on ``injected``'s pixels."""
    found = source.known("peaks")
    if found is not None:
        injected.keep_derived("peaks", {sigma: peaks.moved_to(injected) for sigma, peaks in found.items()})


def _peaks(exposure, sigma_guess_pix: float) -> _Peaks:
    found = exposure.derived("peaks", dict)  # filter sigma -> _Peaks, for this state of the pixels
    # a filter within FILTER_TOLERANCE of one already run finds the same stars (its S/N is ~1% lower)
    near = [s for s in found if abs(math.log(s / sigma_guess_pix)) < FILTER_TOLERANCE]
    if near:
        return found[min(near, key=lambda s: abs(math.log(s / sigma_guess_pix)))]
    peaks = found[sigma_guess_pix] = _Peaks(exposure, sigma_guess_pix)
    return peaks


class _Peaks:
    """The peaks of one image's Gaussian-filtered S/N (highest first), and their measurements, made on demand
    for as many of the brightest as any caller has asked for."""

    def __init__(self, exposure, sigma_guess_pix: float):
        self.exposure = weakref.proxy(exposure)  # kept on the exposure itself: no reference cycle
        self.sigma = sigma_guess_pix
        nodata = exposure.plane("NO_DATA", "BAD")
        sky = sky_background(exposure)
        var = exposure.variance
        var = var if (var > 0).all() else np.where(var > 0, var, sky.rms**2)
        # a full pass: the sky's plane is made once and kept (a subtraction releases it when done with it)
        snr = gaussian_filtered_snr(sky_subtracted(exposure.image, sky, full_pass=True), var, sigma_guess_pix, nodata)
        self.y, self.x = find_peaks(snr, 5.0, max(2, int(round(sigma_guess_pix))), exclude=nodata)
        self.value = snr[self.y, self.x]  # filtered S/N: relative brightness of neighbours where the noise is even
        self._tables: dict = {}
        self._tree = None

    def moved_to(self, exposure) -> _Peaks:
        """The same peaks and measurements, measuring any more on ``exposure``'s pixels."""
        moved = copy.copy(self)
        moved.exposure = weakref.proxy(exposure)
        moved._tables = dict(self._tables)
        return moved

    def measured(self, radius: int, bad_planes: tuple[str, ...], n: int) -> np.ndarray:
        """Rows (x, y, flux, snr, sigma, ellipticity, isolated, clean, peak index) of the first ``n`` peaks
        that could be measured within ``radius``."""
        done, table = self._tables.get((radius, bad_planes), (0, np.zeros((0, 9))))
        if n > done:
            table = np.vstack([table, self._measure(radius, bad_planes, done, n)])
            self._tables[(radius, bad_planes)] = (n, table)
        return table[table[:, 8] < n]

    def _measure(self, radius: int, bad_planes: tuple[str, ...], start: int, stop: int) -> np.ndarray:
        exposure = self.exposure
        image, level, mask = exposure.image, sky_background(exposure).level_windows(), exposure.mask
        bits = exposure.mask_planes.bitmask(*bad_planes)
        ny, nx = image.shape
        if self._tree is None:  # every peak, for the neighbour search (a crowded image has tens of thousands)
            self._tree = cKDTree(np.column_stack([self.x, self.y]).astype(float))
        near = self._tree.query_ball_point(np.column_stack([self.x[start:stop], self.y[start:stop]]).astype(float),
                                           1.5 * radius)
        rows = []
        for k in range(start, stop):
            x0, y0 = int(self.x[k]), int(self.y[k])
            if x0 < radius or y0 < radius or x0 >= nx - radius or y0 >= ny - radius:
                continue
            window = np.s_[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]  # no full-size copies
            cut = image[window] - level[window]
            m = adaptive_moments(cut, radius, radius, self.sigma)
            if not m.converged and _spread_peak(cut, radius):
                # an undersampled star centred on a pixel defeats HSM on the pixels: measured on a finer grid, or
                # every star of a 1.5-px PSF would be lost (and compact galaxies taken for the stars). A cosmic ray
                # fails too, and is measured no further: it would be the sharpest "stars" of the image.
                m = adaptive_moments(cut, radius, radius, self.sigma, upsample_on_failure=True)
            if not (m.converged and np.isfinite(m.sigma)) or abs(m.x - radius) > 2 or abs(m.y - radius) > 2:
                continue
            others = np.array([j for j in near[k - start] if j != k], int)
            isolated = not (self.value[others] > 0.1 * self.value[k]).any()
            rows.append((x0 - radius + m.x, y0 - radius + m.y, float(cut.sum()), float(self.value[k]), m.sigma,
                         m.ellipticity, isolated, not (mask[window] & bits).any(), k))
        return np.array(rows, dtype=float).reshape(-1, 9)


#: Least light in each of the brightest pixel's four neighbours, as a fraction of its own, of a source that went
#: through the optics: 0.15 for a Gaussian of FWHM 1.0 px (pixel-integrated), 0.24 at 1.2 px, more when broader or off
#: the pixel centre. A cosmic ray, a hot pixel or a two-pixel hit leaves at least one neighbour empty.
MIN_NEIGHBOUR_FRACTION = 0.1


def _spread_peak(cut: np.ndarray, radius: int) -> bool:
    """Whether the brightest pixel near the centre of ``cut`` (sky-subtracted) has light in all four neighbours, as a
    source seen through a PSF has and a cosmic ray does not."""
    core = cut[radius - 1 : radius + 2, radius - 1 : radius + 2]
    j, i = np.unravel_index(int(np.argmax(core)), core.shape)
    y, x = radius - 1 + j, radius - 1 + i
    peak = cut[y, x]
    neighbours = np.array([cut[y - 1, x], cut[y + 1, x], cut[y, x - 1], cut[y, x + 1]])
    return bool(peak > 0 and neighbours.min() >= MIN_NEIGHBOUR_FRACTION * peak)


#: Adaptive sigma (pixels) below which a source is a hot pixel or a cosmic ray: a pixel-integrated PSF is never
#: sharper (the pixel alone gives 0.29; a critically sampled diffraction-limited PSF about 0.8).
SHARPEST_PSF_SIGMA = 0.5
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Sizes above the locus plane kept, in sigmas of its scatter: fewer than below, because what lies above it is
#: mostly compact galaxies (whatever is larger than a star), what lies below only noise.
UPPER_SIGMAS = 1.5
#: How much more elongated than the typical source a star may be (cosmic-ray tracks, blends and edge-on
#: galaxies are; a trailed or astigmatic PSF makes every star elongated alike).
MAX_EXTRA_ELLIPTICITY = 0.2


def stellar_locus(sigmas: np.ndarray, x: np.ndarray, y: np.ndarray, width: float = 0.08,
                  min_fraction: float = 0.04, upper_sigmas: float = UPPER_SIGMAS) -> np.ndarray:
    """Boolean selection of the tight sequence of sizes that stars form.

    The locus starts at the *lowest* window of +-``width`` in log-size holding at least ``min_fraction`` of the
    sources (and at least 3): galaxies may outnumber stars, but nothing real is smaller than the PSF. From
    there it climbs to the local mode of the window counts (noise and crowding broaden the star sizes).
    A plane in (x, y) is then fitted to the locus with clipping, so a PSF that widens across the image
    keeps its stars, and sources within ``width`` (or 3 sigma of the scatter) of the plane are kept.
    """
    sigmas = np.asarray(sigmas, float)
    logs = np.log(np.where(sigmas > 0, sigmas, np.nan))
    ok = np.isfinite(logs) & (sigmas >= SHARPEST_PSF_SIGMA)
    if ok.sum() < 3:
        return ok
    srt = np.sort(logs[ok])
    counts = np.searchsorted(srt, srt + 2 * width, side="right") - np.arange(len(srt))
    need = max(3, int(math.ceil(min_fraction * ok.sum())))
    start = int(np.argmax(counts >= need)) if (counts >= need).any() else int(np.argmax(counts))
    # climb to the local mode: the envelope found may be the lower tail of a broad (noisy, crowded) locus
    while True:
        ahead = np.nonzero((srt >= srt[start]) & (srt <= srt[start] + width))[0]
        best = int(ahead[np.argmax(counts[ahead])])
        if counts[best] <= counts[start]:
            break
        start = best
    centre = float(np.median(srt[start : start + counts[start]]))
    keep = ok & (np.abs(logs - centre) < width)
    design = np.column_stack([np.ones_like(x), x - np.mean(x), y - np.mean(y)])
    resid = np.where(ok, logs - centre, np.inf)
    spread = width / 3
    for _ in range(5):
        if keep.sum() <= 3:
            break
        coef, *_ = np.linalg.lstsq(design[keep], logs[keep], rcond=None)
        resid = np.where(ok, logs - design @ coef, np.inf)
        spread = max(1.4826 * np.median(np.abs(resid[keep])), 0.01)
        band = min(width, max(3 * spread, 0.03))
        upper = upper_sigmas if keep.sum() >= 20 else 3.0  # a one-sided trim needs a well-measured scatter
        keep = (resid > -band) & (resid < min(band, max(upper * spread, 0.03)))
    return keep


def locus_stars(exposure, sigma: float, min_snr: float, max_candidates: int = 600, min_stars: int = 5,
                radius_pix: int | None = None) -> StarCandidates:
    """Clean, round, (where enough) isolated sources on the stellar locus, found with a filter of ``sigma``."""
    stars = find_stars(exposure, sigma, min_snr, radius_pix, max_candidates=max_candidates)
    stars = stars.select(stars.clean)
    stars = stars.select(stars.ellipticity < np.median(stars.ellipticity) + MAX_EXTRA_ELLIPTICITY)
    if stars.isolated.sum() >= 2 * min_stars:
        stars = stars.select(stars.isolated)
    # an undersampled star's measured size depends on where it falls on its pixel: trimming the locus from
    # above would keep only stars centred on a pixel, and bias the PSF built from them
    sampled = sigma * FWHM_PER_SIGMA >= 3.0
    return stars.select(stellar_locus(stars.sigma, stars.x, stars.y, width=0.08 if sampled else 0.15,
                                      upper_sigmas=UPPER_SIGMAS if sampled else 5.0))


def select_psf_stars(exposure, min_snr: float = 30.0, max_stars: int = 300,
                     min_stars: int = 5) -> StarCandidates:
    """Clean, round, (where enough) isolated sources on the stellar locus, brightest first.

    Found twice: with a 2-px filter, then with a filter of the locus' size. The S/N cut is halved
    when too few stars are bright enough.
    """
    sigma_guess = 2.0
    chosen = StarCandidates(*np.zeros((6, 0)), np.zeros(0, bool), np.zeros(0, bool))
    for snr_cut in (min_snr, min_snr / 2):
        for _ in range(2):
            stars = locus_stars(exposure, sigma_guess, snr_cut, max(600, 2 * max_stars), min_stars,
                                max(5, int(math.ceil(4 * sigma_guess))))
            if len(stars) < min_stars:
                break
            chosen = stars.select(np.arange(min(len(stars), max_stars)))
            sigma_guess = float(np.median(chosen.sigma))
        if len(chosen) >= min_stars:
            break
    return chosen
