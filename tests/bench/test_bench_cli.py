"""`flashstep bench`: lists its benchmarks, refuses unknown ones; the GPU set exits cleanly without CUDA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from flashstep.bench import gpu
from flashstep.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_bench_without_a_name_lists_every_benchmark(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu", "latency", "load", "sd15", "gpu"):
        assert f"  {name} " in out


def test_bench_with_an_unknown_name_fails_and_says_which(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_benchmark_without_cuda_says_so_and_writes_nothing(capsys, tmp_path):
    assert gpu.main(["--out-dir", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_script_exits_zero_without_cuda():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout


@pytest.mark.slow
def test_gpu_run_tables_each_runnable_backend_and_says_why_others_were_skipped(bench_models, tmp_path):
    plan = gpu.GpuPlan(
        device="cpu", dtype="float32", backends=("sdpa", "xformers", "math"), teacher_steps=2,
        with_load=False, resolution=64, batch_sizes=(1, 2), timing=(1, 0.0, 1),
    )  # fmt: skip
    report = gpu.run(bench_models / "tiny-teacher", plan, out_dir=tmp_path)

    assert [r["backend"] for r in report["backends"]] == ["sdpa", "math"]
    assert "cuda_available" in report["skipped"]["xformers"] and report["skipped"]["load"] == "not asked for"
    sdpa = report["backends"][0]
    assert sdpa["one_step_b1_s"] > 0 and sdpa["teacher_cfg_b1_s"] > 0 and sdpa["one_step_speedup_vs_teacher"] > 0
    assert report["backends"][1]["one_step_b4_s"] is None  # math runs batch 1 only
    assert report["sd15_one_step_fp16_b1_s"] == sdpa["one_step_b1_s"]
    assert {p.name for p in tmp_path.iterdir()} >= {"gpu.json", "gpu.png", "gpu_latency_sdpa.json", "gpu_latency_math.json"}


def test_a_backend_that_raises_is_reported_as_failed_and_the_others_still_run(bench_models, tmp_path, monkeypatch):
    """A lent GPU is minutes long: one backend's crash must not cost the other backends' figures."""
    from flashstep.bench import latency

    real_run = latency.run

    def run_or_break(*args, attention_backend, **kwargs):
        if attention_backend == "sdpa":
            raise RuntimeError("kernel launch failed")
        return real_run(*args, attention_backend=attention_backend, **kwargs)

    monkeypatch.setattr(latency, "run", run_or_break)
    plan = gpu.GpuPlan(
        device="cpu", dtype="float32", backends=("sdpa", "math"), teacher_steps=2,
        with_load=False, resolution=64, batch_sizes=(1,), timing=(1, 0.0, 1),
    )  # fmt: skip
    report = gpu.run(bench_models / "tiny-teacher", plan, out_dir=tmp_path)

    assert [r["backend"] for r in report["backends"]] == ["math"]
    assert report["skipped"]["sdpa"] == "failed: RuntimeError: kernel launch failed"
    assert (tmp_path / "gpu.json").exists()
