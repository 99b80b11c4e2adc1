"""bench/load.py: a real sweep of real servers (flashstep and its peers as subprocesses on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest

from flashstep.bench import load
from flashstep.bench.peers.vanilla import parse_body
from flashstep.bench.workload import Workload, unique_prompts

RATIO_KEYS = ("http_overhead_ratio", "throughput_ratio_vs_naive", "throughput_ratio_vs_litserve", "p99_ratio_vs_litserve")


def test_every_prompt_of_the_workload_is_unique_and_every_body_names_the_same_work():
    prompts = unique_prompts()
    assert len(prompts) == len(set(prompts)) == 1200
    body = Workload(steps=1, guidance_scale=0.0, resolution=64).body(5)
    assert body | {"prompt": None} == {
        "prompt": None, "seed": 5, "steps": 1, "guidance_scale": 0.0, "height": 64, "width": 64, "output_format": "png",
    }  # fmt: skip


def test_peers_refuse_a_body_with_a_missing_or_unknown_field_by_name():
    with pytest.raises(ValueError, match="`seed` is required"):
        parse_body({"prompt": "a", "steps": 1, "guidance_scale": 0, "height": 64, "width": 64})
    with pytest.raises(ValueError, match=r"unknown fields \['nasa_alpha'\]"):
        parse_body(Workload(1, 0.0, 64).body(0) | {"nasa_alpha": 0.1})


def test_the_default_workload_is_one_step_without_cfg(bench_models):
    assert load.choose_workload(bench_models / "tiny-teacher", None, None) == Workload(1, 0.0, 64)
    assert load.choose_workload(bench_models / "tiny-swift", None, None) == Workload(1, 0.0, 64)
    assert load.choose_workload(bench_models / "tiny-teacher", 2, None) == Workload(2, 4.0, 64)


def test_ratios_compare_flashstep_with_each_peer_at_the_chosen_concurrency():
    rows = [
        {"server": "flashstep-workers", "concurrency": 1, "p50_s": 0.11, "throughput_rps": 9.0, "p99_s": 0.2, "errors": 0},
        {"server": "flashstep-workers", "concurrency": 16, "p50_s": 0.3, "throughput_rps": 60.0, "p99_s": 0.4, "errors": 0},
        {"server": "fastapi-per-request", "concurrency": 16, "throughput_rps": 12.0, "p99_s": 1.6, "errors": 2},
        {"server": "litserve", "concurrency": 16, "throughput_rps": 40.0, "p99_s": 0.5, "errors": 0},
    ]
    r = load.ratios(rows, {"p50_s": 0.1}, compare_at=16)
    assert r["http_overhead_ratio"] == pytest.approx(1.1)
    assert r["throughput_ratio_vs_naive"] == pytest.approx(5.0)
    assert r["throughput_ratio_vs_litserve"] == pytest.approx(1.5)
    assert r["p99_ratio_vs_litserve"] == pytest.approx(0.8)
    assert r["errors_by_server"]["fastapi-per-request"] == 2 and r["zero_errors"] is False
    assert load.targets_met({**r, "zero_errors": False}) == {
        "http_overhead_ratio": True, "throughput_ratio_vs_naive": True, "throughput_ratio_vs_litserve": True,
        "p99_ratio_vs_litserve": True, "zero_errors": False,
    }  # fmt: skip


@pytest.mark.slow
def test_sweep_of_flashstep_and_its_peers_has_zero_errors_and_every_ratio_key(load_report):
    report, out = load_report

    saved = json.loads((out / "ld.json").read_text())
    assert (out / "ld.png").stat().st_size > 0
    figures = saved["figures"]
    assert figures["zero_errors"] is True and report["figures"]["zero_errors"] is True
    servers = {(r["server"], r["concurrency"]) for r in figures["levels"]}
    assert servers == {(s, c) for s in load.DEFAULT_SERVERS for c in (1, 2)}
    assert all(r["ok"] == r["requests"] > 0 and r["errors"] == 0 for r in figures["levels"])
    assert figures["in_process"]["requests"] == 3
    for key in RATIO_KEYS:
        assert figures[key] > 0, key
    assert saved["settings"]["batch"] == {"max_batch_size": 8, "max_wait_ms": 10.0}
    assert set(saved["targets_met"]) == {*RATIO_KEYS, "zero_errors"}
