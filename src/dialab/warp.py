"""Resampling a template onto the science pixel grid.

With WCSs on both images the template is resampled through sky coordinates (cubic-spline
interpolation, flux kept by the Jacobian of the mapping); frames without a WCS are registered
by the offset between their star lists. Masks travel with the pixels that contribute (grown by
one pixel), uncovered pixels become NO_DATA, and the PSF is transformed to the new grid.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from .errors import BadInputError, NoOverlapError
from .exposure import Exposure, MaskPlanes
from .imageops import SplineGrid, box_reduce, grid_spline
from .psf import GridPsf, ImagePsf, Psf
from .stars import find_stars, psf_filter_sigma

log = logging.getLogger(__name__)

#: Coarse-grid spacing (pixels) at which the WCS mapping is evaluated before spline interpolation.
MAPPING_STEP = 32


def same_grid(a: Exposure, b: Exposure, tol_pix: float = 1e-3) -> bool:
    """True when b's pixels are a's pixels (same shape and, if both have one, the same WCS)."""
    if a.shape != b.shape:
        return False
    if a.wcs is None or b.wcs is None:
        return True
    ny, nx = a.shape
    pts = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [nx / 2, ny / 2]], float)
    back = b.wcs.all_world2pix(a.wcs.all_pix2world(pts, 0), 0)
    return bool(np.abs(back - pts).max() < tol_pix)


class _Mapping:
    """Source pixel (xs, ys) of each destination pixel (x, y), with its Jacobian, evaluated a strip of rows at a
    time: a full-image coordinate grid (16 bytes per pixel per axis) is never held."""

    def __init__(self, shape: tuple[int, int], splines=None, grid=None, shift: tuple[float, float] = (0.0, 0.0)):
        self.shape = shape
        # splines of xs and ys over (y, x) fitted on the coarse ``grid`` (gy, gx), or a plain shift
        self.sx, self.sy = splines if splines is not None else (None, None)
        self.shift = shift
        if splines is not None:
            # |det J| is as smooth as the mapping: a spline through its values on the same coarse grid
            gy, gx = grid
            sx, sy = splines
            det = np.abs(sx(gy, gx, dy=1) * sy(gy, gx, dx=1) - sx(gy, gx, dx=1) * sy(gy, gx, dy=1))
            columns = np.arange(shape[1], dtype=float)
            self.on_rows = [SplineGrid(s, columns) for s in (sx, sy, grid_spline(gy, gx, det))]

    def rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | float]:
        """xs, ys and |det J| of destination rows y0..y1-1."""
        ay = np.arange(y0, y1, dtype=float)
        if self.sx is None:
            xs, ys = np.meshgrid(np.arange(self.shape[1], dtype=float) + self.shift[0], ay + self.shift[1])
            return xs, ys, 1.0
        return tuple(s.rows(ay) for s in self.on_rows)

    def at(self, x: float, y: float) -> tuple[float, float, np.ndarray]:
        """(xs, ys) of destination pixel (x, y) and d(source)/d(destination) there."""
        if self.sx is None:
            return x + self.shift[0], y + self.shift[1], np.eye(2)
        jac = np.array([[self.sx.ev(y, x, dy=1), self.sx.ev(y, x, dx=1)],
                        [self.sy.ev(y, x, dy=1), self.sy.ev(y, x, dx=1)]])
        return float(self.sx.ev(y, x)), float(self.sy.ev(y, x)), jac


def _mapping_from_wcs(src: Exposure, dst_wcs, dst_shape) -> _Mapping:
    """The source pixel coordinates of every destination pixel: the WCSs on a coarse grid, then splines."""
    ny, nx = dst_shape
    gx = np.unique(np.r_[np.arange(0, nx, MAPPING_STEP), nx - 1]).astype(float)
    gy = np.unique(np.r_[np.arange(0, ny, MAPPING_STEP), ny - 1]).astype(float)
    mx, my = np.meshgrid(gx, gy)
    world = dst_wcs.all_pix2world(np.column_stack([mx.ravel(), my.ravel()]), 0)
    src_pix = src.wcs.all_world2pix(world, 0)
    sx = grid_spline(gy, gx, src_pix[:, 0].reshape(mx.shape))
    sy = grid_spline(gy, gx, src_pix[:, 1].reshape(mx.shape))
    return _Mapping(dst_shape, (sx, sy), (gy, gx))


#: Destination rows resampled at a time (bounds the coordinate arrays' memory).
STRIP_ROWS = 256


def _resample(src: Exposure, mapping: _Mapping, psf: Psf | None, wcs) -> Exposure:
    ny, nx = mapping.shape
    ny_s, nx_s = src.shape
    # the cubic spline's coefficients once for the whole image (what map_coordinates would compute per call), kept
    # in float32 like the image (each line is filtered in double precision; half the memory of a float64 copy)
    nodata = src.plane("NO_DATA")
    coeffs = ndimage.spline_filter(np.where(nodata, np.float32(0), src.image) if nodata.any() else src.image, 3,
                                   output=np.float32, mode="constant")  # (a float32 copy of the image only to fill)
    del nodata
    planes = MaskPlanes(dict(src.mask_planes.bits))
    # each plane grown by one pixel (masks travel with their neighbours): OR over the 3x3 box does every bit at once
    named = np.int32(np.bitwise_or.reduce([1 << bit for bit in planes.bits.values()], initial=0))
    grown = box_reduce(src.mask & named, 1, np.bitwise_or).ravel()
    image = np.empty((ny, nx), np.float32)
    variance = np.empty((ny, nx), np.float32)
    mask = np.empty((ny, nx), np.int32)
    outside = np.empty((ny, nx), bool)
    for y0 in range(0, ny, STRIP_ROWS):
        y1 = min(y0 + STRIP_ROWS, ny)
        xs, ys, det = mapping.rows(y0, y1)
        coords = np.array([ys, xs])
        # flux per destination pixel = flux per source pixel x (source pixels per destination pixel), written in
        # place: no float64 strips
        ndimage.map_coordinates(coeffs, coords, order=3, mode="constant", cval=0.0, prefilter=False,
                                output=image[y0:y1])
        ndimage.map_coordinates(src.variance, coords, order=1, mode="nearest", output=variance[y0:y1])
        image[y0:y1] *= det
        variance[y0:y1] *= det**2
        outside[y0:y1] = (xs < -0.5) | (xs > nx_s - 0.5) | (ys < -0.5) | (ys > ny_s - 0.5)
        np.round(coords, out=coords)  # the nearest source pixel's mask
        np.clip(coords[0], 0, ny_s - 1, out=coords[0])
        np.clip(coords[1], 0, nx_s - 1, out=coords[1])
        np.take(grown, coords[0].astype(np.intp) * nx_s + coords[1].astype(np.intp), out=mask[y0:y1])
    del coeffs, grown
    if outside.any():
        mask[outside] |= np.int32(planes.bit("NO_DATA"))
        image[outside] = 0.0
        good_var = variance[~outside]
        variance[outside] = np.median(good_var) if good_var.size else 1.0
    return Exposure(image=image, mask=mask, variance=variance, psf=psf,
                    wcs=wcs, mask_planes=planes, visit=src.visit, detector=src.detector, band=src.band,
                    mjd=src.mjd, exptime=src.exptime, magzero=src.magzero, gain=src.gain,
                    saturate=src.saturate, header=src.header.copy(), path=src.path)


def _transform_stamp(stamp: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """Stamp in destination pixels: p_dst(u) = p_src(J u), renormalised."""
    c = (stamp.shape[0] - 1) / 2
    # affine_transform maps output (row, col) to input (row, col): swap J's axes to (y, x) order.
    m = np.array([[jac[1, 1], jac[1, 0]], [jac[0, 1], jac[0, 0]]])
    offset = np.array([c, c]) - m @ np.array([c, c])
    out = ndimage.affine_transform(stamp, m, offset=offset, order=3, mode="constant")
    total = out.sum()
    return out / total if total > 0 else stamp


def _transform_psf(psf: Psf | None, mapping: _Mapping) -> Psf | None:
    if psf is None:
        return None
    ny, nx = mapping.shape
    if isinstance(psf, GridPsf):
        gx = np.linspace(0, nx - 1, len(psf.grid_x) + 2)[1:-1]
        gy = np.linspace(0, ny - 1, len(psf.grid_y) + 2)[1:-1]
        stamps, cx, cy = [], [], []
        for y in gy:
            for x in gx:
                xs, ys, j = mapping.at(float(int(x)), float(int(y)))
                stamps.append(_transform_stamp(psf.stamp(x=xs, y=ys), j))
                cx.append(x)
                cy.append(y)
        return GridPsf(np.array(stamps), np.array(cx), np.array(cy))
    j = mapping.at(nx // 2, ny // 2)[2]
    if np.allclose(j, np.eye(2), atol=1e-4):
        return psf
    return ImagePsf(_transform_stamp(psf.stamp(), j))


def warp_exposure(src: Exposure, dst_wcs, dst_shape: tuple[int, int]) -> Exposure:
    """Resample ``src`` onto the pixel grid of ``dst_wcs`` (shape ``dst_shape``)."""
    if src.wcs is None or dst_wcs is None:
        raise BadInputError("both images need a WCS to warp", src.path)
    mapping = _mapping_from_wcs(src, dst_wcs, dst_shape)
    return _resample(src, mapping, _transform_psf(src.psf, mapping), dst_wcs)


def shift_exposure(src: Exposure, dx: float, dy: float, dst_shape: tuple[int, int] | None = None) -> Exposure:
    """Resample ``src`` so that its pixel (x + dx, y + dy) lands on (x, y)."""
    return _resample(src, _Mapping(dst_shape or src.shape, shift=(dx, dy)), src.psf, None)


def measure_offset(src: Exposure, dst: Exposure, max_shift_fraction: float = 0.3, n_stars: int = 300) -> tuple[float, float]:
    """(dx, dy) such that a star at (x, y) in ``dst`` is at (x + dx, y + dy) in ``src``.

    All pairwise offsets of the brightest stars vote in a 2-px histogram; pairs within 1.5 px of the
    winning offset are then averaged (median) for a sub-pixel answer. Stars are found with a filter of
    ``dst``'s PSF when it has one: the subtraction's kernel candidates are found with the same filter, so
    the science image is filtered once.
    """
    sigma = psf_filter_sigma(dst.psf) if dst.psf is not None else 2.0
    a = find_stars(src, sigma, 15.0, max_candidates=n_stars)
    b = find_stars(dst, sigma, 15.0, max_candidates=n_stars)
    if len(a) < 3 or len(b) < 3:
        raise NoOverlapError(f"too few stars to register {src.path or 'template'} to {dst.path or 'science'}")
    dx = (a.x[:, None] - b.x[None, :]).ravel()
    dy = (a.y[:, None] - b.y[None, :]).ravel()
    limit = max_shift_fraction * max(src.shape)
    keep = (np.abs(dx) < limit) & (np.abs(dy) < limit)
    dx, dy = dx[keep], dy[keep]
    bins = np.arange(-limit, limit + 2, 2.0)
    hist, ex, ey = np.histogram2d(dx, dy, bins=[bins, bins])
    hist = ndimage.uniform_filter(hist, 2, mode="constant")
    i, j = np.unravel_index(np.argmax(hist), hist.shape)
    px, py = ex[i] + 1.0, ey[j] + 1.0
    near = np.hypot(dx - px, dy - py) < 3.0
    if near.sum() < 3:
        raise NoOverlapError(f"could not register {src.path or 'template'} to {dst.path or 'science'}")
    px, py = np.median(dx[near]), np.median(dy[near])
    near = np.hypot(dx - px, dy - py) < 1.5
    return float(np.median(dx[near])), float(np.median(dy[near]))


def align_to(template: Exposure, science: Exposure) -> Exposure:
    """The template on the science pixel grid: warped by WCS, shifted by star registration, or as is.

    Parameters
    ----------
    template, science : Exposure
        The template to align, and the science exposure whose grid it is aligned to.

    Returns
    -------
    Exposure
        The template resampled flux-conservingly, mask and variance carried, PSF kept.

    Raises
    ------
    NoOverlapError
        When the template does not cover the science image.
    """
    if template.wcs is not None and science.wcs is not None:
        if same_grid(science, template):
            return template
        log.info("warping %s onto the science WCS", template.path)
        warped = warp_exposure(template, science.wcs, science.shape)
        if warped.plane("NO_DATA").all():  # said here, before a PSF is looked for on an empty image
            raise NoOverlapError(f"{template.path or 'template'} does not overlap {science.path or 'science image'} "
                                 "(their WCSs share no pixel)")
        return warped
    dx, dy = measure_offset(template, science)
    if template.shape == science.shape and abs(dx) < 0.05 and abs(dy) < 0.05:
        return template
    log.info("registering %s by a shift of (%.2f, %.2f) px", template.path, dx, dy)
    return shift_exposure(template, dx, dy, science.shape)
