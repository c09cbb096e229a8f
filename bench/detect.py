"""Detection + measurement speed on a 2048 x 4096 difference with ~200 diaSources, one core.

Run: python bench/detect.py   (prints seconds, the count found, and the ratio to an FFT floor)
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import galsim  # noqa: E402
import numpy as np  # noqa: E402

from dialab.detection import DetectConfig  # noqa: E402
from dialab.exposure import Exposure  # noqa: E402
from dialab.imageops import fft_convolve  # noqa: E402
from dialab.measurement import detect_and_measure  # noqa: E402
from dialab.psf import GaussianPsf  # noqa: E402
from dialab.simulate.render import draw_point_sources  # noqa: E402


def main() -> None:
    shape = (4096, 2048)
    rng = np.random.default_rng(0)
    n = 200
    x, y = rng.uniform(30, shape[1] - 30, n), rng.uniform(30, shape[0] - 30, n)
    flux = rng.uniform(200, 5000, n) * rng.choice([-1, 1], n)
    model = draw_point_sources(shape, x, y, flux, lambda a, b: galsim.Gaussian(sigma=2.0), method="no_pixel")
    image = (model + rng.normal(0, 1, shape)).astype(np.float32)

    def exposure():
        return Exposure(image.copy(), np.zeros(shape, np.int32), np.ones(shape, np.float32),
                        psf=GaussianPsf(sigma_pix=2.0))

    floor_kernel = np.ones((35, 35), np.float32)
    fft_convolve(image, floor_kernel, workers=1)
    t0 = time.perf_counter()
    fft_convolve(image, floor_kernel, workers=1)
    floor = time.perf_counter() - t0
    detect_and_measure(exposure(), detect_config=DetectConfig())  # warm
    t0 = time.perf_counter()
    cat, _, _ = detect_and_measure(exposure(), detect_config=DetectConfig())
    seconds = time.perf_counter() - t0
    print(f"detect+measure 2048 x 4096, {n} injected, {len(cat)} found, 1 core: {seconds:.2f} s "
          f"({seconds / floor:.1f}x one 35x35 FFT convolution of {floor:.3f} s)")


if __name__ == "__main__":
    main()
