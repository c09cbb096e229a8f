"""Observing one CCD: the visit's conditions, its WCS, rendering the scene and the detector's defects.

Everything is seeded from (seed, visit, detector), so any exposure can be rendered alone, in any
order or process, and comes out identical. Science visits carry what raw data has: saturated
stars with bleed trails, bad columns, unmasked cosmic rays, a NO_DATA strip and a sky gradient
left after a constant background subtraction. Templates are coadds: deeper, on their own WCS,
with the mean PSF of their input visits and no cosmic rays or defects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import galsim
import numpy as np
import pandas as pd
from astropy.wcs import WCS
from scipy import ndimage

from ..exposure import NJY_ZEROPOINT, Exposure
from ..psf import GridPsf
from .render import add_noise
from .scene import Scene
from .specs import SurveySpec

DETECTOR_GAP_PIX = 60
EXPTIME = 90.0
#: How far outside a CCD sources are still drawn (their light reaches in).
RENDER_MARGIN_PIX = 40


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent random stream per (seed, keys): exposures do not depend on drawing order."""
    return np.random.default_rng(np.random.SeedSequence([seed, *[abs(int(k)) for k in keys]]))


@dataclass(frozen=True)
class VisitConditions:
    """What the atmosphere and telescope did in one visit (FWHM in arcsec)."""

    visit: int
    band: str
    mjd: float
    fwhm: float
    zeropoint: float
    sky_factor: float
    gradient: tuple[float, float]
    dither_pix: tuple[float, float]
    astrometric_error_deg: tuple[float, float]
    ellipticity: tuple[float, float, float, float, float, float]  # g1 = a0 + a1 u + a2 v, g2 likewise


def visit_mjds(visits: list[int], band_index: int) -> dict[int, float]:
    """Visits close in number were taken the same night (0.012 d apart); nights 300 d apart."""
    mjds, night, previous, slot = {}, 0, None, 0
    for v in sorted(visits):
        if previous is not None and v - previous > 50:
            night, slot = night + 1, 0
        mjds[v] = 56700.0 + 300.0 * night + 5.0 * band_index + 0.012 * slot
        previous, slot = v, slot + 1
    return mjds


def draw_conditions(spec: SurveySpec, seed: int) -> dict[int, VisitConditions]:
    """Conditions of every visit of every band's pool."""
    out = {}
    for b, (band, visits) in enumerate(spec.visit_pool.items()):
        mjds = visit_mjds(visits, b)
        for i, visit in enumerate(visits):
            rng = rng_for(seed, visit, 7)
            fwhm = (spec.psf_ratios[i] * spec.template_fwhm if spec.psf_ratios is not None
                    else rng.uniform(*spec.seeing_range))
            emax = spec.max_ellipticity
            ell = tuple(float(v) for v in rng.uniform(-emax / 3, emax / 3, 6))
            sweep = spec.psf_ratios is not None  # a sweep keeps everything but the seeing equal
            out[visit] = VisitConditions(
                visit=visit, band=band, mjd=mjds[visit], fwhm=float(fwhm),
                zeropoint=spec.magzero + (0.0 if sweep else float(rng.normal(0, spec.zeropoint_scatter))),
                sky_factor=1.0 if sweep else float(rng.uniform(0.85, 1.2)),
                gradient=tuple(float(v) for v in rng.normal(0, spec.sky_gradient, 2)),
                dither_pix=(0.0, 0.0) if sweep else tuple(float(v) for v in rng.normal(0, spec.dither_pix, 2)),
                astrometric_error_deg=tuple(float(v) for v in rng.normal(0, spec.astrometric_error_arcsec / 3600, 2)),
                ellipticity=ell)
    return out


def template_conditions(spec: SurveySpec, conditions: dict[int, VisitConditions], band: str) -> list[VisitConditions]:
    """The visits coadded into a band's template: the best-seeing fraction (at least
    ``min_template_visits``), or for a PSF sweep that many visits at the template seeing."""
    if spec.psf_ratios is not None:
        first = conditions[spec.visit_pool[band][0]]
        return [dataclasses.replace(first, visit=-(i + 1), fwhm=spec.template_fwhm)
                for i in range(spec.min_template_visits)]
    pool = sorted(spec.visit_pool[band], key=lambda v: conditions[v].fwhm)
    n = int(np.ceil(len(pool) * spec.template_fraction))
    return [conditions[v] for v in pool[: min(len(pool), max(n, spec.min_template_visits))]]


# --------------------------------------------------------------------------- geometry


def detector_center_pix(spec: SurveySpec, detector: int) -> tuple[float, float]:
    """Centre of a CCD in focal-plane pixels from the field centre (two CCDs per row)."""
    i = spec.detectors.index(detector)
    ny, nx = spec.shape
    ncol, nrow = min(2, len(spec.detectors)), int(np.ceil(len(spec.detectors) / 2))
    col, row = i % ncol, i // ncol
    return ((col - (ncol - 1) / 2) * (nx + DETECTOR_GAP_PIX), (row - (nrow - 1) / 2) * (ny + DETECTOR_GAP_PIX))


def tan_wcs(shape: tuple[int, int], scale_arcsec: float, ra: float, dec: float, rotation_deg: float = 0.0,
            shift_pix: tuple[float, float] = (0.0, 0.0)) -> WCS:
    """A TAN WCS with (ra, dec) at the CCD centre moved by ``shift_pix``, north up and east left."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape[1] / 2 + 0.5 + shift_pix[0], shape[0] / 2 + 0.5 + shift_pix[1]]
    th = np.deg2rad(rotation_deg)
    s = scale_arcsec / 3600
    w.wcs.cd = s * np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]])
    return w


def field_wcs(spec: SurveySpec) -> WCS:
    return tan_wcs((1, 1), spec.pixel_scale, spec.ra, spec.dec)


def science_wcs(spec: SurveySpec, cond: VisitConditions, detector: int) -> tuple[WCS, WCS]:
    """(true WCS the sky is rendered with, WCS written to the file: off by the astrometric error)."""
    cx, cy = detector_center_pix(spec, detector)
    ra, dec = field_wcs(spec).all_pix2world([[cx + cond.dither_pix[0], cy + cond.dither_pix[1]]], 0)[0]
    true = tan_wcs(spec.shape, spec.pixel_scale, ra, dec)
    dra, ddec = cond.astrometric_error_deg
    recorded = tan_wcs(spec.shape, spec.pixel_scale, ra + dra / np.cos(np.deg2rad(dec)), dec + ddec)
    return true, recorded


def template_wcs(spec: SurveySpec, detector: int) -> WCS:
    cx, cy = detector_center_pix(spec, detector)
    ra, dec = field_wcs(spec).all_pix2world([[cx, cy]], 0)[0]
    return tan_wcs(spec.shape, spec.pixel_scale, ra, dec, spec.template_rotation_deg, spec.template_offset_pix)


# --------------------------------------------------------------------------- PSF


class PsfField:
    """A visit's (or a coadd's) PSF as a function of CCD position: elliptical Moffats, mixed for coadds."""

    def __init__(self, spec: SurveySpec, conditions: list[VisitConditions]):
        self.spec = spec
        self.conditions = conditions

    def uv(self, x: float, y: float) -> tuple[float, float]:
        ny, nx = self.spec.shape
        return 2 * x / (nx - 1) - 1, 2 * y / (ny - 1) - 1

    def at(self, x: float, y: float) -> galsim.GSObject:
        """Unit-flux PSF at 0-based pixel (x, y), in pixel units."""
        u, v = self.uv(x, y)
        parts = []
        for c in self.conditions:
            a = c.ellipticity
            fwhm_pix = c.fwhm / self.spec.pixel_scale * (1 + 0.03 * (u * u + v * v))
            parts.append(galsim.Moffat(beta=self.spec.moffat_beta, fwhm=fwhm_pix).shear(
                g1=a[0] + a[1] * u + a[2] * v, g2=a[3] + a[4] * u + a[5] * v))
        return parts[0] if len(parts) == 1 else galsim.Add(parts) / len(parts)

    @property
    def max_fwhm_pix(self) -> float:
        return max(c.fwhm for c in self.conditions) / self.spec.pixel_scale * 1.06

    def grid(self) -> GridPsf:
        """The stored PSF: pixel-integrated stamps on a regular grid over the CCD."""
        ny, nx = self.spec.shape
        gy, gx = self.spec.psf_grid
        size = 2 * int(np.ceil(4 * self.max_fwhm_pix)) + 1
        xs, ys, stamps = [], [], []
        for y in np.linspace(0, ny - 1, gy):
            for x in np.linspace(0, nx - 1, gx):
                stamps.append(self.at(x, y).drawImage(nx=size, ny=size, scale=1.0).array)
                xs.append(x)
                ys.append(y)
        return GridPsf(np.array(stamps), np.array(xs), np.array(ys))


# --------------------------------------------------------------------------- rendering


def _stamp_size(flux: float, fwhm_pix: float) -> int | None:
    """Bright stars get stamps big enough that their wings do not end in a visible step."""
    if flux < 2e5:
        return None
    return 2 * int(min(12 * fwhm_pix * np.log10(flux / 2e4), 400)) + 1


def render_model(scene: Scene, objects: pd.DataFrame, x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                 psf: PsfField, spec: SurveySpec) -> np.ndarray:
    """Noiseless image (counts) of the selected objects at pixel positions (x, y)."""
    ny, nx = spec.shape
    canvas = galsim.ImageF(nx, ny, scale=1.0)
    for (_, row), xi, yi, fi in zip(objects.iterrows(), x, y, flux):
        if not (fi > 0 and np.isfinite(fi)):
            continue
        prof = psf.at(xi, yi)
        if row.kind == "galaxy":
            gal = scene.galaxy_profile(row).dilate(1 / spec.pixel_scale)
            prof = galsim.Convolve(gal, prof)
        size = _stamp_size(fi, psf.max_fwhm_pix) if row.kind != "galaxy" else None
        stamp = prof.withFlux(float(fi)).drawImage(scale=1.0, nx=size, ny=size,
                                                   center=galsim.PositionD(xi + 1, yi + 1))
        bounds = stamp.bounds & canvas.bounds
        if bounds.isDefined():
            canvas[bounds] += stamp[bounds]
    return canvas.array.astype(np.float64)


def in_image(wcs: WCS, objects: pd.DataFrame, shape: tuple[int, int], margin: float) -> tuple:
    pix = wcs.all_world2pix(np.column_stack([objects.ra, objects.dec]), 0)
    ny, nx = shape
    keep = (pix[:, 0] > -margin) & (pix[:, 0] < nx - 1 + margin) & (pix[:, 1] > -margin) & (pix[:, 1] < ny - 1 + margin)
    return keep, pix[keep, 0], pix[keep, 1]


def sky_plane(spec: SurveySpec, cond: VisitConditions, level: float) -> np.ndarray:
    ny, nx = spec.shape
    u = np.linspace(-1, 1, nx)[None, :]
    v = np.linspace(-1, 1, ny)[:, None]
    return level * (1 + cond.gradient[0] * u + cond.gradient[1] * v)


def sky_counts(spec: SurveySpec, band: str, zeropoint: float) -> float:
    """Sky counts per pixel for a sky brightness in mag/arcsec^2."""
    return 10 ** (-0.4 * (spec.sky_mag[band] - zeropoint)) * spec.pixel_scale**2


@dataclass
class RenderedExposure:
    """An exposure, its noiseless model (same units, sky included) and the drawn sources."""

    exposure: Exposure
    model: np.ndarray
    sources: pd.DataFrame


def add_cosmic_rays(image: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Sharp tracks (1-2 px wide, up to ~15 px long) of a few hundred to thousands of counts."""
    ny, nx = image.shape
    n = rng.poisson(rate * nx * ny)
    deposit = np.zeros_like(image)
    for _ in range(n):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        length = min(rng.exponential(4.0), 15.0)
        angle = rng.uniform(0, np.pi)
        t = np.linspace(0, length, max(2, int(2 * length) + 1))
        xs = np.clip((x0 + t * np.cos(angle)).astype(int), 0, nx - 1)
        ys = np.clip((y0 + t * np.sin(angle)).astype(int), 0, ny - 1)
        np.add.at(deposit, (ys, xs), rng.uniform(300, 3000) / len(t) * max(length, 1.0))
    image += deposit
    return deposit


def saturate_and_bleed(image: np.ndarray, level: float) -> np.ndarray:
    """Clip at the full well, spilling each saturated column's excess charge up and down it."""
    over = image >= level
    labels, n = ndimage.label(over)
    sat = over.copy()
    ny = image.shape[0]
    for sl in ndimage.find_objects(labels):
        for col in range(sl[1].start, sl[1].stop):
            rows = np.flatnonzero(over[sl[0], col]) + sl[0].start
            if not len(rows):
                continue
            excess = float(np.sum(image[rows, col] - level))
            spill = int(np.ceil(excess / level / 2))
            sat[max(rows.min() - spill, 0):min(rows.max() + spill + 1, ny), col] = True
    image[sat] = level
    return sat


def detector_defects(spec: SurveySpec, seed: int, detector: int) -> tuple[np.ndarray, np.ndarray]:
    """(BAD, NO_DATA) masks of one CCD: a few bad (part-)columns and a dead strip at one edge."""
    rng = rng_for(seed, detector, 11)
    ny, nx = spec.shape
    bad = np.zeros(spec.shape, bool)
    for _ in range(spec.n_bad_columns):
        x = int(rng.integers(32, nx - 32))
        y0 = int(rng.integers(0, ny // 2)) if rng.uniform() < 0.5 else 0
        bad[y0:, x] = True
    nodata = np.zeros(spec.shape, bool)
    width = int(rng.integers(spec.nodata_strip[0], spec.nodata_strip[1] + 1))
    if width:
        nodata[:, :width] = True
    return bad, nodata


def render_exposure(spec: SurveySpec, scene: Scene, conds: list[VisitConditions], detector: int, seed: int,
                    template: bool = False) -> RenderedExposure:
    """One science visit (``conds`` = [that visit]) or a template coadd of ``conds`` on one CCD."""
    first = conds[0]
    band = first.band
    psf = PsfField(spec, conds)
    if template:
        wcs_true = wcs_written = template_wcs(spec, detector)
        zeropoint, depth = spec.magzero, len(conds)
        flux_njy = np.mean([scene.flux_njy(band, c.mjd) for c in conds], axis=0)
        rng = rng_for(seed, 0, detector, 13, *[c.visit for c in conds])
    else:
        wcs_true, wcs_written = science_wcs(spec, first, detector)
        zeropoint, depth = first.zeropoint, 1
        flux_njy = scene.flux_njy(band, first.mjd)
        rng = rng_for(seed, first.visit, detector, 17)
    keep, x, y = in_image(wcs_true, scene.objects, spec.shape, RENDER_MARGIN_PIX)
    objects = scene.objects[keep]
    counts = flux_njy[keep] * 10 ** (-0.4 * (NJY_ZEROPOINT - zeropoint))
    model = render_model(scene, objects, x, y, counts, psf, spec)
    sky_level = float(np.mean([sky_counts(spec, band, zeropoint) * c.sky_factor for c in conds]))
    sky = sky_plane(spec, first, sky_level) if not template else np.full(spec.shape, sky_level)
    # A coadd of `depth` visits: noise of the summed counts, normalised back to one visit.
    field = add_noise(model * depth, sky * depth, spec.gain, spec.read_noise_e * np.sqrt(depth), rng)
    image = field.image.astype(np.float64) / depth
    truth_model = (model + sky).astype(np.float64)
    variance = field.variance.astype(np.float64) / depth**2
    exp_mask = np.zeros(spec.shape, np.int32)
    exposure = Exposure(image=np.zeros(spec.shape, np.float32), mask=exp_mask, variance=variance,
                        psf=psf.grid(), wcs=wcs_written, visit=0 if template else first.visit,
                        detector=detector, band=band, mjd=float(np.mean([c.mjd for c in conds])),
                        exptime=EXPTIME * depth, magzero=zeropoint, gain=spec.gain * depth)
    if not template:
        truth_model += add_cosmic_rays(image, spec.cosmic_ray_rate, rng)
        exposure.set_plane("SAT", saturate_and_bleed(image, spec.saturation))
        bad, nodata = detector_defects(spec, seed, detector)
        image[bad] = np.where(rng.uniform(size=int(bad.sum())) < 0.5, 0.0, image[bad] + 500.0)
        image[nodata] = sky_level
        exposure.set_plane("BAD", bad)
        exposure.set_plane("NO_DATA", nodata)
        exposure.saturate = spec.saturation - sky_level
        exposure.header["NCOADD"] = 1
    else:
        exposure.header["NCOADD"] = depth
        exposure.header["TPLVISIT"] = ",".join(str(c.visit) for c in conds)
    # Stored images are background subtracted with a constant: a science sky gradient stays.
    exposure.image = (image - sky_level).astype(np.float32)
    sources = pd.DataFrame({"id": objects.id.to_numpy(), "kind": objects.kind.to_numpy(), "x": x, "y": y,
                            "flux": counts})
    return RenderedExposure(exposure, (truth_model - sky_level).astype(np.float32), sources)
