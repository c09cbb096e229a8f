"""Subtraction speed on a simulated 2048 x 4096 HSC-like pair (~3000 stars), per flavor and core count.

Each timing is one subprocess: read both FITS files, subtract (kernel fit, convolution,
decorrelation), write the difference; warping the template onto the science WCS is timed apart.
The floor is one float32 FFT convolution of the same image
with a 35 x 35 kernel, measured warm in the same run; results are printed as ratios to it.
Run: python bench/subtract.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FLAVORS = ("convolveTemplate", "convolveScience", "auto", "preconvolution", "zogy")


def make_pair(folder: Path, shape: tuple[int, int], measure_psfs: bool) -> tuple[Path, Path]:
    from dialab.exposure import write_exposure
    from dialab.simulate.pair import PairSpec, simulate_pair

    n = int(3000 * shape[0] * shape[1] / (2048 * 4096))
    spec = PairSpec(shape=shape, n_stars=n, n_galaxies=n // 5, science_fwhm=4.2, template_fwhm=3.4)
    science, template, _ = simulate_pair(spec, seed=3)
    if measure_psfs:  # as for plain FITS from a telescope
        science.psf = None
        template.psf = None
    write_exposure(science, folder / "science.fits")
    write_exposure(template, folder / "template.fits")
    return folder / "science.fits", folder / "template.fits"


def floor_seconds(shape: tuple[int, int], workers: int) -> float:
    from scipy import fft

    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kernel = np.ones((35, 35), np.float32) / 35**2

    def once():
        s = (fft.next_fast_len(shape[0] + 34, real=True), fft.next_fast_len(shape[1] + 34, real=True))
        out = fft.irfft2(fft.rfft2(image, s, workers=workers) * fft.rfft2(kernel, s, workers=workers), s,
                         workers=workers)
        return out[17 : 17 + shape[0], 17 : 17 + shape[1]]

    once()
    t0 = time.perf_counter()
    once()
    return time.perf_counter() - t0


def one_run(science: str, template: str, flavor: str, workers: int, out: str) -> None:
    """Child process: the timed unit of work (after imports); prints JSON with seconds and peak RSS."""
    import resource

    from dialab.exposure import read_exposure, write_exposure
    from dialab.subtraction import SubtractConfig, subtract
    from dialab.warp import align_to

    t0 = time.perf_counter()
    sci = read_exposure(science)
    tpl = read_exposure(template)
    t1 = time.perf_counter()
    tpl = align_to(tpl, sci)
    warp = time.perf_counter() - t1
    res = subtract(sci, tpl, SubtractConfig(flavor=flavor, workers=workers))
    write_exposure(res.difference, out)
    seconds = time.perf_counter() - t0 - warp
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "warp": warp, "peak_mb": peak_mb, "noise_ratio": res.diagnostics.noise_ratio}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1024 x 2048 instead of 2048 x 4096")
    parser.add_argument("--measure-psfs", action="store_true", help="store no PSFs: subtract measures them")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sci, tpl, flavor, workers, out = args.child
        one_run(sci, tpl, flavor, int(workers), out)
        return
    shape = (2048, 1024) if args.quick else (4096, 2048)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        sci, tpl = make_pair(folder, shape, args.measure_psfs)
        print(f"pair {shape[1]} x {shape[0]} px simulated in {time.perf_counter() - t0:.1f} s; template on its own "
              f"WCS (warped in the timed step); PSFs {'measured' if args.measure_psfs else 'read from the files'}")
        print("seconds: read both files, subtract, write the difference (the template warp is timed apart)")
        print(f"{'flavor':<18}{'cores':>6}{'seconds':>9}{'floor s':>9}{'ratio':>8}{'warp s':>8}{'peak MB':>9}"
              f"{'noise':>7}")
        for cores in (1, 2):
            floor = floor_seconds(shape, cores)
            env = dict(os.environ, OMP_NUM_THREADS=str(cores), OPENBLAS_NUM_THREADS=str(cores))
            for flavor in FLAVORS:
                cmd = [sys.executable, __file__, "--child", str(sci), str(tpl), flavor, str(cores),
                       str(folder / f"diff_{flavor}.fits")]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{flavor:<18}{cores:>6}{r['seconds']:>9.2f}{floor:>9.3f}{r['seconds'] / floor:>8.1f}"
                      f"{r['warp']:>8.2f}{r['peak_mb']:>9.0f}{r['noise_ratio']:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
