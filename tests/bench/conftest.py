"""Tiny seeded checkpoints for the benchmark tests: a teacher and a one-step student.

The teacher allows 2 steps so the baseline (teacher with CFG) stays fast here; the benchmarks'
default of 25 steps runs the same code. Both folders load in flashstep and in vanilla diffusers.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_models(tmp_path_factory) -> Path:
    """A models root holding `tiny-teacher` (teacher, CFG 4) and `tiny-swift` (swiftbrush, one step)."""
    from flashstep.models.flashstep_config import FlashstepConfig
    from flashstep.training.architecture import ShapesArch
    from flashstep.training.export import export_random

    root = tmp_path_factory.mktemp("bench-models")
    teacher = FlashstepConfig(
        family="teacher", default_steps=2, allowed_steps=(1, 2), default_guidance_scale=4.0, resolution=64
    )
    export_random(root / "tiny-teacher", teacher, arch=ShapesArch.tiny(), seed=0)
    swift = FlashstepConfig(family="swiftbrush", default_steps=1, allowed_steps=(1,), resolution=64)
    export_random(root / "tiny-swift", swift, arch=ShapesArch.tiny(), seed=2)
    return root


@pytest.fixture(scope="session")
def latency_report(bench_models, tmp_path_factory) -> tuple[dict, Path]:
    """bench.latency on the tiny pair: teacher@2+CFG baseline, one call per configuration, batch 1 and 2."""
    from flashstep.bench import latency

    out = tmp_path_factory.mktemp("latency-results")
    models = {n: bench_models / n for n in ("tiny-teacher", "tiny-swift")}
    report = latency.run(
        models, teacher="tiny-teacher", teacher_steps=2, batch_sizes=(1, 2),
        budget=latency.TimingBudget(min_calls=1, seconds=0.0, max_calls=1), out_dir=out, name="lat",
    )  # fmt: skip
    return report, out


@pytest.fixture(scope="session")
def load_report(bench_models, tmp_path_factory) -> tuple[dict, Path]:
    """bench.load on tiny-swift: flashstep, both peers and the in-process floor, concurrency 1 and 2."""
    from flashstep.bench import load
    from flashstep.bench.servers import BatchSettings, Runtime

    out = tmp_path_factory.mktemp("load-results")
    folder = bench_models / "tiny-swift"
    plan = load.LoadPlan(levels=(1, 2), requests={1: 3, 2: 4}, warmup=2, time_cap_s=60, in_process_requests=3)
    report = load.run(
        folder, load.choose_workload(folder, None, None), plan=plan, batch=BatchSettings(8, 10.0),
        runtime=Runtime(threads=1), compare_at=2, name="ld", out_dir=out,
    )  # fmt: skip
    return report, out
