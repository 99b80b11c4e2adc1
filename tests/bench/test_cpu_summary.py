"""bench/cpu.py: the parts' reports become one cpu.json with every ratio key on top, and README markdown."""

from __future__ import annotations

import pytest

from flashstep.bench import cpu, load, ray_scaling, sd15_cpu


def ray_part() -> dict:
    """A Ray scaling part as ray_scaling.run reports it, from its own ratio and target functions."""
    rows = [
        {"server": "flashstep-workers", "replicas": 1, "concurrency": 1, "p50_s": 0.02, "throughput_rps": 40.0, "errors": 0},
        {"server": "flashstep-ray-1", "replicas": 1, "concurrency": 1, "p50_s": 0.025, "throughput_rps": 30.0, "errors": 0},
        {"server": "flashstep-ray-1", "replicas": 1, "concurrency": 16, "p50_s": 0.3, "throughput_rps": 50.0, "errors": 0},
        {"server": "flashstep-ray-2", "replicas": 2, "concurrency": 16, "p50_s": 0.2, "throughput_rps": 85.0, "errors": 0},
    ]
    figures = {"levels": rows, **ray_scaling.ratios(rows, 16), "zero_errors": True}
    targets = {k: f"{op} {bound:g}" for k, (op, bound) in ray_scaling.TARGETS.items()}
    return {"figures": figures, "targets": targets, "targets_met": load.targets_met(figures, ray_scaling.TARGETS)}


@pytest.mark.slow
def test_combined_report_carries_every_ratio_key_on_top_and_renders_markdown(latency_report, load_report):
    sd = {"figures": sd15_cpu.figures_from({k: [1.0] for k in (
        "text_encoder", "text_encoder_cfg", "unet_b1", "unet_b2_cfg", "vae_decode", "tiny_decode")})}  # fmt: skip
    report = cpu.combine(
        latency_report[0], load_report[0], ray_part(), sd, settings={"threads": 1, "quick": True}, timings={"total_s": 60.0}
    )

    for key in cpu.RATIO_KEYS:
        assert report[key] is not None and report[key] > 0, key
    assert report["zero_errors"] is True
    assert set(report["targets_met"]) == {*cpu.RATIO_KEYS, "zero_errors"}
    assert report["ray_scaling_2_vs_1"] == pytest.approx(1.7) and report["ray_overhead_ratio"] == pytest.approx(1.25)
    assert report["sd15_cpu"]["teacher_cfg_s"] == 27.0  # text(2) + 25 x UNet(b2) + VAE, 1 s each
    text = cpu.markdown(report)
    for key in cpu.RATIO_KEYS:
        assert f"| {key} |" in text
    assert "![throughput and p99 vs concurrency](bench/results/load.png)" in text
    assert "| flashstep-ray-2 |" in text
    assert "| fastapi-per-request |" in text and "| in-process |" in text
