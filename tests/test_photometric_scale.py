"""The kernel sum measured from stars with errors in both images (subtraction.photometric_scale)."""

import numpy as np
import pytest

from dialab.subtraction.photometric_scale import fit_flux_ratio


def test_flux_ratio_is_unbiased_when_the_convolved_image_is_the_noisier():
    """Regression dilution: least squares of f_t on a noisy f_c is biased low by var(f_c)/var(true); the
    grouped (Bartlett) ratio is not. Truth r = 0.8, 400 stars of S/N 3-50, convolved image 3x noisier."""
    rng = np.random.default_rng(5)
    ratios, ols = [], []
    for _ in range(40):
        true = 10 ** rng.uniform(2.0, 3.3, 400)  # S/N 3-50 in the convolved image
        e_c = np.sqrt(true + 3 * 400.0)
        e_t = np.sqrt(0.8 * true + 400.0) / 1.7
        f_c = true + rng.normal(0, e_c)
        f_t = 0.8 * true + rng.normal(0, e_t)
        ratios.append(fit_flux_ratio(f_t, e_t, f_c, e_c).scale)
        w = 1 / e_t**2
        ols.append(np.sum(w * f_t * f_c) / np.sum(w * f_c**2))
    assert np.mean(ratios) == pytest.approx(0.8, rel=0.0015)
    assert np.mean(ols) < 0.8 * 0.997  # the bias the kernel fit had: this test can tell the two apart


def test_flux_ratio_ignores_variables_and_reports_inconsistent_skies():
    rng = np.random.default_rng(6)
    true = 10 ** rng.uniform(3, 4, 200)
    f_c = true + rng.normal(0, 30, 200)
    f_t = 1.3 * true + rng.normal(0, 30, 200)
    f_t[:10] *= 3  # variables and transients on top of stars
    fit = fit_flux_ratio(f_t, np.full(200, 30.0), f_c, np.full(200, 30.0))
    assert fit.scale == pytest.approx(1.3, rel=0.003)
    assert fit.consistent_fraction > 0.9
    other = fit_flux_ratio(rng.permutation(f_t), np.full(200, 30.0), f_c, np.full(200, 30.0))  # another field
    assert other.consistent_fraction < 0.5 or other.chi2_dof > 100


def test_flux_ratio_is_not_moved_by_a_background_offset_in_one_image():
    """A background model that took up the sources' faint wings leaves a constant offset in one image's
    fluxes: it goes into the intercept, not the ratio (a ratio of sums would move by offset / mean flux)."""
    rng = np.random.default_rng(8)
    true = 10 ** rng.uniform(3, 4.5, 300)
    e = np.full(300, 40.0)
    f_c = true + rng.normal(0, 40, 300)
    f_t = 0.8 * true - 150.0 + rng.normal(0, 40, 300)
    fit = fit_flux_ratio(f_t, e, f_c, e)
    assert fit.scale == pytest.approx(0.8, rel=0.002)
    assert abs(f_t.sum() / f_c.sum() / 0.8 - 1) > 0.01  # what the offset does to a plain ratio of sums


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ratio_with_psfs_measured_from_the_stars_is_right_within_its_error(seed):
    """A measured PSF's stamp misses the light beyond it and what its stars' local sky took, by a different share in
    each image: fluxes calibrated with the two models put the ratio 1-2% off the truth here, 3-6 of its errors. The
    common aperture needs no model: within 2.5 of its (honest, < 0.8%) error."""
    import dataclasses

    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair
    from dialab.subtraction import SubtractConfig, subtract

    spec = TruthPairSpec(shape=(768, 768), science_fwhm=4.0, template_fwhm=3.4)
    sci, tpl, _, _ = simulate_truth_pair(spec, seed=seed)
    d = subtract(dataclasses.replace(sci, psf=None), dataclasses.replace(tpl, psf=None),
                 SubtractConfig(flavor="convolveTemplate")).diagnostics
    assert d.scale_method == "aperture" and d.sum_source in ("free fit", "stars (aperture)")
    assert d.scale_error < 0.008 * spec.flux_ratio
    assert abs(d.star_flux_ratio - spec.flux_ratio) < 2.5 * d.scale_error


def test_given_psfs_keep_the_weighted_ratio_and_the_header_says_what_set_the_sum(tmp_path):
    """With both PSFs given, the PSF-calibrated (weighted) ratio is used; the difference's header and the
    diagnostics say whether the free fit or the stars' ratio set the kernel sum."""
    from astropy.io import fits

    from dialab.pipeline.repository import write_difference
    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair
    from dialab.subtraction import SubtractConfig, subtract

    spec = TruthPairSpec(shape=(512, 512), science_fwhm=4.0, template_fwhm=3.4)
    sci, tpl, _, _ = simulate_truth_pair(spec, seed=1)
    result = subtract(sci, tpl, SubtractConfig(flavor="convolveTemplate"))
    d = result.diagnostics
    assert d.scale_method == "weighted"
    assert d.sum_source == ("free fit" if d.kernel_sum == d.free_kernel_sum else "stars (weighted)")
    write_difference(result, tmp_path / "d.fits")
    assert fits.getheader(tmp_path / "d.fits")["KSUMSRC"] == d.sum_source
    assert d.sum_source in d.summary()


@pytest.mark.parametrize("flavor", ["convolveTemplate", "zogy"])
def test_a_deconvolving_fit_takes_a_less_precise_ratio(flavor):
    """Science FWHM 3 px against a 4-px template, plain FITS (PSFs from the stars), few stars: the stars' ratio is
    good to about 1% (too imprecise to override a fit that matches), while a convolveTemplate fit deconvolves and
    its free sum came out 3.8% high. Its sum is held at the ratio; ZOGY's flux scale, which used that fit's sum
    when the ratio was not trusted, is the ratio too."""
    import dataclasses

    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair
    from dialab.subtraction import SubtractConfig, subtract

    spec = TruthPairSpec(shape=(600, 600), science_fwhm=3.0, template_fwhm=4.0, n_stars=50, n_galaxies=150,
                         n_transients=10)
    science, template, _, _ = simulate_truth_pair(spec, seed=1)
    science, template = (dataclasses.replace(e, psf=None) for e in (science, template))
    d = subtract(science, template, SubtractConfig(flavor=flavor)).diagnostics
    assert 0.008 < d.scale_error / d.star_flux_ratio < 0.03  # the case this is about
    assert d.kernel_sum == pytest.approx(spec.flux_ratio, rel=0.015)


def test_cross_weighted_ratio_is_not_moved_by_neighbours_or_asymmetric_psfs():
    """A noise-free field of 1500 sources per Mpix (stars and PSF-convolved galaxies), sheared Gaussian PSFs of
    different sizes and shapes in the two images, true ratio 1.3. Each image's sum weighted by the other image's
    (flipped, smoothed) PSF sees the same scene through the same PSF: the stars' ratio is exact to 2e-4. One
    Gaussian weight for both images, calibrated by each image's own PSF (the ratio before), lets the neighbours'
    light into the broader image's sum more: its stars' median ratio is 1% off here."""
    import galsim

    from dialab.psf import ImagePsf
    from dialab.simulate.render import draw_point_sources
    from dialab.subtraction.photometric_scale import measure_photometric_scale

    shape, ratio = (512, 512), 1.3
    rng = np.random.default_rng(3)
    psfs = {"target": galsim.Gaussian(sigma=2.4).shear(g1=0.15, g2=0.05),
            "conv": galsim.Gaussian(sigma=2.0).shear(g1=-0.1, g2=0.08)}
    sx, sy, sf = rng.uniform(30, 482, 240), rng.uniform(30, 482, 240), rng.uniform(1000, 4000, 240)
    gx, gy, gf = rng.uniform(30, 482, 160), rng.uniform(30, 482, 160), rng.uniform(1000, 4000, 160)
    images = {}
    for side, scale in (("target", ratio), ("conv", 1.0)):
        psf = psfs[side]
        galaxy = galsim.Convolve(galsim.Exponential(half_light_radius=1.5).shear(g1=0.2), psf)
        images[side] = (draw_point_sources(shape, sx, sy, scale * sf, lambda x, y, p=psf: p)
                        + draw_point_sources(shape, gx, gy, scale * gf, lambda x, y, g=galaxy: g))
    models = {side: ImagePsf(p.drawImage(nx=41, ny=41, scale=1.0).array) for side, p in psfs.items()}
    var = np.full(shape, 1e-4)
    positions = np.column_stack([np.rint(sx), np.rint(sy)]).astype(int)
    fit = measure_photometric_scale(images["target"], var, models["target"], images["conv"], var, models["conv"],
                                    positions)
    assert fit.n_used >= 60
    assert fit.scale == pytest.approx(ratio, rel=2e-4)

    def gaussian_weighted(image, model):  # the ratio before: one weight of 2.5 sigma of the broader PSF
        yy, xx = np.mgrid[-24:25, -24:25]
        fluxes = []
        for x, y in zip(sx, sy):
            ix, iy = int(round(x)), int(round(y))
            if not (24 <= ix < shape[1] - 24 and 24 <= iy < shape[0] - 24):
                fluxes.append(np.nan)
                continue
            w = np.exp(-((xx - (x - ix)) ** 2 + (yy - (y - iy)) ** 2) / (2 * 6.0**2))
            p = model.draw(x - ix, y - iy)
            h = p.shape[0] // 2
            fluxes.append((w * image[iy - 24 : iy + 25, ix - 24 : ix + 25]).sum() / (w[24 - h : 25 + h, 24 - h : 25 + h]
                                                                                      * p).sum())
        return np.array(fluxes)

    before = gaussian_weighted(images["target"], models["target"]) / gaussian_weighted(images["conv"], models["conv"])
    assert abs(np.nanmedian(before) / ratio - 1) > 5e-3
