"""bench/cpu.py: the three parts' reports become one cpu.json with every ratio key on top, and README markdown."""

from __future__ import annotations

import pytest

from flashstep.bench import cpu, sd15_cpu


@pytest.mark.slow
def test_combined_report_carries_every_ratio_key_on_top_and_renders_markdown(latency_report, load_report):
    sd = {"figures": sd15_cpu.figures_from({k: [1.0] for k in (
        "text_encoder", "text_encoder_cfg", "unet_b1", "unet_b2_cfg", "vae_decode", "tiny_decode")})}  # fmt: skip
    report = cpu.combine(
        latency_report[0], load_report[0], sd, settings={"threads": 1, "quick": True}, timings={"total_s": 60.0}
    )

    for key in cpu.RATIO_KEYS:
        assert report[key] is not None and report[key] > 0, key
    assert report["zero_errors"] is True
    assert set(report["targets_met"]) == {*cpu.RATIO_KEYS, "zero_errors"}
    assert report["sd15_cpu"]["teacher_cfg_s"] == 27.0  # text(2) + 25 x UNet(b2) + VAE, 1 s each
    text = cpu.markdown(report)
    for key in cpu.RATIO_KEYS:
        assert f"| {key} |" in text
    assert "![throughput and p99 vs concurrency](bench/results/load.png)" in text
    assert "| fastapi-per-request |" in text and "| in-process |" in text
