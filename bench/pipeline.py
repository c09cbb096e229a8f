"""Pipeline throughput: units per minute on hsc-sprint-mini (local 1 and 2 workers, Dask LocalCluster),
and one full-size HSC unit (2048 x 4176) per flavor on one core: its time (warp, subtract, detect, measure,
fakes, match, write), the run's total with the APDB, and each step's share (``dialab.timing``).

Run: python bench/pipeline.py   (several minutes; prints a table)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from dialab.pipeline.config import load_pipeline
from dialab.pipeline.runner import run_pipeline
from dialab.simulate.specs import get_spec
from dialab.simulate.survey import simulate_dataset
from dialab.timing import recorded

FLAVORS = ["convolveTemplate", "auto", "preconvolution"]


def throughput(manifest: Path, executor: str, workers: int, flavor: str) -> tuple[int, float, list[float]]:
    """Units done, the run's wall time and each unit's own seconds (from its unit.json)."""
    config = load_pipeline(overrides={"flavors": [flavor], "inject": {"enabled": True, "min_per_detector": 40},
                                      "execution": {"executor": executor, "workers": workers}})
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = run_pipeline(manifest, config, out, progress=False)
        seconds = time.perf_counter() - t0
        units = [json.loads(p.read_text())["seconds"] for p in Path(out).rglob("unit.json")]
        return result.done, seconds, units


def main() -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        mini = simulate_dataset(get_spec("hsc-sprint-mini"), Path(tmp) / "mini", seed=1, progress=False)
        print(f"hsc-sprint-mini, convolveTemplate with fakes, APDB association included ({cores} cores):")
        for executor, workers in (("local", 1), ("local", 2), ("dask", 2)):
            n, seconds, _ = throughput(mini, executor, workers, "convolveTemplate")
            print(f"  {executor:5s} x{workers}: {n} units in {seconds:6.1f} s = {60 * n / seconds:5.1f} units/min")
        full = get_spec("hsc-sprint").model_copy(update={"detectors": [49], "science_per_band": 1,
                                                         "visit_pool": {"r": get_spec("hsc-sprint").visit_pool["r"]}})
        big = simulate_dataset(full, Path(tmp) / "full", seed=1, progress=False)
        print("one full-size HSC unit (2048 x 4176), with fakes, one worker (in-process):")
        for flavor in FLAVORS:
            recorded(reset=True)
            n, seconds, units = throughput(big, "local", 1, flavor)
            steps = sorted(recorded().items(), key=lambda kv: -kv[1])[:5]
            shares = ", ".join(f"{k} {100 * v / units[0]:.0f}%" for k, v in steps)
            print(f"  {flavor:16s}: unit {units[0]:5.1f} s, run {seconds:5.1f} s (APDB included); {shares}")


if __name__ == "__main__":
    main()
