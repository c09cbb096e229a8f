"""The sky background of images of any shape: a known sky (a plane plus white noise) is recovered."""

import numpy as np
import pytest

from dialab.background import estimate_background


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
