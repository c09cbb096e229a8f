"""The sky background of images of any shape: a known sky (a plane plus white noise) is recovered."""

import numpy as np
import pytest

from dialab.background import _bound, clipped_stats, estimate_background, sky_subtracted
from dialab.imageops import stamp_index


@pytest.mark.parametrize("shape", [(150, 600), (600, 150), (200, 300), (1000, 130)])
def test_sky_plane_of_thin_and_small_images(shape):
    """The mesh has 2-3 cells along the short axis (a lower spline degree there than along the long axis): the
    sky is recovered between the outermost cell centres, within the mesh medians' noise (0.2) and, in the
    corners, the 3x3 median filter's step of one cell (up to 1)."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = 100.0 + 4.0 * xx / nx - 3.0 * yy / ny
    image = (sky + np.random.default_rng(3).normal(0.0, 5.0, shape)).astype(np.float32)
    bg = estimate_background(image)
    cy, cx = 0.5 * ny / round(ny / 64), 0.5 * nx / round(nx / 64)  # the outermost cell centres' distance from the edge
    inner = (slice(int(cy), int(ny - cy)), slice(int(cx), int(nx - cx)))
    err = np.abs(bg.level - sky)[inner]
    assert np.median(err) < 0.25
    assert err.max() < 1.2
    assert np.median(bg.rms_grid) == pytest.approx(5.0, rel=0.05)


def test_a_released_sky_is_evaluated_again_to_the_same_pixels():
    """A subtraction drops each image's full-resolution sky once its last reader is done: the mesh stays, and the
    next reader gets the same plane back, not another estimate."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:300, :420]
    image = (50 + 0.02 * xx - 0.03 * yy + rng.normal(0, 3, yy.shape)).astype(np.float32)
    sky = estimate_background(image)
    level, rms = sky.level.copy(), sky.rms.copy()
    sky.release()
    assert "level" not in vars(sky) and "rms" not in vars(sky)
    assert np.array_equal(sky.level, level) and np.array_equal(sky.rms, rms)
    inner = np.s_[40:-40, 40:-40]  # between the outermost mesh cells' centres (held constant beyond them)
    assert np.abs(level - (50 + 0.02 * xx - 0.03 * yy))[inner].max() < 1.0  # and it is the sky


def test_a_released_sky_read_in_windows_is_its_full_plane():
    """Once released, the sky is read from its mesh where it is read (slices, row blocks, stamps, scattered
    pixels): the same float32 values as the full plane, so measurements on windows do not move."""
    rng = np.random.default_rng(8)
    ny, nx = 700, 513
    image = (rng.normal(size=(ny, nx)) + np.linspace(0, 5, nx)[None, :] + np.linspace(0, 3, ny)[:, None]).astype(
        np.float32)
    bg = estimate_background(image, None, 64)
    full = bg.level.copy()
    bg.release()
    windows = bg.level_windows()
    assert "level" not in bg.__dict__  # no full plane made
    at, _ = stamp_index(np.array([10, 300, 500]), np.array([20, 400, 690]), 7, (ny, nx))
    iy, ix = rng.integers(0, ny, 1000), rng.integers(0, nx, 1000)
    for key in (np.s_[100:200, 30:90], np.s_[5:9], at, (iy, ix)):
        assert np.array_equal(windows[key], full[key])
    assert np.array_equal(sky_subtracted(image, bg)[at], (image - full)[at])


def test_clipped_stats_of_float32_values_are_those_of_their_float64_copies():
    """The clipping bounds (float64) are searched for in the sorted float32 values without converting them: each
    bound rounded outward to float32 counts exactly the same values, ties at the bounds included."""
    rng = np.random.default_rng(9)
    for _ in range(20):
        values = np.round(rng.standard_t(3, 5000) * 8).astype(np.float32) / 8  # many ties
        m32, s32 = clipped_stats(values)
        m64, s64 = clipped_stats(values.astype(np.float64))
        assert m32 == m64 and s32 == s64
        copy = values.copy()
        assert clipped_stats(copy, overwrite=True) == (m32, s32) and np.all(np.diff(copy[np.isfinite(copy)]) >= 0)


def test_bounds_rounded_outward_count_the_float32_values_as_their_float64_originals():
    """The adversarial case for the search above: bounds a hair above or below a value (or on it)."""
    rng = np.random.default_rng(10)
    values = np.sort(rng.normal(size=2000).astype(np.float32))
    picks = values[::37].astype(np.float64)
    for bound in np.concatenate([picks, picks * (1 + 1e-12), picks * (1 - 1e-12), picks + 1e-13]):
        assert np.searchsorted(values, _bound(bound, values.dtype, up=True), "left") == np.sum(values < bound)
        assert np.searchsorted(values, _bound(bound, values.dtype, up=False), "right") == np.sum(values <= bound)
