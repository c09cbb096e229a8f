"""Fake sources: catalogs per (visit, detector) and their injection into visits and templates.

Fakes injected into the science image come out positive in the difference, those injected into
the template negative. A catalog is seeded from (seed, visit, detector), so a re-run injects the
same fakes and detectors are independent. Each fake is drawn with the exposure's own PSF at its
position, with Poisson noise, and the variance plane grows by the same Poisson term.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .background import carry_sky
from .exposure import Exposure
from .ids import pack_ids
from .lazy import lazy_module
from .measurement import pixel_scale_arcsec
from .stars import carry_stars
from .subtraction.photometric_scale import exposure_flux_ratio

pd = lazy_module("pandas")

log = logging.getLogger(__name__)


class InjectConfig(BaseModel):
    """Fake-source injection."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="inject fakes at all")
    density_per_deg2: float = Field(1000.0, gt=0, description="fakes per square degree")
    min_per_detector: int = Field(20, ge=0, description="at least this many fakes per detector")
    template_fraction: float = Field(0.2, ge=0, le=1, description="fraction injected into the template")
    mag_bright: float = Field(20.0, description="brightest fake magnitude (AB)")
    mag_faint_cap: float = Field(26.0, description="faintest fake magnitude is min(maglim + 1, this)")
    edge_pix: int = Field(50, ge=0, description="fakes kept this far from the detector edges")
    min_separation_fwhm: float = Field(0.0, ge=0, description="fakes at least this many science PSF FWHM apart, so "
                                       "that dense injections do not blend fakes with each other (0: independent)")
    seed: int = Field(0, description="combined with (visit, detector) to seed each catalog")
    host_fraction: float = Field(0.0, ge=0, le=1, description="fraction placed on host galaxies (needs hosts)")


def limiting_magnitude(exp: Exposure, nsigma: float = 5.0) -> float:
    """AB magnitude of a point source detected at ``nsigma`` (PSF-fit noise = sqrt(NEA x variance), in the
    aperture-corrected flux units of the image's PSF at its centre)."""
    usable = ~exp.unusable
    var = float(np.median(exp.variance[usable])) if usable.any() else float(np.median(exp.variance))
    ny, nx = exp.shape
    flux = nsigma * math.sqrt(exp.psf.nea * var) * float(exp.psf.flux_correction((nx - 1) / 2, (ny - 1) / 2))
    return exp.magzero - 2.5 * math.log10(flux)


def _area_deg2(exp: Exposure) -> float:

    return exp.shape[0] * exp.shape[1] * (pixel_scale_arcsec(exp) / 3600.0) ** 2


def make_fake_catalog(science: Exposure, config: InjectConfig | None = None,
                      template: Exposure | None = None, hosts: pd.DataFrame | None = None) -> pd.DataFrame:
    """The truth table of fakes for one science exposure, reproducible from (seed, visit, detector).

    With ``hosts`` (columns x, y, mag) a ``host_fraction`` of the fakes sit on randomly chosen hosts inside the
    edge margin, at host magnitude + N(1, 1), like supernovae on their galaxies.

    Parameters
    ----------
    science : Exposure
        With its PSF (and MAGZERO; without it an instrumental zeropoint puts the 5-sigma limit at 24).
    config : InjectConfig, optional
    template : Exposure, optional
        For the expected S/N on the difference.
    hosts : pandas.DataFrame, optional

    Returns
    -------
    pandas.DataFrame
        id, ra, dec, x, y, mag, flux (counts), flux_nJy, target ("visit" or "template"), expected_snr, on_host.
    """
    cfg = config or InjectConfig()
    if science.psf is None:
        raise ValueError("fakes need the science exposure's PSF (measure it first)")
    paired = template is not None and template.shape == science.shape
    # the template's noise in science counts: its variance over (template counts per science count)^2
    tpl_scale = template_counts_per_science_count(science, template) if paired else 1.0
    if not math.isfinite(science.magzero):
        # No calibration: an instrumental zeropoint that puts the 5-sigma limit at magnitude 24, so the
        # fakes still span 20 to maglim + 1 (fluxes in counts are what the truth table compares).
        science = science.copy()
        science.magzero = 0.0
        science.magzero = 24.0 - limiting_magnitude(science)
        log.info("%s: no MAGZERO; instrumental zeropoint %.2f for the fakes", science.path, science.magzero)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, science.visit, science.detector]))
    n = max(cfg.min_per_detector, int(round(cfg.density_per_deg2 * _area_deg2(science))))
    ny, nx = science.shape
    e = cfg.edge_pix
    x, y = _positions(rng, n, (e, nx - 1 - e), (e, ny - 1 - e), cfg.min_separation_fwhm * science.psf.fwhm)
    n = len(x)
    faint = min(limiting_magnitude(science) + 1.0, cfg.mag_faint_cap)
    mag = rng.uniform(cfg.mag_bright, max(faint, cfg.mag_bright + 0.1), n)
    target = np.where(rng.uniform(size=n) < cfg.template_fraction, "template", "visit")
    on_host = np.zeros(n, bool)
    if hosts is not None and cfg.host_fraction > 0 and len(hosts):
        inside = hosts[(hosts.x >= e) & (hosts.x <= nx - 1 - e) & (hosts.y >= e) & (hosts.y <= ny - 1 - e)]
        if len(inside):
            on_host = rng.uniform(size=n) < cfg.host_fraction
            pick = rng.integers(0, len(inside), on_host.sum())
            x[on_host] = inside.x.to_numpy()[pick]
            y[on_host] = inside.y.to_numpy()[pick]
            mag[on_host] = inside.mag.to_numpy()[pick] + rng.normal(1.0, 1.0, on_host.sum())
    flux = 10.0 ** (-0.4 * (mag - science.magzero))
    cat = pd.DataFrame({"id": pack_ids(science.visit, science.detector, n, "fakes"), "x": x, "y": y, "mag": mag,
                        "flux": flux, "flux_nJy": flux * science.njy_per_count, "target": target, "on_host": on_host})
    if science.wcs is not None:
        radec = science.wcs.all_pix2world(np.column_stack([x, y]), 0)
        cat["ra"], cat["dec"] = radec[:, 0], radec[:, 1]
    else:
        cat["ra"] = cat["dec"] = np.nan
    ix = np.clip(np.round(x).astype(int), 0, nx - 1)
    iy = np.clip(np.round(y).astype(int), 0, ny - 1)
    var = science.variance[iy, ix].astype(float)
    if paired:
        var = var + template.variance[iy, ix] / tpl_scale**2
    # a fake is drawn as flux / correction times the model, so its PSF-fit S/N is that over the fit's noise
    cat["expected_snr"] = flux / (science.psf.flux_correction(x, y) * np.sqrt(science.psf.nea * var))
    return cat


def inject_fakes(exp: Exposure, x: np.ndarray, y: np.ndarray, flux: np.ndarray, seed: int = 0,
                 plane: str = "INJECTED") -> Exposure:
    """A copy of ``exp`` with point sources added (its PSF at each position, Poisson noise with the
    exposure's GAIN; without a GAIN no noise is added and a warning logged). ``plane`` marks each fake's
    footprint (where it adds more than half the pixel noise); the variance grows by each stamp's Poisson term.
    Each fake is the model scaled to ``flux`` / the PSF's aperture correction: its corrected PSF flux is ``flux``."""
    out = exp.copy()
    rng = np.random.default_rng(seed)
    gain = exp.gain if (math.isfinite(exp.gain) and exp.gain > 0) else None
    if gain is None:
        log.warning("%s: no GAIN; fakes injected without Poisson noise", exp.path)
    ny, nx = exp.shape
    size = min(exp.psf.default_size, 41)
    h = size // 2
    bit = out.mask_planes.bit(plane)
    for xi, yi, fi in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(flux, float)):
        ix, iy = int(round(xi)), int(round(yi))
        stamp = (fi / exp.psf.flux_correction(xi, yi)) * exp.psf.draw(xi - ix, yi - iy, size, x=xi, y=yi)
        y0, y1, x0, x1 = max(iy - h, 0), min(iy + h + 1, ny), max(ix - h, 0), min(ix + h + 1, nx)
        if y0 >= y1 or x0 >= x1:
            continue
        s = stamp[y0 - iy + h : y1 - iy + h, x0 - ix + h : x1 - ix + h]
        added = s.copy()
        if gain is not None:
            positive = np.maximum(s, 0)
            added = s + (rng.poisson(positive * gain) - positive * gain) / gain
            out.variance[y0:y1, x0:x1] += (positive / gain).astype(np.float32)
        out.image[y0:y1, x0:x1] += added.astype(np.float32)
        # the fake's footprint: where it adds more than half the pixel noise (its whole stamp would mark
        # half of a small image, and keep every star near a fake out of the kernel fit)
        noise = np.sqrt(np.maximum(exp.variance[y0:y1, x0:x1], 1e-30))
        out.mask[y0:y1, x0:x1] |= np.where(np.abs(s) > 0.5 * noise, np.int32(bit), np.int32(0))
    carry_stars(exp, out)
    carry_sky(exp, out)
    return out


def _positions(rng, n: int, xr, yr, min_separation: float) -> tuple[np.ndarray, np.ndarray]:
    """n uniform positions; with ``min_separation`` each at least that far from the earlier ones (drawn in
    rounds; fewer than n, with a warning, only when the area cannot hold them)."""
    x, y = rng.uniform(*xr, n), rng.uniform(*yr, n)
    if min_separation <= 0:
        return x, y
    kept = np.zeros((0, 2))
    for _ in range(20):
        for p in np.column_stack([x, y]):
            if not len(kept) or np.hypot(*(kept - p).T).min() >= min_separation:
                kept = np.vstack([kept, p])
                if len(kept) == n:
                    return kept[:, 0], kept[:, 1]
        x, y = rng.uniform(*xr, n), rng.uniform(*yr, n)
    log.warning("only %d of %d fakes fit %.1f px apart", len(kept), n, min_separation)
    return kept[:, 0], kept[:, 1]


def template_counts_per_science_count(science: Exposure, template: Exposure) -> float:
    """How many template counts one science count of a source is: from the zeropoints when both images have
    one, else from their stars' fluxes (the template may be deeper and scaled differently)."""
    if math.isfinite(science.magzero) and math.isfinite(template.magzero):
        return 10.0 ** (-0.4 * (science.magzero - template.magzero))
    if template.shape == science.shape and science.psf is not None and template.psf is not None:
        ratio = exposure_flux_ratio(template, science)
        if ratio.trusted and ratio.scale > 0:
            return ratio.scale
    log.warning("%s: zeropoints unknown and too few stars to compare the images; template fakes get the "
                "science counts", template.path)
    return 1.0


def inject_catalog(science: Exposure, template: Exposure, fakes: pd.DataFrame, seed: int = 0
                   ) -> tuple[Exposure, Exposure]:
    """Inject the visit fakes into the science image and the template fakes into the template.

    Template fakes go at the template's pixel position of the fake's sky position when both have a WCS,
    scaled to the template's flux scale.

    Parameters
    ----------
    science, template : Exposure
    fakes : pandas.DataFrame
        From :func:`dialab.make_fake_catalog`.
    seed : int
        Seed of the Poisson noise added with the fakes.

    Returns
    -------
    (Exposure, Exposure)
        Copies of science and template with the fakes, their variance and INJECTED planes.
    """
    vis = fakes[fakes.target == "visit"]
    tpl = fakes[fakes.target == "template"]
    sci_out = inject_fakes(science, vis.x.to_numpy(), vis.y.to_numpy(), vis.flux.to_numpy(), seed)
    tx, ty = tpl.x.to_numpy(), tpl.y.to_numpy()
    if len(tpl) and science.wcs is not None and template.wcs is not None:
        pix = template.wcs.all_world2pix(np.column_stack([tpl.ra, tpl.dec]), 0)
        tx, ty = pix[:, 0], pix[:, 1]
    tpl_out = inject_fakes(template, tx, ty, tpl.flux.to_numpy() * template_counts_per_science_count(science, template),
                           seed + 1)
    return sci_out, tpl_out
