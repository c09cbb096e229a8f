"""The simulator: determinism, honest noise, fluxes against the truth, realism, and its command line."""

import filecmp

import galsim
import numpy as np
import pandas as pd
import pytest
import yaml

from dialab.cli import main
from dialab.exposure import read_exposure
from dialab.repair import repair_cosmic_rays
from dialab.simulate.observe import PsfField, draw_conditions, render_exposure, saturate_and_bleed, template_conditions
from dialab.simulate.specs import get_spec
from dialab.simulate.survey import build_scene, simulate_dataset

SMALL = get_spec("hsc-sprint-mini").model_copy(update={
    "shape": (384, 320), "science_visits": {"g": [11690], "r": [1202, 23692]}, "detectors": [49]})


@pytest.fixture(scope="module")
def small_world():
    conditions = draw_conditions(SMALL, 5)
    return conditions, build_scene(SMALL, conditions, 5)


def test_same_spec_and_seed_give_identical_files(tmp_path):
    a = simulate_dataset(SMALL, tmp_path / "a", seed=3, workers=2, progress=False).parent
    b = simulate_dataset(SMALL, tmp_path / "b", seed=3, workers=1, progress=False).parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + 3 + 1 + 3  # 2 templates, 3 science, manifest, 3 truth tables
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
    c = simulate_dataset(SMALL, tmp_path / "c", seed=4, workers=2, progress=False).parent
    assert not filecmp.cmp(a / files[-1], c / files[-1], shallow=False) or not all(
        filecmp.cmp(a / f, c / f, shallow=False) for f in files)


def test_manifest_lists_every_exposure_with_relative_paths(tmp_path):
    path = simulate_dataset(SMALL, tmp_path, seed=1, progress=False)
    manifest = yaml.safe_load(path.read_text())
    assert len(manifest["entries"]) == 3
    for e in manifest["entries"]:
        sci = read_exposure(tmp_path / e["science"])
        tpl = read_exposure(tmp_path / e["template"])
        assert (sci.visit, sci.detector, sci.band) == (e["visit"], e["detector"], e["band"])
        assert sci.mjd == pytest.approx(e["mjd"])
        # the template is a deeper coadd with its own WCS
        assert tpl.header["NCOADD"] >= 2
        assert np.median(tpl.variance) < 0.6 * np.median(sci.variance[~sci.unusable])
        assert not np.allclose(tpl.wcs.wcs.crpix, sci.wcs.wcs.crpix)
    for name in ("objects", "epochs", "visits"):
        assert len(pd.read_parquet(tmp_path / manifest["truth"][name])) > 0


@pytest.mark.parametrize("visit, template", [(1202, False), (23692, False), (None, True)])
def test_noise_is_honest(small_world, visit, template):
    conditions, scene = small_world
    conds = template_conditions(SMALL, conditions, "r") if template else [conditions[visit]]
    r = render_exposure(SMALL, scene, conds, 49, 5, template=template)
    exp = r.exposure
    good = ~(exp.plane("BAD", "SAT", "NO_DATA"))
    pull = (exp.image - r.model)[good] / np.sqrt(exp.variance[good])
    assert np.std(pull) == pytest.approx(1.0, abs=0.02)
    assert abs(np.mean(pull)) < 0.01


def test_science_has_the_defects_of_raw_data(small_world):
    conditions, scene = small_world
    r = render_exposure(SMALL, scene, [conditions[1202]], 49, 5)
    exp = r.exposure
    assert exp.plane("NO_DATA")[:, 0].all() and not exp.plane("NO_DATA")[:, -1].any()
    bad_cols = np.flatnonzero(exp.plane("BAD").sum(axis=0) > 0)
    assert len(bad_cols) == SMALL.n_bad_columns
    # cosmic rays: sharp unmasked excesses in the model that no PSF-convolved source makes
    cr = _cosmic_ray_deposit(scene, conditions[1202])[1]
    assert (cr > 100).sum() > 0 and not exp.plane("CR").any()
    # the sky gradient survives the constant background subtraction
    free = ~exp.unusable & (np.abs(r.model) < 50)
    left = np.median(exp.image[:, 60:100][free[:, 60:100]])
    right = np.median(exp.image[:, -40:][free[:, -40:]])
    assert left != pytest.approx(right, abs=0.5)


def _cosmic_ray_deposit(scene, cond):
    """A science exposure with many cosmic rays, and the charge they deposited (model difference)."""
    r = render_exposure(SMALL.model_copy(update={"cosmic_ray_rate": 2e-4}), scene, [cond], 49, 5)
    clean = render_exposure(SMALL.model_copy(update={"cosmic_ray_rate": 0.0}), scene, [cond], 49, 5)
    return r, r.model - clean.model


def test_cosmic_ray_repair_finds_the_simulated_hits_and_spares_stars(small_world):
    conditions, scene = small_world
    r, deposit = _cosmic_ray_deposit(scene, conditions[1202])
    exp = r.exposure
    strong = (deposit > 8 * np.sqrt(exp.variance)) & ~exp.unusable
    n = repair_cosmic_rays(exp)
    flagged = exp.plane("CR")
    assert n > 0 and exp.plane("INTRP").sum() == n
    assert flagged[strong].mean() > 0.9
    stars = r.sources[(r.sources.kind != "supernova") & (r.sources.flux > 1000)]
    peaks = [(int(round(y)), int(round(x))) for x, y in zip(stars.x, stars.y)
             if 0 <= round(x) < exp.shape[1] and 0 <= round(y) < exp.shape[0]]
    hit = [flagged[p] and deposit[p] < 1 for p in peaks]
    assert len(peaks) >= 3 and not any(hit)
    # repaired pixels sit near the sky-plus-sources model again
    resid = (exp.image - (r.model - deposit))[flagged & strong] / np.sqrt(exp.variance[flagged & strong])
    assert np.median(np.abs(resid)) < 3


def test_bleed_trails_conserve_the_excess_charge():
    image = np.zeros((200, 5))
    image[100, 2] = 10_500.0  # 10 full wells' worth in one pixel above a 1000-count well
    sat = saturate_and_bleed(image, 1000.0)
    column = np.flatnonzero(sat[:, 2])
    assert sat[:, [0, 1, 3, 4]].sum() == 0
    assert 10 <= len(column) <= 12 and column.min() < 100 < column.max()
    assert np.all(image[sat] == 1000.0)


def test_psf_grid_follows_the_visit_seeing_and_varies_across_the_ccd(small_world):
    conditions, _ = small_world
    cond = conditions[1202]
    psf = PsfField(SMALL, [cond]).grid()
    fwhm_pix = cond.fwhm / SMALL.pixel_scale
    assert psf.at(*psf.center).fwhm == pytest.approx(fwhm_pix, rel=0.1)
    corners = [psf.stamp(x=x, y=y) for x, y in [(0, 0), (SMALL.shape[1] - 1, SMALL.shape[0] - 1)]]
    assert np.abs(corners[0] - corners[1]).max() > 0.01 * corners[0].max()


def _isolated_star_pulls(spec, scene, cond, seed):
    """(aperture flux - truth x PSF fraction) / error for isolated stars of one rendered visit."""
    r = render_exposure(spec, scene, [cond], 49, seed)
    exp, src = r.exposure, r.sources
    psf = PsfField(spec, [cond])
    fwhm = cond.fwhm / spec.pixel_scale
    beta, noise = spec.moffat_beta, float(np.sqrt(np.median(exp.variance)))
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    rad, r_in, r_out = 2.0 * fwhm, 3.0 * fwhm, 4.5 * fwhm
    yy, xx = np.mgrid[0 : exp.shape[0], 0 : exp.shape[1]]
    pulls = []
    for s in src[(src.kind == "star") & (src.flux > 0)].itertuples():
        others = src[src.id != s.id]
        d = np.hypot(others.x - s.x, others.y - s.y)
        # isolated: the neighbours' Moffat light reaching the annulus is far below the pixel noise
        reach = others.flux * (beta - 1) / (np.pi * alpha**2) * (1 + (np.maximum(d - r_out, 0) / alpha) ** 2) ** -beta
        edge = r_out + 3
        inside = edge < s.x < exp.shape[1] - edge and edge < s.y < exp.shape[0] - edge
        if reach.sum() > 0.03 * noise or (d < rad + 2 * fwhm).any() or not inside:
            continue
        cut = (slice(int(s.y - r_out) - 1, int(s.y + r_out) + 2), slice(int(s.x - r_out) - 1, int(s.x + r_out) + 2))
        dist = np.hypot(xx[cut] - s.x, yy[cut] - s.y)
        ap, ann = dist <= rad, (dist >= r_in) & (dist <= r_out)
        if exp.unusable[cut][ap | ann].any():
            continue
        img, var = exp.image[cut].astype(float), exp.variance[cut].astype(float)
        flux = img[ap].sum() - img[ann].mean() * ap.sum()
        err = np.sqrt(var[ap].sum() + ap.sum() ** 2 * var[ann].sum() / ann.sum() ** 2)
        # the truth flux times the PSF's share of the same estimate (drawn at the same sub-pixel spot)
        stamp = galsim.ImageF(galsim.BoundsI(cut[1].start + 1, cut[1].stop, cut[0].start + 1, cut[0].stop),
                              scale=1.0)
        psf.at(s.x, s.y).drawImage(image=stamp, center=galsim.PositionD(s.x + 1, s.y + 1))
        frac = stamp.array[ap].sum() - ap.sum() * stamp.array[ann].mean()
        pulls.append((flux - s.flux * frac) / err)
    return pulls


def test_aperture_fluxes_of_isolated_stars_match_the_truth():
    spec = SMALL.model_copy(update={"shape": (1024, 1024), "star_density": 3e5, "galaxy_density": 2e4,
                                    "star_mag_range": (18.0, 23.5), "variable_fraction": 0.0,
                                    "cosmic_ray_rate": 0.0})
    conditions = draw_conditions(spec, 11)
    scene = build_scene(spec, conditions, 11)
    pulls = np.concatenate([_isolated_star_pulls(spec, scene, conditions[v], 11) for v in (1202, 23692, 11690)])
    print(f"{len(pulls)} isolated stars: pull mean {pulls.mean():.3f}, std {pulls.std():.3f}")
    assert len(pulls) >= 150
    assert 0.9 <= np.std(pulls) <= 1.15
    assert abs(np.mean(pulls)) < 3 / np.sqrt(len(pulls))


@pytest.mark.parametrize("argv, message", [
    (["simulate", "no-such-spec", "-o", "{tmp}/x"], "unknown dataset spec"),
    (["simulate", "hsc-sprint-mini", "-o", "/proc/dialab-cannot-write"], "cannot write"),
    (["simulate", "psf-sweep", "-o", "{tmp}/x", "--size", "-10", "512"], "at least 128"),
])
def test_simulate_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cosmic_ray_repair_of_an_undersampled_image_spares_its_stars():
    """Moffat stars of FWHM 1.3 px (a native WFC3/IR or IRAC frame) with cosmic-ray tracks: a star centred on a pixel
    is sharper than the PSF model made from stars at every phase, and the model's 25% tolerance took 20% of the bright
    stars' cores for cosmic rays. The tolerance is raised until the stars are spared; the hits are still found."""
    import galsim

    from dialab.exposure import Exposure
    from dialab.simulate.observe import add_cosmic_rays
    from dialab.simulate.render import draw_point_sources, random_star_field

    rng = np.random.default_rng(3)
    shape = (600, 600)
    x, y, flux = random_star_field(shape, 400, rng, flux_range=(2e3, 2e5), min_separation_pix=6)
    model = draw_point_sources(shape, x, y, flux, lambda a, b: galsim.Moffat(beta=3, fwhm=1.3)) + 100.0
    deposit = add_cosmic_rays(np.zeros(shape), 1.5e-4, rng)
    image = (rng.poisson((model + deposit) * 2.0) + rng.normal(0, 5.0, shape)) / 2.0 - 100.0
    exp = Exposure(image.astype(np.float32), np.zeros(shape, np.int32), ((model + deposit) / 2 + 6.25).astype(np.float32))
    repair_cosmic_rays(exp)
    flagged = exp.plane("CR")
    strong = deposit > 8 * np.sqrt(exp.variance)
    assert strong.sum() > 50 and flagged[strong].mean() > 0.9
    bright = (flux > 2e4) & (x > 2) & (x < 597) & (y > 2) & (y < 597)
    centres = flagged[np.round(y[bright]).astype(int), np.round(x[bright]).astype(int)]
    assert bright.sum() > 20 and centres.mean() <= 0.05
