"""`dialab subtract` speed and memory on an 8.4 Mpix (2896 x 2896) pair with a spatially varying PSF.

The pair is the truth-pair simulation (Kolmogorov x Airy PSF whose FWHM changes by 6% across the image,
stars and compact galaxies, known flux ratio), written as FITS twice: with its PSFs, and as plain FITS
whose PSFs must be measured from the stars. Each timing runs in a fresh process on one core: the CLI's
work after start-up (read both files, measure PSFs, subtract, write the difference), with its peak
resident memory per science pixel and each step's share of the time (``dialab.timing``). The floor is
one warm float32 FFT convolution of the same image with a 35 x 35 kernel, measured in the same run.

Methods are flavors, or flavor.basis to choose the kernel basis (``convolveTemplate.delta``): the bases are
compared as the flavors are.

Run: python bench/subtract.py [--quick] [--shape NY NX] [--methods convolveTemplate convolveTemplate.delta ...]
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


def make_pair(folder: Path, shape: tuple[int, int]) -> dict[str, tuple[Path, Path]]:
    """Science and template FITS, with and without their PSFs."""
    from dialab.exposure import write_exposure
    from dialab.simulate.truthpair import TruthPairSpec, simulate_truth_pair

    area = shape[0] * shape[1] / 1024**2
    spec = TruthPairSpec(shape=shape, n_stars=int(120 * area), n_galaxies=int(400 * area),
                         n_transients=int(60 * area))
    science, template, _, _ = simulate_truth_pair(spec, seed=5)
    paths = {}
    for label in ("given", "measured"):
        if label == "measured":
            science.psf = template.psf = None
        paths[label] = (folder / f"science_{label}.fits", folder / f"template_{label}.fits")
        write_exposure(science, paths[label][0])
        write_exposure(template, paths[label][1])
    return paths


def floor_seconds(shape: tuple[int, int]) -> float:
    """One warm float32 FFT convolution of the image with a 35 x 35 kernel ('same' size, zero padding), written
    with scipy.fft here rather than with dialab's own convolution, so the floor does not move with dialab. It runs
    with the allocator settings the timed CLI runs with: freed buffers reused, no page faults (20% faster)."""
    from scipy import fft

    from dialab.allocator import keep_freed_memory

    keep_freed_memory()

    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    kernel = np.ones((35, 35), np.float32) / 35**2
    padded = tuple(fft.next_fast_len(n + 34, real=True) for n in shape)

    def convolve():
        full = fft.irfft2(fft.rfft2(image, padded, workers=1) * fft.rfft2(kernel, padded, workers=1), padded,
                          workers=1)
        return full[17 : 17 + shape[0], 17 : 17 + shape[1]]

    convolve()
    best = float("inf")
    for _ in range(5):  # the fastest of five: one timing varies by 20-30% on a shared machine
        t0 = time.perf_counter()
        convolve()
        best = min(best, time.perf_counter() - t0)
    return best


def child(science: str, template: str, method: str, out: str) -> None:
    """The timed work, after the imports a CLI start pays once: prints JSON."""
    import dialab.pipeline.prepare  # noqa: F401  (start-up: what the subtract command imports)
    import dialab.pipeline.repository  # noqa: F401
    import dialab.subtraction.flavors  # noqa: F401
    from dialab.cli import main
    from dialab.subtraction.config import parse_method
    from dialab.timing import peak_rss_mb, peak_step, recorded

    flavor, basis = parse_method(method)
    t0 = time.perf_counter()
    main(["-q", "subtract", science, template, "-o", out, "--flavor", flavor, "--workers", "1"]
         + (["--kernel-basis", basis] if basis else []))
    seconds = time.perf_counter() - t0
    peak_mb = peak_rss_mb()  # its own peak: ru_maxrss would report at least the parent's (which made the pair)
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "steps": recorded(), "peak_step": peak_step()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1448 x 1448 instead of 2896 x 2896")
    parser.add_argument("--shape", nargs=2, type=int, metavar=("NY", "NX"), help="another image size")
    parser.add_argument("--methods", "--flavors", nargs="+", default=list(FLAVORS),
                        help="flavors, or flavor.basis (default: every flavor, Alard-Lupton basis)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    shape = tuple(args.shape) if args.shape else (1448, 1448) if args.quick else (2896, 2896)
    npix = shape[0] * shape[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        pairs = make_pair(folder, shape)
        floor = floor_seconds(shape)
        print(f"pair {shape[0]} x {shape[1]} px ({npix / 1e6:.1f} Mpix), spatially varying PSF, simulated in "
              f"{time.perf_counter() - t0:.0f} s; one core; floor (one 35x35 FFT convolution) {floor:.3f} s")
        print(f"{'method':<24}{'PSFs':>9}{'seconds':>9}{'x floor':>9}{'peak MB':>9}{'B/px':>6}  {'peak in':<15}"
              "largest steps (share)")
        for label, (sci, tpl) in pairs.items():
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", str(sci), str(tpl), method, str(folder / "d.fits")]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                steps = sorted(r["steps"].items(), key=lambda kv: -kv[1])[:4]
                shares = ", ".join(f"{k} {100 * v / r['seconds']:.0f}%" for k, v in steps)
                print(f"{method:<24}{label:>9}{r['seconds']:>9.2f}{r['seconds'] / floor:>9.1f}{r['peak_mb']:>9.0f}"
                      f"{r['peak_mb'] * 2**20 / npix:>6.0f}  {r['peak_step'] or '?':<15}{shares}", flush=True)


if __name__ == "__main__":
    main()
