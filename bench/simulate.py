"""Simulation speed: the whole ``hsc-sprint-mini`` and a measured slice of the full ``hsc-sprint``.

Run: python bench/simulate.py   (prints wall times, core count and the full-dataset estimate)
"""

from __future__ import annotations

import os
import tempfile
import time

from dialab.simulate.specs import get_spec
from dialab.simulate.survey import simulate_dataset


def timed(spec, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        simulate_dataset(spec, tmp, seed=1, workers=workers, progress=False)
        return time.perf_counter() - t0


def main() -> None:
    cores = os.cpu_count() or 1
    mini = get_spec("hsc-sprint-mini")
    n_mini = (mini.science_per_band + 1) * len(mini.visit_pool) * len(mini.detectors)
    print(f"hsc-sprint-mini: {n_mini} exposures of 1024 x 1024, {timed(mini, cores):.1f} s on {cores} cores")
    full = get_spec("hsc-sprint")
    n_full = sum(len(v) + 1 for v in full.written_visits().values()) * len(full.detectors)
    part = full.model_copy(update={"detectors": [49, 50], "science_visits": {"g": full.visit_pool["g"][:3]}})
    n_part = (3 + 1) * 2
    seconds = timed(part, cores)
    print(f"hsc-sprint slice: {n_part} exposures of 2048 x 4176 in {seconds:.1f} s on {cores} cores "
          f"({seconds * cores / n_part:.1f} core-s each); whole dataset ({n_full} exposures) "
          f"estimated {seconds * n_full / n_part / 60:.0f} min on {cores} cores")


if __name__ == "__main__":
    main()
