"""One preparation chain for a unit's images: read -> manifest metadata -> repair -> PSFs -> align -> inject.

The pipeline unit, the association step (forced photometry on the science image), the report's figures and
``dialab subtract`` all go through it, so each sees the science image that was actually subtracted.
"""

from __future__ import annotations

from pathlib import Path

from ..background import sky_background
from ..exposure import Exposure, read_exposure
from ..photometry import with_aperture_correction
from ..psf import check_given_psf, measure_psf
from ..repair import repair_cosmic_rays
from ..subtraction.noise import image_variance_scale
from ..timing import timed
from ..warp import align_to


def ensure_psf(exp: Exposure) -> Exposure:
    """The exposure with a PSF: one measured from its stars (plain FITS), or the given one checked against the
    stars and given their spatial variation (see ``psf.check_given_psf``)."""
    with timed("psf"):
        exp.psf = measure_psf(exp) if exp.psf is None else check_given_psf(exp, exp.psf)
    return exp


def _aperture_corrected(exp: Exposure) -> Exposure:
    """The exposure's PSF carrying the aperture correction of its stars, measured before fakes are drawn with it."""
    with timed("psf"):
        exp.psf = with_aperture_correction(exp)
    return exp


def prepare_science(path, psf=None, noise=None, *, entry=None, repair=None, aperture_correction=True) -> Exposure:
    """The science exposure as the subtraction uses it: read, with the manifest ``entry``'s visit, detector,
    band and epoch (plain FITS often lack them), cosmic rays repaired when ``repair`` (a RepairConfig) asks,
    and a PSF."""
    with timed("read"):
        science = read_exposure(path, psf=psf, noise=noise)
    if entry is not None:
        science.visit, science.detector, science.band, science.mjd = entry.visit, entry.detector, entry.band, entry.mjd
    ensure_psf(science)
    if repair is not None and repair.cosmic_rays:
        with timed("repair"):
            repair_cosmic_rays(science, repair.nsigma, repair.margin)
    # on the repaired pixels, whose stars registration then finds again for free
    return _aperture_corrected(science) if aperture_correction else science


def prepare_template(science: Exposure, path, psf=None, noise=None, aperture_correction=True) -> Exposure:
    """The template on the science pixel grid, with a PSF."""
    with timed("read"):
        template = read_exposure(path, psf=psf, noise=noise)
    with timed("align"):
        template = align_to(template, science)
    ensure_psf(template)
    return _aperture_corrected(template) if aperture_correction else template


def release_sky(exp: Exposure) -> Exposure:
    """The exposure with its noise scale measured (a full pass over its sky-subtracted pixels, kept) and its
    sky's full-size plane dropped, for a caller that changes its pixels no more (``dialab subtract``; the pipeline
    injects fakes after the preparation, which makes both anew): later steps read stamps and windows of the sky
    from its mesh, and the next image's preparation has 4 bytes per pixel more room."""
    image_variance_scale(exp)
    sky_background(exp).release()
    return exp


def prepare_entry(entry, root: str | Path, repair=None, aperture_correction=True) -> tuple[Exposure, Exposure]:
    """Science and aligned template of one manifest entry (paths relative to ``root``)."""

    def path(rel):
        return None if rel is None else str(Path(root) / rel)

    science = prepare_science(path(entry.science), path(entry.science_psf), path(entry.science_noise), entry=entry,
                              repair=repair, aperture_correction=aperture_correction)
    template = prepare_template(science, path(entry.template), path(entry.template_psf), path(entry.template_noise),
                                aperture_correction)
    return science, template

