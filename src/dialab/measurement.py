"""Measuring diaSources on a difference: detection, centroids, PSF and dipole fits, shapes, pixel flags (APDB names)."""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from .detection import detect_sources
from .exposure import Exposure
from .ids import pack_ids
from .lazy import lazy_module
from .moments import adaptive_moments
from .photometry import aperture_flux, forced_psf_flux
from .subtraction.result import SubtractionResult

pd = lazy_module("pandas")

# --------------------------------------------------------------------------- diaSource measurement

#: pixelFlags_<name>: (mask plane, where): "footprint" = anywhere in it, "center" = the 3x3 pixels at the centroid.
PIXEL_FLAGS = {
    "bad": ("BAD", "footprint"),
    "suspect": ("SUSPECT", "footprint"),
    "suspectCenter": ("SUSPECT", "center"),
    "saturated": ("SAT", "footprint"),
    "saturatedCenter": ("SAT", "center"),
    "interpolated": ("INTRP", "footprint"),
    "interpolatedCenter": ("INTRP", "center"),
    "edge": ("EDGE", "footprint"),
    "cr": ("CR", "footprint"),
    "crCenter": ("CR", "center"),
    "nodata": ("NO_DATA", "footprint"),
    "nodataCenter": ("NO_DATA", "center"),
    "injected": ("INJECTED", "footprint"),
    "injectedCenter": ("INJECTED", "center"),
    "injected_template": ("INJECTED_TEMPLATE", "footprint"),
    "injected_templateCenter": ("INJECTED_TEMPLATE", "center"),
}
#: The standard bad-flag cut of the flavor comparison.
BAD_FLAGS = ("pixelFlags_bad", "pixelFlags_suspect", "pixelFlags_saturatedCenter", "pixelFlags_interpolated",
             "pixelFlags_interpolatedCenter", "pixelFlags_edge")
APERTURE_RADIUS_PIX = 12.0


class MeasureConfig(BaseModel):
    """Measurement of diaSources."""

    model_config = ConfigDict(extra="forbid")

    aperture_radius_pix: float = Field(APERTURE_RADIUS_PIX, gt=0, description="aperture flux radius, pixels")
    fit_dipoles: bool = Field(True, description="fit a +/- PSF pair to footprints with peaks of both signs")
    peak_prominence: float = Field(5.0, ge=0, description="a footprint's weaker peak is its own diaSource when "
                                   "its filtered S/N rises this much above the col to a stronger one (two "
                                   "transients), not a bump on its slope; inf: one per footprint and sign, as "
                                   "LSST's difference imaging (doDeblend false); 0: every peak a FWHM apart")


def _refine_peak(snr: np.ndarray, x: int, y: int, sign: float = 1.0) -> tuple[float, float, bool]:
    """Sub-pixel extremum of the filtered S/N from a quadratic through the 3x3 neighbourhood."""
    ny, nx = snr.shape
    if not (0 < x < nx - 1 and 0 < y < ny - 1):
        return float(x), float(y), True
    c = sign * snr[y - 1 : y + 2, x - 1 : x + 2].astype(float)
    dxx = c[1, 2] - 2 * c[1, 1] + c[1, 0]
    dyy = c[2, 1] - 2 * c[1, 1] + c[0, 1]
    dxy = 0.25 * (c[2, 2] - c[2, 0] - c[0, 2] + c[0, 0])
    gx = 0.5 * (c[1, 2] - c[1, 0])
    gy = 0.5 * (c[2, 1] - c[0, 1])
    det = dxx * dyy - dxy * dxy
    if det == 0:
        return float(x), float(y), True
    ox = -(dyy * gx - dxy * gy) / det
    oy = -(dxx * gy - dxy * gx) / det
    if abs(ox) > 1 or abs(oy) > 1:
        return float(x), float(y), True
    return x + ox, y + oy, False


def _fd_steps(x: np.ndarray) -> np.ndarray:
    """The forward-difference steps least_squares takes by default: sqrt(eps) max(1, |x|), made exactly
    representable."""
    x = np.asarray(x, float)
    h = np.sqrt(np.finfo(float).eps) * np.where(x >= 0, 1.0, -1.0) * np.maximum(1.0, np.abs(x))
    return (x + h) - x


class _DipoleModel:
    """F [P(x - x+) - P(x - x-)] on a footprint's pixels, weighted by 1 / sigma, with the finite-difference
    Jacobians of its fits: every PSF position a step needs goes into one interpolation call, and the two at the
    step's own point are those its residuals were just made with (four, not ten)."""

    def __init__(self, psf_spline: np.ndarray, size: int, xx: np.ndarray, yy: np.ndarray, data: np.ndarray,
                 w: np.ndarray, flux_prior: tuple[float, float] | None):
        self.psf_spline, self.size, self.xx, self.yy, self.w = psf_spline, size, xx, yy, w
        self.dw = data * w
        self.flux_prior = flux_prior
        self._last = (None, None)  # (q, the PSF at its two positions): a Jacobian is asked for where f just was

    def _psf_at(self, points: list[tuple[float, float]]) -> np.ndarray:
        coords = np.empty((2, len(points), len(self.xx)))
        for i, (px, py) in enumerate(points):
            coords[0, i], coords[1, i] = self.yy - py + self.size, self.xx - px + self.size
        return ndimage.map_coordinates(self.psf_spline, coords.reshape(2, -1), order=3, mode="constant",
                                       prefilter=False).reshape(len(points), -1)

    def shapes(self, q, steps=None):
        """The weighted shape at q = (x+, y+, x-, y-) and, given ``steps``, at q moved by each step in turn."""
        xp, yp, xn, yn = q
        key = (float(xp), float(yp), float(xn), float(yn))
        if self._last[0] != key:
            self._last = (key, self._psf_at([(xp, yp), (xn, yn)]))
        (pos, neg), w = self._last[1], self.w
        m = (pos - neg) * w
        if steps is None:
            return m
        moved = self._psf_at([(xp + steps[0], yp), (xp, yp + steps[1]), (xn + steps[2], yn), (xn, yn + steps[3])])
        return m, [(moved[0] - neg) * w, (moved[1] - neg) * w, (pos - moved[2]) * w, (pos - moved[3]) * w]

    def best_flux(self, m: np.ndarray) -> float:
        """The shared flux that fits the weighted model shape m best (linear least squares)."""
        return float(m @ self.dw) / max(float(m @ m), 1e-300)

    def profile(self, q):
        """Residuals with the shared flux solved linearly for the positions q (variable projection)."""
        m = self.shapes(q)
        return self.dw - self.best_flux(m) * m

    def profile_jac(self, q):
        steps = _fd_steps(q)
        m, moved = self.shapes(q, steps)
        r = self.dw - self.best_flux(m) * m
        return np.column_stack([(self.dw - self.best_flux(mi) * mi - r) / h for mi, h in zip(moved, steps)])

    def full(self, p):
        """Residuals of flux p[0] at positions p[1:], and the flux prior's when there is one."""
        r = self.dw - p[0] * self.shapes(p[1:])
        prior = self.flux_prior
        return r if prior is None else np.append(r, (p[0] - prior[0]) / prior[1])

    def full_jac(self, p):
        steps = _fd_steps(p)
        m, moved = self.shapes(p[1:], steps[1:])
        jac = np.column_stack([-m] + [-p[0] * (mi - m) / h for mi, h in zip(moved, steps[1:])])
        if self.flux_prior is None:
            return jac
        return np.vstack([jac, np.r_[1.0 / self.flux_prior[1], np.zeros(4)]])


def fit_dipole(exp: Exposure, fp, peaks: np.ndarray, flux_prior: tuple[float, float] | None = None) -> dict:
    """Fit F * [P(x - x+) - P(x - x-)] on the footprint: a shared flux, separation and angle.

    For separations below the PSF width only F x separation is constrained by the difference; as
    LSST's dipole fit does with the pre-subtraction images, ``flux_prior`` (the star's flux measured on
    the science image, and its uncertainty) pins F and so the separation.
    """
    from scipy.optimize import least_squares

    pos = peaks[peaks[:, 3] > 0][0]
    neg = peaks[peaks[:, 3] < 0][0]
    ny, nx = exp.shape
    size = min(exp.psf.default_size, 31)
    yy, xx = np.unravel_index(fp.pixels, (ny, nx))
    near = np.hypot(xx - 0.5 * (pos[0] + neg[0]), yy - 0.5 * (pos[1] + neg[1])) <= 3 * exp.psf.fwhm
    yy, xx = yy[near], xx[near]
    data = exp.image[yy, xx].astype(float)
    w = 1.0 / np.sqrt(np.maximum(exp.variance[yy, xx], 1e-30))
    xc, yc = 0.5 * (pos[0] + neg[0]), 0.5 * (pos[1] + neg[1])
    # the cubic spline's coefficients once, not at each of the fit's hundreds of evaluations (same numbers)
    psf_spline = ndimage.spline_filter(exp.psf.at(xc, yc).stamp(2 * size + 1), 3, output=np.float64,
                                       mode="constant")
    if flux_prior is not None and not flux_prior[0] > 0:
        flux_prior = None
    model = _DipoleModel(psf_spline, size, xx, yy, data, w, flux_prior)

    u = np.array([pos[0] - neg[0], pos[1] - neg[1]])
    u = u / max(np.hypot(*u), 1e-9)
    best = None
    for half_sep in (0.25, 1.0, 2.5):  # separation and flux trade off: start from several separations
        q0 = [xc + half_sep * u[0], yc + half_sep * u[1], xc - half_sep * u[0], yc - half_sep * u[1]]
        r = least_squares(model.profile, q0, jac=model.profile_jac, x_scale=0.3, ftol=1e-5, xtol=1e-5)
        if best is None or r.cost < best.cost:
            best = r
    f0 = flux_prior[0] if flux_prior is not None else model.best_flux(model.shapes(best.x))
    res = least_squares(model.full, [f0, *best.x], jac=model.full_jac, x_scale=[abs(f0) + 1e-9, 0.3, 0.3, 0.3, 0.3],
                        max_nfev=100)
    f, xp, yp, xn, yn = res.x
    if f < 0:  # the same pair with the signs swapped
        f, xp, yp, xn, yn = -f, xn, yn, xp, yp
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac)
        ferr = float(np.sqrt(cov[0, 0]))
    except np.linalg.LinAlgError:
        ferr = float("nan")
    return {"dipoleMeanFlux": float(f), "dipoleMeanFluxErr": ferr, "dipoleFluxDiff": 0.0,
            "dipoleLengthPix": float(np.hypot(xp - xn, yp - yn)),
            "dipoleAngle": float(np.degrees(np.arctan2(yp - yn, xp - xn))),
            "dipoleChi2": float(2 * res.cost), "dipoleNdata": int(len(data)),
            "dipoleX": float(0.5 * (xp + xn)), "dipoleY": float(0.5 * (yp + yn))}


def split_footprints(det, fwhm_pix: float, min_prominence: float, dipole_max_sep_fwhm: float = 2.0) -> list:
    """(footprint, peaks) per diaSource of detections ``det``. A footprint's strongest peak of each sign starts a
    source; a weaker one starts its own only when it rises ``min_prominence`` (filtered S/N) above the col
    joining it to a stronger one of its sign, more than a FWHM away (two transients in one footprint), not
    when it is a bump on a stronger source's slope. An opposite-sign peak within ``dipole_max_sep_fwhm`` FWHM
    joins a source as its dipole partner."""
    children = []
    for fp in det.footprints:
        left = [p for i, p in enumerate(fp.peaks) if i == 0 or _stands_alone(det, fp, i, fwhm_pix, min_prominence)]
        while left:
            best = left.pop(0)
            d = [np.hypot(p[0] - best[0], p[1] - best[1]) for p in left]
            partner = next((i for i, p in enumerate(left)
                            if p[3] != best[3] and d[i] <= dipole_max_sep_fwhm * fwhm_pix), None)
            group = [best] if partner is None else [best, left[partner]]
            left = [p for i, p in enumerate(left) if i != partner]
            children.append((fp, np.array(group)))
    return children


#: How far (in FWHM, and at least in pixels) the col between two peaks is looked for: peaks farther apart are
#: separate sources whatever lies between them, and a long footprint (a satellite trail, a failed subtraction)
#: costs one small window per peak, not one pass over its whole bounding box.
PROMINENCE_REACH_FWHM, PROMINENCE_REACH_MIN_PIX = 10.0, 32


def _stands_alone(det, fp, i: int, fwhm_pix: float, min_prominence: float) -> bool:
    """Whether peak ``i`` of footprint ``fp`` (peaks strongest first) is a source of its own: no stronger peak
    of its sign within a FWHM, and none within reach joined to it by footprint pixels whose S/N stays at or
    above its own less ``min_prominence`` (its col to them is lower than that)."""
    x, y, value, sign = fp.peaks[i]
    stronger = fp.peaks[:i][fp.peaks[:i, 3] == sign]
    reach = max(PROMINENCE_REACH_FWHM * fwhm_pix, PROMINENCE_REACH_MIN_PIX)
    d = np.hypot(stronger[:, 0] - x, stronger[:, 1] - y)
    stronger, d = stronger[d <= reach], d[d <= reach]
    if len(stronger) == 0:
        return True
    if not np.isfinite(min_prominence) or d.min() <= fwhm_pix:
        return False
    r = int(np.ceil(reach))
    (ys, xs) = fp.bbox
    y0, x0 = max(ys.start, int(y) - r), max(xs.start, int(x) - r)
    box = (slice(y0, min(ys.stop, int(y) + r + 1)), slice(x0, min(xs.stop, int(x) + r + 1)))
    high = (det.labels[box] == fp.id) & (sign * det.snr[box] >= sign * value - min_prominence)
    parts, _ = ndimage.label(high, structure=np.ones((3, 3), bool))
    own = parts[int(y) - y0, int(x) - x0]
    return not np.any(parts[stronger[:, 1].astype(int) - y0, stronger[:, 0].astype(int) - x0] == own)


def pixel_scale_arcsec(exp: Exposure) -> float:
    """Mean pixel side in arcsec (1 when there is no WCS: lengths then stay in pixels)."""
    if exp.wcs is None:
        return 1.0
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.sqrt(np.prod(proj_plane_pixel_scales(exp.wcs.celestial))) * 3600)


def _measured_dipole(exp: Exposure, fp, peaks: np.ndarray, science: Exposure | None) -> dict:
    """``fit_dipole`` with the science flux as prior, its fluxes aperture-corrected like every PSF flux (the fit
    itself is in the units of the unit-sum model)."""
    prior = None
    if science is not None and science.psf is not None:
        cx, cy = peaks[:, 0].mean(), peaks[:, 1].mean()
        sf = forced_psf_flux(science, np.array([cx]), np.array([cy]))
        flux, ferr = float(sf.psfFlux.iloc[0]), float(sf.psfFluxErr.iloc[0])
        corr = float(exp.psf.flux_correction(cx, cy))
        if np.isfinite(flux) and flux > 0:
            prior = (flux / corr, np.hypot(ferr, 0.05 * flux) / corr)
    dip = fit_dipole(exp, fp, peaks, prior)
    corr = float(exp.psf.flux_correction(dip["dipoleX"], dip["dipoleY"]))
    dip["dipoleMeanFlux"] *= corr
    dip["dipoleMeanFluxErr"] *= corr
    return dip


def _dipole_on_footprint(dip: dict, fp, fwhm: float) -> bool:
    """Whether both fitted lobes lie on the footprint's box grown by a FWHM. The fit's positions are free, and on
    a footprint no dipole describes (a cosmic ray's remains, a bright star's residual) they can run far off it
    (128 px, chi^2 70 per pixel, on an HSC CCD): such a fit must neither move the diaSource nor give it fluxes."""
    half = 0.5 * dip["dipoleLengthPix"]
    angle = np.radians(dip["dipoleAngle"])
    xs = dip["dipoleX"] + np.array([1.0, -1.0]) * half * np.cos(angle)
    ys = dip["dipoleY"] + np.array([1.0, -1.0]) * half * np.sin(angle)
    (y0, y1), (x0, x1) = [(s.start - fwhm, s.stop - 1 + fwhm) for s in fp.bbox]
    return bool(np.all(np.isfinite(xs)) and np.all((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)))


def measure_sources(exp: Exposure, det, science: Exposure | None = None, template: Exposure | None = None,
                    config: MeasureConfig | None = None) -> pd.DataFrame:
    """One row per footprint with the Rubin APDB DiaSource column names (fluxes in image counts).

    Measured on the difference less the residual background that detection found, with the PSF-flux errors
    scaled by the filtered noise that detection measured (``det.noise_scale``).
    """
    cfg = config or MeasureConfig()
    exp = dataclasses.replace(exp, image=(exp.image - det.background).astype(np.float32))
    ny, nx = exp.shape
    psf = exp.psf
    scale = pixel_scale_arcsec(exp)
    children = split_footprints(det, psf.fwhm, cfg.peak_prominence)
    rows = []
    for fp, peaks in children:
        best = peaks[0]
        x, y, cflag = _refine_peak(det.snr, int(best[0]), int(best[1]), best[3])
        row = {"x": x, "y": y, "centroid_flag": cflag, "isNegative": bool(best[3] < 0),
               "bboxSize": int(max(fp.bbox[0].stop - fp.bbox[0].start, fp.bbox[1].stop - fp.bbox[1].start)),
               "peakSnr": float(best[2]), "isDipole": False}
        if len(peaks) == 2 and cfg.fit_dipoles:
            dip = _measured_dipole(exp, fp, peaks, science)
            if not _dipole_on_footprint(dip, fp, psf.fwhm):  # the fit ran off its pixels: it measured nothing
                dip = {k: (v if k == "dipoleNdata" else float("nan")) for k, v in dip.items()}
            row.update({k: v for k, v in dip.items() if k not in ("dipoleLengthPix", "dipoleX", "dipoleY")})
            row["dipoleLength"] = dip["dipoleLengthPix"] * scale
            row["isDipole"] = True
            if 0 <= dip["dipoleX"] < nx and 0 <= dip["dipoleY"] < ny:
                row["x"], row["y"] = dip["dipoleX"], dip["dipoleY"]
        rows.append(row)
    base = ["x", "y", "centroid_flag", "isNegative", "bboxSize", "peakSnr", "isDipole"]
    cat = pd.DataFrame(rows) if rows else pd.DataFrame(columns=base)
    n = len(cat)
    xs, ys = cat.x.to_numpy(float), cat.y.to_numpy(float)
    phot = forced_psf_flux(exp, xs, ys)
    cat["psfFlux"] = phot.psfFlux.to_numpy()
    cat["psfFluxErr"] = phot.psfFluxErr.to_numpy() * det.noise_scale
    cat["psfFlux_flag"] = ~np.isfinite(cat.psfFlux)
    cat["snr"] = cat.psfFlux / cat.psfFluxErr
    sigma = psf.sigma
    err = np.sqrt(2.0) * sigma / np.maximum(np.abs(cat.snr.to_numpy()), 1e-3)
    cat["xErr"] = err
    cat["yErr"] = err
    ap = [aperture_flux(exp, xi, yi, cfg.aperture_radius_pix) for xi, yi in zip(xs, ys)]
    cat["apFlux"] = [a for a, _ in ap]
    cat["apFluxErr"] = [e for _, e in ap]
    _add_shapes(cat, exp, xs, ys)
    for name, other in (("science", science), ("template", template)):
        if other is not None and other.psf is not None:
            f = forced_psf_flux(other, xs, ys)
            cat[f"{name}Flux"] = f.psfFlux.to_numpy()
            cat[f"{name}FluxErr"] = f.psfFluxErr.to_numpy()
        else:
            cat[f"{name}Flux"] = np.nan
            cat[f"{name}FluxErr"] = np.nan
    _add_pixel_flags(cat, exp, [fp for fp, _ in children])
    if exp.wcs is not None and n:
        radec = exp.wcs.all_pix2world(np.column_stack([xs, ys]), 0)
        cat["ra"], cat["dec"] = radec[:, 0], radec[:, 1]
        cat["raErr"] = cat.xErr * scale / 3600
        cat["decErr"] = cat.yErr * scale / 3600
    else:
        cat["ra"] = cat["dec"] = cat["raErr"] = cat["decErr"] = np.nan
    for col in ("dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleLength", "dipoleAngle", "dipoleChi2"):
        if col not in cat:
            cat[col] = np.nan
    cat["dipoleNdata"] = cat.get("dipoleNdata", pd.Series(0, index=cat.index)).fillna(0).astype(int)
    cat["visit"] = exp.visit
    cat["detector"] = exp.detector
    cat["band"] = exp.band
    cat["midpointMjdTai"] = exp.mjd
    cat["diaSourceId"] = pack_ids(exp.visit, exp.detector, n, "diaSources")
    return cat


def _add_shapes(cat: pd.DataFrame, exp: Exposure, xs: np.ndarray, ys: np.ndarray) -> None:
    """Adaptive second moments of each source (sign-flipped when negative) and of the PSF there."""
    ny, nx = exp.shape
    r = int(np.ceil(4 * exp.psf.sigma)) + 2
    out = {k: np.full(len(xs), np.nan) for k in ("ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF")}
    for i, (x, y, negative) in enumerate(zip(xs, ys, cat.isNegative.to_numpy())):
        ix, iy = int(round(x)), int(round(y))
        if r <= ix < nx - r and r <= iy < ny - r:
            cut = exp.image[iy - r : iy + r + 1, ix - r : ix + r + 1] * (-1 if negative else 1)
            m = adaptive_moments(cut, x - ix + r, y - iy + r, exp.psf.sigma)
            if m.converged:
                out["ixx"][i], out["iyy"][i], out["ixy"][i] = m.ixx, m.iyy, m.ixy
        p = exp.psf.stamp(x=x, y=y)
        c = p.shape[0] // 2
        mp = adaptive_moments(p, c, c, exp.psf.sigma)
        out["ixxPSF"][i], out["iyyPSF"][i], out["ixyPSF"][i] = mp.ixx, mp.iyy, mp.ixy
    for k, v in out.items():
        cat[k] = v


def _add_pixel_flags(cat: pd.DataFrame, exp: Exposure, footprints: list) -> None:
    """pixelFlags_*: a plane anywhere in the footprint, or in the 3x3 pixels round the centroid."""
    ny, nx = exp.shape
    xs, ys = cat.x.to_numpy(float), cat.y.to_numpy(float)
    off = ~((xs >= -0.5) & (xs < nx - 0.5) & (ys >= -0.5) & (ys < ny - 0.5))
    cat["pixelFlags_offimage"] = off
    flat_mask = exp.mask.ravel()
    for name, (plane, where) in PIXEL_FLAGS.items():
        bit = exp.mask_planes.bit(plane)
        vals = np.zeros(len(cat), bool)
        for i, fp in enumerate(footprints):
            if where == "footprint":
                vals[i] = bool((flat_mask[fp.pixels] & bit).any())
            elif not off[i]:
                ix, iy = int(round(xs[i])), int(round(ys[i]))
                box = exp.mask[max(iy - 1, 0) : iy + 2, max(ix - 1, 0) : ix + 2]
                vals[i] = bool((box & bit).any())
        cat[f"pixelFlags_{name}"] = vals
    cat["pixelFlags_edge"] = cat["pixelFlags_edge"] | off


def _detect_on_score(score: Exposure, difference: Exposure, detect_config):
    """Detections thresholded on a separate score image (its S/N is the score), with the planes copied to the
    difference; the difference is measured as it is (no residual background of the score's units)."""
    det = detect_sources(score, detect_config, is_score=True)
    for name in ("DETECTED", "DETECTED_NEGATIVE"):
        difference.set_plane(name, score.plane(name))
    return dataclasses.replace(det, background=np.zeros(difference.shape, np.float32))


def detect_and_measure(result, science: Exposure | None = None, matched_template: Exposure | None = None,
                       detect_config=None, measure_config: MeasureConfig | None = None):
    """Detect diaSources on a difference and measure them.

    Parameters
    ----------
    result : SubtractionResult or Exposure
        The subtraction (or a difference exposure with a PSF, e.g. another tool's).
    science, matched_template : Exposure, optional
        For forced PSF fluxes at each diaSource (``scienceFlux``, ``templateFlux``).
    detect_config : DetectConfig, optional
    measure_config : MeasureConfig, optional
        PSF fluxes (difference, forced science and template) are totals when the images' PSFs carry aperture
        corrections (``photometry.with_aperture_correction``; the difference's is the science's, recorded as
        ``catalog.attrs["apCorr"]``).

    Returns
    -------
    catalog : pandas.DataFrame
        One row per diaSource in APDB column names (fluxes in counts).
    detections : Detections
        Footprints, the thresholded S/N image and the filtered-noise scale.
    sky : pandas.DataFrame
        PSF photometry at empty sky positions (``DetectConfig.n_sky_sources``).
    """
    diff = result.difference if isinstance(result, SubtractionResult) else result
    if science is not None and science.psf is None and isinstance(result, SubtractionResult):
        science = dataclasses.replace(science, psf=result.science_psf)
    separate_score = isinstance(result, SubtractionResult) and result.score is not None \
        and result.score is not diff
    if separate_score:  # zogy: detect on S_corr, measure on D with P_D
        det = _detect_on_score(result.score, diff, detect_config)
    else:
        det = detect_sources(diff, detect_config)
    cat = measure_sources(diff, det, science, matched_template, measure_config)
    cat.attrs["apCorr"] = diff.psf.aperture_correction_value
    sky = pd.DataFrame({"psfFlux": [], "psfFluxErr": []})
    if len(det.sky_positions):
        sky = forced_psf_flux(dataclasses.replace(diff, image=(diff.image - det.background).astype(np.float32)),
                              det.sky_positions[:, 0], det.sky_positions[:, 1])
        sky["psfFluxErr"] *= det.noise_scale
    return cat, det, sky
