"""bench/latency.py: the scenarios it plans, and a real run on tiny checkpoints writing JSON and a PNG."""

from __future__ import annotations

import json

import pytest

from flashstep.bench import latency
from flashstep.bench.report import percentile, summarize
from flashstep.models.flashstep_config import FlashstepConfig

TEACHER = FlashstepConfig(family="teacher", default_steps=25, allowed_steps=(1, 25), default_guidance_scale=4.0)
SWIFT = FlashstepConfig(family="swiftbrush")
HYPER = FlashstepConfig(family="hypersd", default_steps=1, allowed_steps=(1, 2, 4, 8, 16))


def test_percentile_is_nearest_rank_and_summary_names_every_figure():
    samples = [0.4, 0.1, 0.3, 0.2]
    assert percentile(samples, 50) == 0.2
    assert percentile(samples, 90) == 0.4
    assert percentile([7.0], 99) == 7.0
    assert set(summarize(samples)) == {"median", "p90", "p95", "p99", "mean", "min", "n"}
    with pytest.raises(ValueError, match="`q` must be in"):
        percentile(samples, 101)


def test_plan_puts_the_teacher_baseline_first_then_each_student_step_count_and_batch():
    plan = latency.scenarios({"t": TEACHER, "swift": SWIFT, "hyper": HYPER}, "t", 25, (1, 4))
    assert [(s.model, s.steps, s.batch_size, s.role) for s in plan[:2]] == [("t", 25, 1, "baseline"), ("t", 25, 4, "baseline")]
    assert plan[0].guidance_scale == 4.0
    assert sorted({s.steps for s in plan if s.model == "hyper"}) == [1, 2, 4, 8]  # 16 is outside 1, 2, 4, 8
    assert {(s.steps, s.batch_size) for s in plan if s.model == "swift"} == {(1, 1), (1, 4)}
    assert not any(s.role == "stand-in" for s in plan)


def test_without_a_one_step_model_the_teacher_at_one_step_without_cfg_stands_in():
    plan = latency.scenarios({"t": TEACHER}, "t", 25, (1,), tiny_decoders=frozenset({"t"}))
    stand_ins = [s for s in plan if s.role == "stand-in"]
    assert [(s.steps, s.guidance_scale, s.tiny_decoder) for s in stand_ins] == [(1, 0.0, False), (1, 0.0, True)]


def test_plan_refuses_a_teacher_step_count_the_teacher_does_not_allow():
    with pytest.raises(ValueError, match="`teacher_steps` must be one of"):
        latency.scenarios({"t": TEACHER}, "t", 30, (1,))


@pytest.mark.slow
def test_run_on_tiny_checkpoints_writes_figures_ratio_key_and_plot(latency_report):
    report, out = latency_report

    saved = json.loads((out / "lat.json").read_text())
    assert (out / "lat.png").stat().st_size > 0
    assert saved["benchmark"] == "lat" and {"machine", "date", "git", "settings", "figures"} <= set(saved)
    assert saved["machine"]["cores"] >= 1 and saved["git"]["commit"]
    figures = saved["figures"]
    assert figures["one_step_speedup_vs_teacher"] == report["figures"]["one_step_speedup_vs_teacher"] > 0
    assert set(figures["one_step_models"]) == {"tiny-swift"}
    rows = {(r["model"], r["batch_size"]): r for r in figures["rows"]}
    assert set(rows) == {("tiny-teacher", 1), ("tiny-teacher", 2), ("tiny-swift", 1), ("tiny-swift", 2)}
    assert rows["tiny-teacher", 1]["unet_evals_per_image"] == 4  # 2 steps, CFG counts two
    assert rows["tiny-swift", 1]["unet_evals_per_image"] == 1
    assert rows["tiny-teacher", 1]["speedup_vs_teacher"] == pytest.approx(1.0)
    for r in figures["rows"]:
        stages = r["encode_s_per_image"] + r["denoise_s_per_image"] + r["decode_s_per_image"]
        assert 0 < stages <= r["median_s_per_image"] * 1.5  # the split accounts for the time (loose: medians)
        assert r["p90_s_per_image"] >= r["median_s_per_image"]
