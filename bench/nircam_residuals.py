"""Residuals of each kernel basis on the real JWST NIRCam pair, beside SFFT's published difference (issue 14).

The pair (F200W, two epochs five months apart, given WebbPSF models and noise maps) is subtracted as
`dialab subtract` does it, once per kernel basis; each difference is counted as the issue counts it
(``dialab.analysis.residuals.count_residuals``: blobs of |z| > 5 of at least 3 pixels, z the difference over its
robust std on source-free sky, how many of the 12 brightest template sources have one, and the residual power
on the sources), and `dialab detect`'s unflagged diaSources are counted.

Two footings, as the peer's product is an S/N map (its difference over a propagated noise that includes the
sources' photon noise, up to 4x the sky's at the brightest cores): "flux" counts a difference in flux units
(ours as is; SFFT's as its S/N map times our difference's per-pixel sigma), "S/N" counts S/N maps (ours: the
difference over the square root of its variance plane). A figure shows the 12 brightest sources in every
difference.

Run: python bench/nircam_residuals.py [--shared ../shared] [--figure docs/img/nircam_residuals.png] [--bright-stamps]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

BASES = ("alard-lupton", "delta", "psf-models")
STEMS = {"science": "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp",
         "template": "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--figure", help="write the figure of the 12 brightest sources here (PNG)")
    parser.add_argument("--bright-stamps", action="store_true",
                        help="also with candidate_snr_max 1e5 (bright sources as kernel stamps)")
    args = parser.parse_args()
    real = Path(args.shared) / "data" / "real"
    if not (real / "nircam").is_dir():
        print(f"skipped: no NIRCam data under {real} (pass --shared)")
        return
    from astropy.io import fits

    from dialab.analysis.residuals import brightest_sources, count_residuals
    from dialab.measurement import BAD_FLAGS, detect_and_measure
    from dialab.pipeline.config import PipelineConfig
    from dialab.pipeline.prepare import prepare_science, prepare_template
    from dialab.subtraction import SubtractConfig, subtract

    d = real / "nircam"
    paths = {k: (d / f"{s}.fits", d / f"{s}.WebbPSF.fits", d / f"{s}.noise.fits") for k, s in STEMS.items()}
    science = prepare_science(*paths["science"], repair=PipelineConfig().repair)
    template = prepare_template(science, *paths["template"])
    sigma = science.psf.sigma
    peer = np.nan_to_num(fits.getdata(real / "peer-results" / "sfft" /
                                      "nircam_t003_minus_t001.sfft.DeCorrelated.SNR.fits"))
    rows = []
    runs = [(b, {}) for b in BASES]
    if args.bright_stamps:
        runs += [(b, {"candidate_snr_max": 1e5}) for b in BASES]
    images = {}
    for basis, extra in runs:
        label = basis + (" + bright stamps" if extra else "")
        t0 = time.perf_counter()
        res = subtract(science, template, SubtractConfig(kernel_basis=basis, **extra))
        seconds = time.perf_counter() - t0
        diff = res.difference
        usable = ~diff.plane("EDGE", "NO_DATA")
        sigma_map = np.sqrt(diff.variance)
        counts = [count_residuals(img, science.image, template.image, sigma, usable=usable)
                  for img in (diff.image, diff.image / sigma_map)]
        cat, _, _ = detect_and_measure(res, science, res.matched_image)
        unflagged = int((~cat[list(BAD_FLAGS)].any(axis=1)).sum()) if len(cat) else 0
        rows.append((label, counts, unflagged, seconds))
        images[label] = diff.image
        if len(rows) == 1:  # the peer, on both footings, with our first difference's sigma for its flux units
            images = {"SFFT (S/N x sigma)": peer * sigma_map, **images}
            rows.insert(0, ("SFFT (published S/N map)",
                            [count_residuals(img, science.image, template.image, sigma, usable=usable)
                             for img in (peer * sigma_map, peer)], None, None))
    print(f"{'difference':<30}{'flux: blobs':>12}{'bright':>7}{'power':>7}{'S/N: blobs':>12}{'bright':>7}"
          f"{'power':>7}{'unflagged':>10}{'seconds':>8}")
    for label, (flux, snr), unflagged, seconds in rows:
        print(f"{label:<30}" + "".join(f"{c.blobs:>12}{c.bright_with_residual:>4}/{c.n_bright:<2}{c.source_excess:>7.2f}"
                                       for c in (flux, snr))
              + f"{'' if unflagged is None else unflagged:>10}{'' if seconds is None else f'{seconds:.1f}':>8}")
    if args.figure:
        _figure(images, science.image, template.image, brightest_sources(template.image, 12, sigma, 20), sigma,
                args.figure)
        print(f"figure: {args.figure}")


def _figure(images: dict, science, template, bright, sigma, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dialab.analysis.residuals import robust_std, source_free

    sky = source_free(science, template, sigma)
    fig, axes = plt.subplots(len(images) + 1, len(bright), figsize=(1.6 * len(bright), 1.7 * (len(images) + 1)))
    h = 15
    for i, (x, y) in enumerate(bright):
        cut = np.nan_to_num(template[y - h : y + h + 1, x - h : x + h + 1])
        axes[0, i].imshow(np.arcsinh(cut / max(np.percentile(cut, 50), 1e-3)), origin="lower", cmap="gray")
    axes[0, 0].set_ylabel("template", fontsize=8)
    for row, (label, img) in enumerate(images.items(), start=1):
        img = np.asarray(img, float)
        ok = sky & np.isfinite(img) & (img != 0)
        z = (img - np.median(img[ok])) / robust_std(img[ok])
        for i, (x, y) in enumerate(bright):
            axes[row, i].imshow(z[y - h : y + h + 1, x - h : x + h + 1], vmin=-10, vmax=10, cmap="RdBu_r",
                                origin="lower")
        axes[row, 0].set_ylabel(label, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("NIRCam t003 - t001: the 12 brightest template sources, difference / robust sky std "
                 "(colour scale +-10)", fontsize=9)
    fig.savefig(path, dpi=90, bbox_inches="tight")


if __name__ == "__main__":
    main()
