"""Named dataset specifications: what a simulated survey looks like.

``hsc-sprint`` follows the HSC "DIA sprint" layout (visits, detectors, CCD size, pixel scale,
field); ``hsc-sprint-mini`` is the same design, small enough for demos and CI; ``psf-sweep``
steps the science seeing through the template's, the regime where the flavors differ.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadInputError

HSC_SPRINT_VISITS = {
    "g": [11690, 11692, 11694, 11696, 11698, 11700, 11702, 11704, 11706, 11708, 11710, 11712,
          29324, 29326, 29336, 29340, 29350],
    "r": [1202, 1204, 1206, 1208, 1210, 1212, 1214, 1216, 1218, 1220,
          23692, 23694, 23704, 23706, 23716, 23718],
}
HSC_SPRINT_DETECTORS = [49, 50, 57, 58, 65, 66]


class SurveySpec(BaseModel):
    """Everything that sets a simulated dataset; sizes in pixels, seeing in arcsec, sky in counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: tuple[int, int] = Field((4176, 2048), description="CCD (ny, nx)")
    pixel_scale: float = Field(0.168, gt=0)
    ra: float = 150.1
    dec: float = Field(2.2, ge=-89, le=89)
    detectors: list[int] = Field(default_factory=lambda: list(HSC_SPRINT_DETECTORS), min_length=1)
    #: Visits per band whose seeing is drawn; the template of a band is the coadd of the best third.
    visit_pool: dict[str, list[int]] = Field(default_factory=lambda: dict(HSC_SPRINT_VISITS))
    #: Visits written as science exposures (default: the whole pool) ...
    science_visits: dict[str, list[int]] | None = None
    #: ... or this many per band, spanning the drawn seeing from the best to the worst visit (so a
    #: small dataset still has science PSFs both narrower and wider than the template's).
    science_per_band: int | None = Field(None, ge=1)
    seeing_range: tuple[float, float] = (0.5, 1.1)
    #: For a PSF sweep: science FWHM = ratio x template FWHM, one visit per ratio (overrides seeing).
    psf_ratios: list[float] | None = None
    template_fwhm: float = Field(0.75, gt=0, description="template seeing for a PSF sweep")
    template_fraction: float = Field(1 / 3, gt=0, le=1)
    min_template_visits: int = Field(2, ge=1)
    moffat_beta: float = Field(3.0, gt=1.5)
    max_ellipticity: float = Field(0.06, ge=0, lt=0.5)
    magzero: float = 31.0  # AB mag of one count in a nominal visit
    zeropoint_scatter: float = Field(0.05, ge=0)
    sky_mag: dict[str, float] = Field(default_factory=lambda: {"g": 22.0, "r": 21.0, "i": 20.3, "z": 19.4})
    sky_gradient: float = Field(0.03, ge=0, description="fractional sky change across the CCD")
    gain: float = Field(3.0, gt=0)
    read_noise_e: float = Field(4.5, ge=0)
    saturation: float = Field(40000.0, gt=0, description="full well in counts above zero")
    star_density: float = Field(2.5e4, ge=0, description="stars per deg^2 brighter than mag_limit")
    galaxy_density: float = Field(1.2e5, ge=0, description="galaxies per deg^2 brighter than mag_limit")
    star_mag_range: tuple[float, float] = (15.0, 26.0)
    galaxy_mag_range: tuple[float, float] = (18.0, 26.0)
    variable_fraction: float = Field(0.05, ge=0, le=1)
    supernova_density: float = Field(3000.0, ge=0, description="supernovae per deg^2 over the survey")
    cosmic_ray_rate: float = Field(1.5e-5, ge=0, description="cosmic rays per pixel per science visit")
    n_bad_columns: int = Field(3, ge=0)
    nodata_strip: tuple[int, int] = Field((16, 48), description="width range of the NO_DATA strip (px)")
    dither_pix: float = Field(20.0, ge=0, description="per-visit pointing offset scale")
    astrometric_error_arcsec: float = Field(0.03, ge=0)
    template_offset_pix: tuple[float, float] = (13.7, -9.2)
    template_rotation_deg: float = 0.3
    psf_grid: tuple[int, int] = Field((5, 3), description="PSF stamps (ny, nx) stored per exposure")

    @model_validator(mode="after")
    def _check(self) -> SurveySpec:
        if min(self.shape) < 128:
            raise ValueError(f"shape {self.shape} must be at least 128 pixels on a side")
        if not self.visit_pool or any(not v for v in self.visit_pool.values()):
            raise ValueError("every band needs at least one visit")
        for band in self.visit_pool:
            if band not in self.sky_mag:
                raise ValueError(f"no sky brightness for band {band!r}")
        if self.science_visits is not None:
            for band, visits in self.science_visits.items():
                if not set(visits) <= set(self.visit_pool.get(band, [])):
                    raise ValueError(f"science visits of band {band!r} must come from its visit pool")
        if self.psf_ratios is not None and len(self.psf_ratios) != sum(map(len, self.visit_pool.values())):
            raise ValueError("psf_ratios needs one ratio per visit")
        return self

    def written_visits(self, fwhm: dict[int, float] | None = None) -> dict[str, list[int]]:
        """Science visits per band; ``fwhm`` (visit -> seeing) is needed for ``science_per_band``."""
        if self.science_visits is not None:
            return dict(self.science_visits)
        if self.science_per_band is None:
            return dict(self.visit_pool)
        if fwhm is None:
            raise ValueError("choosing science visits by seeing needs the visits' seeing")
        out = {}
        for band, pool in self.visit_pool.items():
            ranked = sorted(pool, key=lambda v: fwhm[v])
            picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(self.science_per_band, len(ranked)))))
            out[band] = sorted(ranked[int(i)] for i in picks)
        return out

    def scaled(self, shape: tuple[int, int]) -> SurveySpec:
        """The same design on another CCD size (ny, nx)."""
        return self.model_copy(update={"shape": tuple(shape)}) if min(shape) >= 128 else _invalid(shape)


def _invalid(shape):
    raise BadInputError(f"CCD size {shape[1]} x {shape[0]} is too small (at least 128 x 128 pixels)")


def _sweep_ratios() -> list[float]:
    return [0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6]


SPECS: dict[str, SurveySpec] = {
    "hsc-sprint": SurveySpec(name="hsc-sprint"),
    "hsc-sprint-mini": SurveySpec(
        name="hsc-sprint-mini", shape=(1024, 1024), detectors=[49, 50],
        science_per_band=3,
        template_offset_pix=(9.4, -6.1), psf_grid=(3, 3)),
    "psf-sweep": SurveySpec(
        name="psf-sweep", shape=(1024, 1024), detectors=[50],
        visit_pool={"r": [100 + i for i in range(len(_sweep_ratios()))]}, psf_ratios=_sweep_ratios(),
        supernova_density=0.0, variable_fraction=0.0, min_template_visits=4, psf_grid=(3, 3)),
}


def get_spec(name: str) -> SurveySpec:
    """A named spec, or a clear error listing the names."""
    try:
        return SPECS[name]
    except KeyError:
        raise BadInputError(f"unknown dataset spec {name!r} (choose from {', '.join(sorted(SPECS))})") from None
