"""The sky of a simulated field: stars, galaxies, variable stars and supernovae, on sky coordinates.

Number counts follow power laws dN/dm ~ 10^(a m) (a = 0.15 for high-latitude stars, 0.33 for
galaxies); galaxies are bulge (de Vaucouleurs) + disk (exponential) with sizes shrinking with
magnitude; variables are sinusoidal, supernovae rise and decline around a peak date on a host.
"""

from __future__ import annotations

from dataclasses import dataclass

import galsim
import numpy as np
import pandas as pd

from ..exposure import NJY_ZEROPOINT

STAR_SLOPE, GALAXY_SLOPE = 0.15, 0.33
#: Colour coefficient per band: mag_band = mag_r + coeff * (g - r).
BAND_COLOUR = {"g": 1.0, "r": 0.0, "i": -0.45, "z": -0.7}
SN_RISE_DAYS, SN_DECLINE_MAG_PER_DAY, SN_REDDENING_PER_DAY = 8.0, 0.03, 0.015
_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=2e-3)


def power_law_mags(n: int, lo: float, hi: float, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitudes with dN/dm ~ 10^(slope m) between lo and hi (inverse-CDF sampling)."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.uniform(0, 1, n) * (b - a)) / slope


@dataclass
class Scene:
    """All objects of the field; ``objects`` has one row per object, positions in degrees."""

    objects: pd.DataFrame

    def magnitudes(self, band: str, mjd: float) -> np.ndarray:
        """AB magnitude of every object in ``band`` at ``mjd`` (inf when a supernova is not there)."""
        o = self.objects
        colour = BAND_COLOUR[band]
        mag = o.mag_r.to_numpy() + colour * o.colour.to_numpy()
        var = (o.kind == "variable").to_numpy()
        phase = 2 * np.pi * mjd / o.period.to_numpy()[var] + o.phase.to_numpy()[var]
        mag[var] += 0.5 * o.amplitude.to_numpy()[var] * np.sin(phase)
        sn = (o.kind == "supernova").to_numpy()
        dt = mjd - o.peak_mjd.to_numpy()[sn]
        rise = 2.5 * np.log10(np.e) * (np.minimum(dt, 0) / SN_RISE_DAYS) ** 2 / 2
        decline = SN_DECLINE_MAG_PER_DAY * np.maximum(dt, 0)
        sn_mag = o.mag_r.to_numpy()[sn] + rise + decline + colour * (o.colour.to_numpy()[sn]
                                                                     + SN_REDDENING_PER_DAY * np.maximum(dt, 0))
        sn_mag[dt < -5 * SN_RISE_DAYS] = np.inf
        mag[sn] = sn_mag
        return mag

    def flux_njy(self, band: str, mjd: float) -> np.ndarray:
        return 10 ** (-0.4 * (self.magnitudes(band, mjd) - NJY_ZEROPOINT))

    def galaxy_profile(self, row) -> galsim.GSObject:
        """Unit-flux bulge + disk of one galaxy row, sizes in arcsec."""
        disk = galsim.Exponential(half_light_radius=row.disk_hlr, gsparams=_GSPARAMS).shear(
            e1=row.e1, e2=row.e2)
        if row.bulge_fraction <= 0:
            return disk
        bulge = galsim.DeVaucouleurs(half_light_radius=row.bulge_hlr, trunc=8 * row.bulge_hlr,
                                     gsparams=_GSPARAMS).shear(e1=0.5 * row.e1, e2=0.5 * row.e2)
        return galsim.Add([(1 - row.bulge_fraction) * disk, row.bulge_fraction * bulge])


def make_scene(ra: float, dec: float, half_width_deg: tuple[float, float], star_density: float,
               galaxy_density: float, star_mags: tuple[float, float], galaxy_mags: tuple[float, float],
               variable_fraction: float, supernova_density: float, sn_nights: list[float],
               rng: np.random.Generator) -> Scene:
    """Objects over a (ra, dec) box of half-widths ``half_width_deg`` (dRA on the sky, dDec).

    Supernovae peak within a few weeks of one of ``sn_nights``, so that the survey sees them.
    """
    hw_x, hw_y = half_width_deg
    area = 4 * hw_x * hw_y
    cosd = np.cos(np.deg2rad(dec))

    def positions(n):
        return ra + rng.uniform(-hw_x, hw_x, n) / cosd, dec + rng.uniform(-hw_y, hw_y, n)

    n_star = rng.poisson(star_density * area)
    n_gal = rng.poisson(galaxy_density * area)
    sra, sdec = positions(n_star)
    stars = pd.DataFrame({"kind": "star", "ra": sra, "dec": sdec,
                          "mag_r": power_law_mags(n_star, *star_mags, STAR_SLOPE, rng),
                          "colour": rng.uniform(0.2, 1.4, n_star)})
    var = rng.uniform(size=n_star) < variable_fraction
    stars.loc[var, "kind"] = "variable"
    stars["amplitude"] = np.where(var, rng.uniform(0.1, 0.8, n_star), 0.0)
    stars["period"] = np.where(var, 10 ** rng.uniform(-0.7, 1.5, n_star), np.inf)
    stars["phase"] = np.where(var, rng.uniform(0, 2 * np.pi, n_star), 0.0)

    gra, gdec = positions(n_gal)
    gmag = power_law_mags(n_gal, *galaxy_mags, GALAXY_SLOPE, rng)
    hlr = np.clip(0.8 * 10 ** (-0.1 * (gmag - 20)) * 10 ** rng.normal(0, 0.2, n_gal), 0.12, 3.0)
    e = np.minimum(np.abs(rng.normal(0, 0.3, n_gal)), 0.7)
    angle = rng.uniform(0, np.pi, n_gal)
    bulge = np.where(rng.uniform(size=n_gal) < 0.6, rng.uniform(0, 0.6, n_gal), 0.0)
    galaxies = pd.DataFrame({"kind": "galaxy", "ra": gra, "dec": gdec, "mag_r": gmag,
                             "colour": rng.uniform(0.3, 1.1, n_gal), "disk_hlr": hlr,
                             "bulge_hlr": np.maximum(0.35 * hlr, 0.08), "bulge_fraction": bulge,
                             "e1": e * np.cos(2 * angle), "e2": e * np.sin(2 * angle)})

    hosts = galaxies[galaxies.mag_r < 23.5]
    n_sn = min(rng.poisson(supernova_density * area), len(hosts))
    host = hosts.iloc[rng.choice(len(hosts), n_sn, replace=False)] if n_sn else hosts.iloc[:0]
    r = np.abs(rng.normal(0, 1, n_sn)) * host.disk_hlr.to_numpy() / 3600
    theta = rng.uniform(0, 2 * np.pi, n_sn)
    sne = pd.DataFrame({"kind": "supernova", "ra": host.ra.to_numpy() + r * np.cos(theta) / cosd,
                        "dec": host.dec.to_numpy() + r * np.sin(theta), "mag_r": rng.uniform(20.5, 24.0, n_sn),
                        "colour": rng.normal(0.0, 0.1, n_sn),
                        "peak_mjd": rng.choice(sn_nights, n_sn) + rng.uniform(-25, 40, n_sn),
                        "host_index": host.index.to_numpy() + n_star})
    objects = pd.concat([stars, galaxies, sne], ignore_index=True)
    defaults = {"amplitude": 0.0, "period": np.inf, "phase": 0.0, "disk_hlr": 0.0, "bulge_hlr": 0.0,
                "bulge_fraction": 0.0, "e1": 0.0, "e2": 0.0, "peak_mjd": np.nan, "host_index": -1}
    objects = objects.fillna(defaults)
    objects["host_index"] = objects.host_index.astype(np.int64)
    objects.insert(0, "id", np.arange(len(objects), dtype=np.int64))
    host_ids = objects.id.to_numpy()
    objects["host_id"] = np.where(objects.host_index >= 0, host_ids[objects.host_index.clip(0)], -1)
    return Scene(objects.drop(columns="host_index"))
