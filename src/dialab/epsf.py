"""An oversampled effective PSF from undersampled stars (Anderson & King 2000).

When the FWHM is near two pixels (JWST NIRCam short wavelengths, HST, Euclid VIS) a star's pixels sample the
profile too coarsely to be shifted by interpolation: recentring every star with a spline and stacking them
broadens the PSF by 15-20%. Instead every pixel of every star is placed, by its offset from the star's centre,
on a grid ``oversample`` times finer than the pixels; the median per fine cell is the effective PSF (pixel
response included), and the centres and fluxes are refitted against it a few times.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize
from scipy.stats import binned_statistic_2d

#: Below this FWHM (pixels, as measured by stacking, which broadens undersampled stars) the stars are treated
#: as undersampled.
UNDERSAMPLED_FWHM = 3.0


def _fine_value(fine: np.ndarray, oversample: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """The oversampled PSF (centre at the middle cell) at pixel offsets (dx, dy), cubic interpolation."""
    c = (fine.shape[0] - 1) / 2
    return ndimage.map_coordinates(fine, [c + dy * oversample, c + dx * oversample], order=3, mode="constant")


def _stack(cuts, centres, fluxes, half: int, oversample: int) -> np.ndarray:
    """Median of all stars' normalised pixels per fine cell, gaps filled from their neighbours, lightly smoothed."""
    n_fine = (2 * half + 1) * oversample
    edges = (np.arange(n_fine + 1) - n_fine / 2) / oversample
    dxs, dys, vals = [], [], []
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    for cut, (cx, cy), f in zip(cuts, centres, fluxes):
        dxs.append((xx - cx).ravel())
        dys.append((yy - cy).ravel())
        vals.append((cut / f).ravel())
    fine = binned_statistic_2d(np.concatenate(dys), np.concatenate(dxs), np.concatenate(vals), "median",
                               bins=[edges, edges]).statistic
    empty = ~np.isfinite(fine)
    if empty.any():
        idx = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
        fine = fine[tuple(idx)]
    return fine


def _refit(cut: np.ndarray, fine: np.ndarray, oversample: int, start: tuple[float, float, float], half: int):
    """Centre (relative to the cut's middle pixel) and flux of one star against the current PSF."""
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]

    def resid(p):
        return (p[2] * _fine_value(fine, oversample, xx - p[0], yy - p[1]) - cut).ravel()

    fit = optimize.least_squares(resid, start, x_scale=[0.1, 0.1, max(abs(start[2]), 1e-12)], max_nfev=50)
    cx, cy, f = fit.x
    return (cx, cy, f) if abs(cx) < 1.5 and abs(cy) < 1.5 and f > 0 else start


def oversampled_psf_stamp(image: np.ndarray, xs, ys, size: int, oversample: int = 4, iterations: int = 3
                          ) -> np.ndarray:
    """Pixel-sampled effective PSF (odd ``size``, sum 1) of the stars at (xs, ys) on a background-free image,
    built on a grid ``oversample`` times finer than the pixels."""
    half = size // 2
    ny, nx = image.shape
    cuts, centres, fluxes = [], [], []
    core = np.hypot(*np.mgrid[-half : half + 1, -half : half + 1]) <= max(half / 2, 2)
    for x, y in zip(xs, ys):
        ix, iy = int(round(x)), int(round(y))
        if half <= ix < nx - half and half <= iy < ny - half:
            cut = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(float)
            if np.isfinite(cut).all() and cut[core].sum() > 0:
                cuts.append(cut)
                centres.append((x - ix, y - iy))
                fluxes.append(cut[core].sum())
    fine = _stack(cuts, centres, fluxes, half, oversample)
    for _ in range(iterations):
        fits = [_refit(c, fine, oversample, (cx, cy, f), half) for c, (cx, cy), f in zip(cuts, centres, fluxes)]
        centres = [(cx, cy) for cx, cy, _ in fits]
        fluxes = [f for _, _, f in fits]
        fine = _stack(cuts, centres, fluxes, half, oversample)
        # keep the model centred: its centroid defines the stars' centres
        c = (fine.shape[0] - 1) / 2
        gy, gx = ndimage.center_of_mass(np.clip(fine, 0, None))
        fine = ndimage.shift(fine, (c - gy, c - gx), order=3, mode="constant")
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    stamp = _fine_value(fine, oversample, xx.astype(float), yy.astype(float))
    return stamp / stamp.sum()
