"""Image primitives against their direct definitions: block sums, valid correlations, masked interpolation,
blockwise convolutions and lazily weighted planes."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.signal import fftconvolve

from dialab.imageops import (
    CONVOLUTION_BAND,
    ROW_BLOCK,
    PlaneSum,
    SplineGrid,
    block_sum,
    box_reduce,
    correlate_valid,
    fft_convolve_sum,
    find_peaks,
    gaussian_filtered_snr,
    grid_spline,
    interpolate_masked,
)


def test_block_sum_is_the_sum_over_each_block():
    a = np.random.default_rng(1).normal(size=(12, 20)).astype(np.float32)
    expected = a.reshape(3, 4, 5, 4).sum(axis=(1, 3))
    assert np.allclose(block_sum(a, 4), expected, rtol=1e-6, atol=1e-5)


def test_correlate_valid_is_the_direct_sum_for_every_lag():
    rng = np.random.default_rng(2)
    a, w = rng.random((37, 41)), rng.random((15, 19))
    direct = np.einsum("abij,ij->ab", sliding_window_view(a, w.shape), w)
    assert correlate_valid(a, w).shape == direct.shape == (23, 23)
    assert np.allclose(correlate_valid(a, w), direct, rtol=1e-12, atol=1e-10)


def test_filling_only_some_masked_pixels_gives_them_the_same_values_and_leaves_the_rest():
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 5.0, (120, 160)).astype(np.float32)
    masked = np.zeros(image.shape, bool)
    masked[:, 60] = True  # a bad column...
    masked[40, 62] = masked[41, 62] = True  # ...with a cosmic ray beside it
    masked[90, 130] = True  # and one far from anything
    rays = np.zeros(image.shape, bool)
    rays[40, 62] = rays[41, 62] = rays[90, 130] = True
    everything = interpolate_masked(image, masked, 1.5)
    some = interpolate_masked(image, masked, 1.5, only=rays)
    assert np.array_equal(some[rays], everything[rays])  # the column still gives no weight to its neighbour
    assert np.array_equal(some[~rays], image[~rays])  # the column itself is left as it was
    assert not np.array_equal(everything[:, 60], image[:, 60])


def test_convolution_sum_made_by_row_blocks_is_the_weighted_sum_of_direct_convolutions():
    """Rows across several bands (seams included, the last band short), a non-square image, spatial weights per
    kernel: the same as scipy's convolutions weighted by the outer products, to float32 precision."""
    rng = np.random.default_rng(4)
    image = rng.normal(size=(2 * CONVOLUTION_BAND + 37, 301)).astype(np.float32)
    kernels = rng.normal(size=(3, 35, 35))
    factors = [(rng.random(image.shape[0]).astype(np.float32), rng.random(image.shape[1]).astype(np.float32))
               for _ in kernels]
    direct = sum(r[:, None] * c[None, :] * fftconvolve(image.astype(float), k, mode="same")
                 for k, (r, c) in zip(kernels, factors))
    blockwise = fft_convolve_sum(image, kernels, factors, workers=1)
    assert blockwise.dtype == np.float32 and blockwise.shape == image.shape
    assert np.abs(blockwise - direct).max() < 2e-5 * np.abs(direct).max()
    # in place: each band's halo rows are read as they were before the band above was written over them
    in_place = image.copy()
    assert fft_convolve_sum(in_place, kernels, factors, workers=1, out=in_place) is in_place
    assert np.array_equal(in_place, blockwise)


def test_plane_sum_reads_every_window_and_the_whole_plane_as_the_explicit_sum():
    rng = np.random.default_rng(5)
    a, b = rng.random((ROW_BLOCK + 50, 70)).astype(np.float32), rng.random((ROW_BLOCK + 50, 70)).astype(np.float32)
    scaled = PlaneSum((a, 1.3))
    total = PlaneSum((scaled, 0.25), (b, 1.0))  # a term may itself be a sum
    explicit = (a * np.float32(1.3)) * np.float32(0.25) + b
    assert np.array_equal(total.full(), explicit) and np.array_equal(np.asarray(total), explicit)
    assert np.array_equal(total[10:20, 5:9], explicit[10:20, 5:9])
    chosen = a > 0.5
    assert np.array_equal(total[chosen], explicit[chosen])
    assert total.shape == a.shape


def test_spline_grid_rows_are_the_splines_own_grid_evaluation():
    """Sparse design matrices, a block of rows at a time: FITPACK's values on the same grid, cubic and (for an axis
    of three points) quadratic."""
    rng = np.random.default_rng(6)
    for gy in (np.linspace(0, 499, 9), np.linspace(0, 499, 3)):
        gx = np.linspace(0, 299, 7)
        spline = grid_spline(gy, gx, rng.normal(size=(len(gy), len(gx))))
        xs, ys = np.arange(300.0), np.arange(120.0, 260.0)
        assert np.allclose(SplineGrid(spline, xs).rows(ys), spline(ys, xs), rtol=0, atol=1e-12)


def test_filtered_snr_made_by_row_bands_is_the_one_pass_filter_of_the_sky_subtracted_image():
    """The bands' seams (every 2 ROW_BLOCK rows) must not show: each band is filtered with the kernel's reach of
    rows round it, so every pixel is the same sum as in one full-image pass; bad pixels count as zero."""
    rng = np.random.default_rng(5)
    ny, nx, sigma = 2 * ROW_BLOCK * 2 + 37, 90, 2.7
    image = rng.normal(size=(ny, nx)).astype(np.float32)
    sky = np.full((ny, nx), 0.25, np.float32)
    bad = rng.random((ny, nx)) < 0.01
    got = gaussian_filtered_snr(PlaneSum((image, 1.0), (sky, -1.0)), 1.0, sigma, bad)
    direct = ndimage.gaussian_filter(np.where(bad, 0, image - sky), sigma, mode="constant", truncate=4.0)
    assert np.array_equal(got, direct / np.sqrt(np.float32(1.0 / (4 * np.pi * sigma**2))))


def test_dense_peak_search_by_row_bands_finds_the_full_image_box_maxima():
    """Above the dense limit (5% of the pixels over threshold) the local maxima are found a band of rows at a
    time; a peak on a band's seam must be found once, as by one full-image box maximum."""
    rng = np.random.default_rng(6)
    snr = ndimage.gaussian_filter(rng.normal(size=(3 * ROW_BLOCK + 11, 70)), 1.5).astype(np.float32) * 20
    y, x = find_peaks(snr, 0.5, 2)
    assert (snr > 0.5).mean() > 0.05  # the banded path
    full = box_reduce(snr, 2, np.maximum)
    ey, ex = np.nonzero((snr > 0.5) & (snr == full))
    assert len(y) > 50 and set(zip(y.tolist(), x.tolist())) == set(zip(ey.tolist(), ex.tolist()))
    assert np.all(np.diff(snr[y, x]) <= 0)  # highest first


def test_a_plateau_of_equal_maxima_is_one_peak_in_sparse_and_dense_searches():
    """Two or three neighbouring pixels of one source with the same filtered S/N (seen on a real star) are one
    peak, the first in raster order; distinct maxima farther apart than the separation stay two."""
    yy, xx = np.mgrid[0:40, 0:50]
    for dense in (False, True):  # few pixels over threshold, then more than 5% (the banded path)
        snr = (1.0 + 0.001 * (xx + 50 * yy) if dense else np.zeros((40, 50))).astype(np.float32)  # its peak: a corner
        snr[10, 10] = snr[10, 11] = snr[11, 10] = 30.0  # one source's plateau
        snr[25, 30] = snr[26, 29] = 20.0  # diagonal neighbours, equal
        snr[30, 40] = snr[30, 45] = 10.0  # two sources, 5 px apart
        y, x = find_peaks(snr, 0.5, 2)
        assert list(zip(y.tolist(), x.tolist())) == [(10, 10), (25, 30), (30, 40), (30, 45)] + [(39, 49)] * dense
