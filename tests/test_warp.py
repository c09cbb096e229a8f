"""Warping: a field rendered on WCS A and warped to WCS B matches the field rendered directly on B."""

import galsim
import numpy as np
import pytest

from dialab import warp
from dialab.exposure import Exposure
from dialab.psf import MoffatPsf
from dialab.simulate.observe import tan_wcs
from dialab.simulate.render import draw_point_sources
from dialab.warp import measure_offset, shift_exposure, warp_exposure

SHAPE = (300, 300)


def _render(wcs, world, flux):
    pix = wcs.all_world2pix(world, 0)
    psf = galsim.Moffat(beta=3.0, fwhm=4.0)
    return draw_point_sources(SHAPE, pix[:, 0], pix[:, 1], flux, lambda a, b: psf)


def test_warp_matches_direct_rendering_and_places_masks(monkeypatch):
    rng = np.random.default_rng(2)
    a = tan_wcs(SHAPE, 0.2, 150.0, 2.0)
    b = tan_wcs(SHAPE, 0.2, 150.0, 2.0, rotation_deg=1.0, shift_pix=(6.4, -3.7))
    xy = rng.uniform(40, 260, (40, 2))
    world = a.all_pix2world(xy, 0)
    flux = rng.uniform(1e3, 1e4, 40)
    on_a = _render(a, world, flux)
    on_b = _render(b, world, flux)
    exp = Exposure(on_a, np.zeros(SHAPE, np.int32), np.ones(SHAPE), psf=MoffatPsf(fwhm_pix=4.0), wcs=a)
    exp.set_plane("BAD", np.broadcast_to(np.arange(SHAPE[1]) == 150, SHAPE))
    warped = warp_exposure(exp, b, SHAPE)
    inner = np.zeros(SHAPE, bool)
    inner[30:-30, 30:-30] = True
    assert warped.image[inner].sum() == pytest.approx(on_b[inner].sum(), rel=0.005)
    assert np.abs(warped.image - on_b)[inner].max() < 0.02 * on_b.max()
    # the bad column lands where WCS B puts source column 150
    bad_b = warped.plane("BAD")
    col_world = a.all_pix2world(np.column_stack([np.full(10, 150.0), np.linspace(50, 250, 10)]), 0)
    px = b.all_world2pix(col_world, 0)
    assert all(bad_b[int(round(y)), int(round(x))] for x, y in px)
    # uncovered corners are NO_DATA
    nodata = warped.plane("NO_DATA")
    assert nodata.any() and not nodata[inner].any()
    assert warped.psf.fwhm == pytest.approx(4.0, rel=0.03)
    # resampled a strip of rows at a time: where the strips end does not matter
    monkeypatch.setattr(warp, "STRIP_ROWS", 7)
    strips = warp_exposure(exp, b, SHAPE)
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(strips, name), getattr(warped, name), err_msg=name)


def test_frames_without_wcs_register_by_star_offset():
    rng = np.random.default_rng(4)
    xy = rng.uniform(30, 270, (60, 2))
    flux = rng.uniform(2e3, 2e4, 60)
    psf = galsim.Moffat(beta=3.0, fwhm=3.5)
    ref = draw_point_sources(SHAPE, xy[:, 0], xy[:, 1], flux, lambda a, b: psf) + rng.normal(0, 1, SHAPE)
    moved = draw_point_sources(SHAPE, xy[:, 0] + 12.3, xy[:, 1] - 7.6, flux, lambda a, b: psf)
    moved += rng.normal(0, 1, SHAPE)
    e_ref = Exposure(ref, np.zeros(SHAPE, np.int32), np.ones(SHAPE))
    e_moved = Exposure(moved, np.zeros(SHAPE, np.int32), np.ones(SHAPE))
    dx, dy = measure_offset(e_moved, e_ref)
    assert dx == pytest.approx(12.3, abs=0.05) and dy == pytest.approx(-7.6, abs=0.05)
    back = shift_exposure(e_moved, dx, dy)
    inner = (slice(40, -40), slice(40, -40))
    assert np.std((back.image - ref)[inner]) < 2.0


@pytest.mark.parametrize("shape", [(64, 400), (400, 64)])
def test_thin_images_warp(shape):
    """A few rows of mapping nodes along one axis (a lower spline degree there): a smooth field warped by a
    rotation and a shift lands where the WCSs put it."""
    ny, nx = shape
    src_wcs = tan_wcs(shape, 0.2, 150.0, 2.0, rotation_deg=1.0)
    dst_wcs = tan_wcs(shape, 0.2, 150.0, 2.0, shift_pix=(3.3, -2.1))
    yy, xx = np.mgrid[0:ny, 0:nx]
    field = lambda x, y: 100.0 + 0.1 * x + 0.2 * y  # noqa: E731 (linear: reproduced exactly by the cubic spline)
    src = Exposure(image=field(xx, yy).astype(np.float32), mask=np.zeros(shape, np.int32),
                   variance=np.ones(shape, np.float32), wcs=src_wcs)
    out = warp_exposure(src, dst_wcs, shape)
    back = src_wcs.all_world2pix(dst_wcs.all_pix2world(np.column_stack([xx.ravel(), yy.ravel()]), 0), 0)
    expected = field(back[:, 0], back[:, 1]).reshape(shape)
    inner = ~out.plane("NO_DATA") & (back[:, 0].reshape(shape) > 3) & (back[:, 0].reshape(shape) < nx - 4) \
        & (back[:, 1].reshape(shape) > 3) & (back[:, 1].reshape(shape) < ny - 4)
    assert inner.mean() > 0.6
    assert np.abs(out.image - expected)[inner].max() < 1e-3


def test_a_template_whose_wcs_misses_the_science_is_a_named_error_before_any_psf_is_measured():
    """A degree away: the warped template is all NO_DATA, and that is said, naming both files (a PSF measurement
    of the empty image used to fail first, with 'only 0 usable stars')."""
    from dialab.errors import NoOverlapError

    rng = np.random.default_rng(2)
    science = Exposure(rng.normal(size=SHAPE).astype(np.float32), np.zeros(SHAPE, np.int32), np.ones(SHAPE),
                       wcs=tan_wcs(SHAPE, 0.2, 150.0, 2.0), path="science.fits")
    template = Exposure(rng.normal(size=SHAPE).astype(np.float32), np.zeros(SHAPE, np.int32), np.ones(SHAPE),
                        wcs=tan_wcs(SHAPE, 0.2, 151.0, 2.0), path="template.fits")
    with pytest.raises(NoOverlapError, match="template.fits does not overlap science.fits"):
        warp.align_to(template, science)
