"""``dialab demo``: simulate hsc-sprint-mini, run every flavor with fakes, and write the comparison report."""

from __future__ import annotations

import time
from pathlib import Path

from .analysis.report import build_report
from .pipeline.config import load_pipeline
from .pipeline.runner import run_pipeline
from .simulate.specs import get_spec
from .simulate.survey import simulate_dataset

FLAVORS = ["convolveTemplate", "auto", "preconvolution", "zogy"]


def run_demo(output: str | Path, seed: int = 1, workers: int | None = None) -> Path:
    """Dataset in ``output/data``, run in ``output/run``, report in ``output/report``; returns index.html."""
    from rich.console import Console


    console = Console(stderr=True)
    out = Path(output)
    start = time.perf_counter()
    manifest = out / "data" / "dataset.yaml"
    if not manifest.is_file():
        console.log("simulating hsc-sprint-mini")
        simulate_dataset(get_spec("hsc-sprint-mini"), out / "data", seed=seed, workers=workers)
    config = load_pipeline(overrides={"flavors": FLAVORS, "inject": {"enabled": True, "density_per_deg2": 20000,
                                                                      "min_per_detector": 40},
                                      "execution": {"workers": workers}})
    console.log(f"running {', '.join(FLAVORS)} with fakes")
    result = run_pipeline(manifest, config, out / "run", resume=(out / "run" / "run.yaml").exists())
    if not result.ok:
        raise RuntimeError(f"{len(result.failures)} unit(s) failed; see {out / 'run' / 'failures.csv'}")
    console.log("writing the report")
    index = build_report([out / "run"], out / "report")
    console.log(f"demo finished in {time.perf_counter() - start:.0f} s; look at and label its candidates with "
                f"`dialab vet {out / 'run'}`")
    return index
