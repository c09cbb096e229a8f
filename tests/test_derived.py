"""Values derived from an exposure's pixels (sky, stars, planes) are computed once and forgotten when the
pixels change; the shortcuts taken for speed give the same numbers as the direct computation."""

import dataclasses

import numpy as np
import pytest
from scipy import fft

from dialab.background import SKY_BAD_PLANES, estimate_background, sky_background
from dialab.imageops import ROW_BLOCK, fft_convolve, padded_rfft2
from dialab.injection import inject_fakes
from dialab.psf import GaussianPsf
from dialab.stars import find_stars
from dialab.subtraction.kernel_fit import spread_over_cells

from .conftest import make_exposure


def _field(seed=0, shape=(256, 320), n=60):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 5.0, shape)
    psf = GaussianPsf(sigma_pix=1.8)
    for x, y, f in zip(rng.uniform(20, shape[1] - 20, n), rng.uniform(20, shape[0] - 20, n), 10 ** rng.uniform(3, 4.5, n)):
        ix, iy = int(x), int(y)
        image[iy - 10 : iy + 11, ix - 10 : ix + 11] += f * psf.draw(x - ix, y - iy, 21)
    return make_exposure(image + 100.0, 25.0)


def test_sky_is_computed_once_and_forgotten_when_pixels_change():
    exp = _field()
    first = sky_background(exp)
    assert sky_background(exp) is first  # the same object: not recomputed
    np.testing.assert_array_equal(first.level, estimate_background(exp.image, exp.plane(*SKY_BAD_PLANES)).level)
    exp.set_plane("BAD", np.zeros(exp.shape, bool) | (np.arange(exp.shape[1]) < 5)[None, :])
    assert sky_background(exp) is not first  # a plane set: the mask's state changed
    second = sky_background(exp)
    exp.image = exp.image + 50.0  # new pixels (steps assign new arrays)
    assert sky_background(exp) is not second
    assert np.median(sky_background(exp).level) == pytest.approx(150.0, abs=1.0)


def test_star_search_is_shared_and_matches_a_fresh_search():
    exp = _field(1)
    stars = find_stars(exp, 1.8, 20.0)
    again = find_stars(exp, 1.8, 20.0)
    np.testing.assert_array_equal(stars.x, again.x)
    fewer = find_stars(exp, 1.8, 50.0, max_candidates=5)  # a prefix of the same measurements
    assert len(fewer) <= 5 and set(np.round(fewer.x, 6)) <= set(np.round(stars.x, 6))
    fresh = find_stars(_field(1), 1.8, 50.0, max_candidates=5)  # another exposure: nothing shared
    np.testing.assert_array_equal(fresh.x, fewer.x)
    assert abs(np.median(stars.sigma) - 1.8) < 0.15


def test_injection_keeps_the_images_stars_and_no_fake_becomes_a_star():
    exp = _field(2)
    exp.psf, exp.gain = GaussianPsf(sigma_pix=1.8), 1.0
    stars = find_stars(exp, 1.8, 20.0, max_candidates=10)
    fx, fy = np.array([60.5, 200.5, 150.5]), np.array([60.5, 100.5, 200.5])
    injected = inject_fakes(exp, fx, fy, np.full(3, 3e4), seed=1)
    del exp  # the stars still to be measured are measured on the injected pixels
    kept = find_stars(injected, 1.8, 20.0)  # more than were measured before the injection
    np.testing.assert_array_equal(kept.x[: len(stars)], stars.x)
    fresh = find_stars(dataclasses.replace(injected), 1.8, 20.0)  # the same pixels searched anew: the fakes are peaks
    for found, has_fakes in ((kept, False), (fresh, True)):
        nearest = np.hypot(found.x[:, None] - fx[None], found.y[:, None] - fy[None]).min(axis=0)
        assert (nearest < 1.0).all() == has_fakes


def test_injection_keeps_the_images_sky_and_bright_fakes_would_have_moved_it():
    """The injected copy's sky is its source's (fakes are sources, not sky); estimated anew on the injected
    pixels, bright fakes move the cells they sit in (their clipped medians: by a few hundredths of the noise)."""
    exp = _field(3)
    exp.psf, exp.gain = GaussianPsf(sigma_pix=1.8), 1.0
    sky = sky_background(exp)
    rng = np.random.default_rng(5)
    fx, fy = rng.uniform(20, 300, 60), rng.uniform(20, 236, 60)
    injected = inject_fakes(exp, fx, fy, np.full(60, 1e5), seed=1)
    assert sky_background(injected) is sky
    fresh = estimate_background(injected.image, injected.plane(*SKY_BAD_PLANES))
    assert np.max(np.abs(fresh.level - sky.level)) > 0.1  # a fresh estimate would take some fake light as sky
    bare = _field(3)
    bare.psf, bare.gain = exp.psf, exp.gain
    not_yet = inject_fakes(bare, fx, fy, np.full(60, 1e5), seed=1)  # nothing known before: estimated anew
    np.testing.assert_array_equal(sky_background(not_yet).level, fresh.level)


def test_transform_made_by_row_blocks_is_the_full_transform():
    kernel = np.random.default_rng(2).normal(size=(35, 35)).astype(np.float32)
    np.testing.assert_array_equal(padded_rfft2(kernel, (300, 260), 1), fft.rfft2(kernel, s=(300, 260), workers=1))
    large = np.random.default_rng(5).normal(size=(2 * ROW_BLOCK + 11, 100)).astype(np.float32)  # several blocks
    np.testing.assert_array_equal(padded_rfft2(large, (600, 130), 1), fft.rfft2(large, s=(600, 130), workers=1))
    image = np.random.default_rng(3).normal(size=(120, 90)).astype(np.float32)
    small = np.outer(np.hanning(7), np.hanning(7)).astype(np.float32)
    direct = np.zeros_like(image)  # 'same' convolution with zero padding, by brute force
    padded = np.pad(image, 3)
    for dy in range(7):
        for dx in range(7):
            direct += small[6 - dy, 6 - dx] * padded[dy : dy + 120, dx : dx + 90]
    np.testing.assert_allclose(fft_convolve(image, small, 1), direct, atol=1e-4)


def test_candidates_are_spread_over_the_image_brightest_of_each_cell_first():
    rng = np.random.default_rng(4)
    # ranked best first; the 50 best all in one corner
    x = np.r_[rng.uniform(0, 100, 50), rng.uniform(0, 1000, 150)]
    y = np.r_[rng.uniform(0, 100, 50), rng.uniform(0, 1000, 150)]
    chosen = spread_over_cells(x, y, (1000, 1000), 40)
    assert len(chosen) == 40 and np.all(np.diff(chosen) > 0)  # ranked order kept
    assert (chosen < 50).sum() <= 4  # the corner cell gives its share, not all of the 40
    cells = set(zip((y[chosen] * 3 // 1000).astype(int), (x[chosen] * 3 // 1000).astype(int)))
    assert len(cells) == 9  # spread: every ninth of the image holds some (the selection grid is 4 x 4)
    assert set(spread_over_cells(x, y, (1000, 1000), 500)) == set(range(200))
