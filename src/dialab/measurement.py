"""Measuring sources on images: forced PSF photometry (more measurements come with detection)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .exposure import Exposure


def forced_psf_flux(exp: Exposure, x: np.ndarray, y: np.ndarray, size: int | None = None) -> pd.DataFrame:
    """Linear PSF fit at fixed positions: flux = sum(P D / V) / sum(P^2 / V), error 1 / sqrt(sum(P^2 / V)).

    Unusable pixels (BAD, SAT, NO_DATA, EDGE) carry no weight; a source with no usable pixel gets NaN.
    On a score image (header SCORE = True: already the PSF-filtered difference, with correlated
    noise) the matched filter has been applied, so the flux is the score at the position divided by
    the score PSF's value there, and the error is sqrt(variance) scaled the same way.
    """
    psf = exp.psf
    if psf is None:
        raise ValueError("forced photometry needs the exposure's PSF")
    size = size or min(psf.default_size, 31)
    h = size // 2
    full = psf.default_size
    o = (full - size) // 2 if full > size else 0
    ny, nx = exp.shape
    bad = exp.unusable
    flux = np.full(len(x), np.nan)
    err = np.full(len(x), np.nan)
    score = bool(exp.header.get("SCORE", False))
    for i, (xi, yi) in enumerate(zip(np.asarray(x, float), np.asarray(y, float))):
        ix, iy = int(round(xi)), int(round(yi))
        if score:
            if 0 <= ix < nx and 0 <= iy < ny and not bad[iy, ix]:
                peak = psf.draw(xi - ix, yi - iy, None, x=xi, y=yi)[full // 2, full // 2]
                flux[i] = exp.image[iy, ix] / peak
                err[i] = np.sqrt(exp.variance[iy, ix]) / peak
            continue
        x0, x1, y0, y1 = max(ix - h, 0), min(ix + h + 1, nx), max(iy - h, 0), min(iy + h + 1, ny)
        if x0 >= x1 or y0 >= y1:
            continue
        # The fit window is cropped from the full, unit-sum model: fluxes are totals, not window sums.
        model = psf.draw(xi - ix, yi - iy, None, x=xi, y=yi)
        model = model[o : o + size, o : o + size] if full > size else np.pad(model, (size - full) // 2)
        p = model[y0 - iy + h : y1 - iy + h, x0 - ix + h : x1 - ix + h]
        w = np.where(bad[y0:y1, x0:x1], 0.0, 1.0 / np.maximum(exp.variance[y0:y1, x0:x1], 1e-30))
        denom = float((p * p * w).sum())
        if denom > 0:
            flux[i] = float((p * exp.image[y0:y1, x0:x1] * w).sum()) / denom
            err[i] = 1.0 / np.sqrt(denom)
    return pd.DataFrame({"psfFlux": flux, "psfFluxErr": err})
