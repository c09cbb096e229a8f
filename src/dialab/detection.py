"""Finding sources: smoothing with a PSF-like filter, thresholding and peaks.

This module holds the shared machinery (peaks above a S/N threshold in a filtered image). It is
used for stars (PSF measurement, kernel candidates) and, through detect_sources, for diaSources.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def gaussian_filtered_snr(image: np.ndarray, noise_rms: np.ndarray | float, sigma_pix: float,
                          bad: np.ndarray | None = None) -> np.ndarray:
    """S/N of a Gaussian matched filter: (image * g) / sqrt(var * g^2), with var = rms^2.

    The filter is normalised so that for a point source of the filter's shape this is the
    optimal (PSF-fit) S/N.
    """
    data = np.where(bad, 0.0, image) if bad is not None else image
    smoothed = ndimage.gaussian_filter(data.astype(np.float32), sigma_pix, mode="constant", truncate=4.0)
    g2_scale = 1.0 / (4.0 * np.pi * sigma_pix**2)
    rms = np.asarray(noise_rms, dtype=np.float32)
    if rms.ndim == 0:
        return smoothed / (rms * np.float32(np.sqrt(g2_scale)))
    # Convolving the variance with g^2 (a Gaussian of sigma/sqrt(2), scaled) gives the filtered variance.
    filt_var = ndimage.gaussian_filter(rms**2, sigma_pix / np.sqrt(2.0), mode="nearest", truncate=3.0) * g2_scale
    return smoothed / np.sqrt(np.maximum(filt_var, 1e-30))


def find_peaks(snr: np.ndarray, threshold: float, min_separation_pix: int = 2,
               exclude: np.ndarray | None = None, border_pix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) integer positions of local maxima of ``snr`` above ``threshold``."""
    size = 2 * int(min_separation_pix) + 1
    local_max = snr == ndimage.maximum_filter(snr, size=size, mode="nearest")
    peaks = local_max & (snr > threshold)
    if exclude is not None:
        peaks &= ~exclude
    if border_pix > 0:
        peaks[:border_pix] = peaks[-border_pix:] = False
        peaks[:, :border_pix] = peaks[:, -border_pix:] = False
    y, x = np.nonzero(peaks)
    order = np.argsort(-snr[y, x])
    return y[order], x[order]
