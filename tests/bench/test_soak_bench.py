"""The soak benchmark, shortened: a real server, real clients, hostile requests and hot swaps."""

from __future__ import annotations

import json

import pytest

from flashstep.bench import soak


def test_requests_are_classified_by_what_each_kind_must_get():
    assert soak.classify("valid-native", 200, soak.PNG_MAGIC + b"...") is None
    assert soak.classify("valid-native", 200, b"{}") == "not a PNG"
    assert soak.classify("valid-openai", 429, b"") == "status 429"
    assert soak.classify("hostile-surrogate", 400, b"") is None
    assert soak.classify("hostile-surrogate", 500, b"") == "status 500"
    assert soak.classify("hostile-huge-body", None, b"") == "no answer"


def test_a_plan_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="`concurrency` must be >= 1"):
        soak.SoakPlan(concurrency=0)
    with pytest.raises(ValueError, match="`hostile_fraction` must be in"):
        soak.SoakPlan(hostile_fraction=1.5)


@pytest.mark.slow
def test_a_short_soak_answers_every_request_and_every_swap(tmp_path):
    plan = soak.SoakPlan(duration_s=12, concurrency=4, swap_every_s=3, warmup_s=3, settle_s=1, window_s=4)
    out = tmp_path / "soak.json"
    report = soak.run(plan, out)
    figures = json.loads(out.read_text())["figures"]
    assert figures == json.loads(json.dumps(report["figures"]))
    assert figures["requests"] > 0 and figures["valid"] > 0 and figures["hostile"] > 0
    assert figures["problems"] == {}, figures["problems"]
    assert figures["swaps"] >= 2 and figures["swaps_failed"] == 0
    assert figures["ready_after"] == 200
    assert out.with_suffix(".png").is_file()
