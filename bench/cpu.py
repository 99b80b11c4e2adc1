"""The CPU benchmark set (`make bench` = `flashstep bench cpu`): latency, HTTP load, SD1.5 stages, in one run.

    flashstep bench cpu                 # about 15 minutes on 2 cores; bench/results/cpu.json + the three parts
    flashstep bench cpu --quick         # a few minutes, fewer calls and requests: a smoke run of the whole set

Runs bench/latency.py (every shipped model), bench/load.py (flashstep and its peers on the one-step
checkpoint), bench/ray_scaling.py (Ray Serve at 1 and 2 replicas beside the native server) and
bench/sd15_cpu.py (SD1.5-size stages) one after another, so the ratios in
bench/results/cpu.json are measured side by side in one run on one machine. Each part writes its own
JSON and PNG too. Torch threads default to half the cores (at least one): in the load part the load
generator needs a core of its own, and every part uses the same number so figures compare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from flashstep.bench import latency, load, ray_scaling, sd15_cpu
from flashstep.bench.report import RESULTS_DIR, markdown_table, new_report, print_table, write_report
from flashstep.bench.servers import Runtime

RATIO_KEYS = (
    "one_step_speedup_vs_teacher",
    "http_overhead_ratio",
    "throughput_ratio_vs_naive",
    "throughput_ratio_vs_litserve",
    "p99_ratio_vs_litserve",
    "ray_scaling_2_vs_1",
    "ray_overhead_ratio",
)


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def run(*, threads: int, quick: bool = False, out_dir: Path = RESULTS_DIR, models_root: Path | None = None) -> dict:
    """All three parts, then bench/results/cpu.json with the ratio keys at the top level."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    timings = {}

    # 1. In-process latency of every shipped model against the teacher at 25 steps with CFG.
    t0 = time.perf_counter()
    budget = latency.TimingBudget(min_calls=2, seconds=0.0) if quick else latency.TimingBudget()
    lat = latency.run(
        latency.select_models(None, models_root), budget=budget, models_root=models_root,
        batch_sizes=(1, 4) if quick else latency.BATCH_SIZES, out_dir=out_dir,
    )  # fmt: skip
    timings["latency_s"] = time.perf_counter() - t0

    # 2. HTTP load: flashstep and its peers on one checkpoint.
    t0 = time.perf_counter()
    folder = load.default_model(models_root)
    plan = (
        load.LoadPlan(levels=(1, 4, 16), requests={1: 20, 4: 40, 16: 80}, warmup=8, in_process_requests=20)
        if quick
        else load.LoadPlan()
    )
    ld = load.run(folder, load.choose_workload(folder, None, None), plan=plan, runtime=Runtime(threads=threads), out_dir=out_dir)
    timings["load_s"] = time.perf_counter() - t0

    # 3. Ray Serve: 2 replicas against 1, and its overhead over the native server at one client.
    t0 = time.perf_counter()
    ray_plan = load.LoadPlan(levels=(1, 16), requests={1: 20, 16: 80} if quick else dict(ray_scaling.REQUESTS), warmup=8)
    ray = ray_scaling.run(folder, plan=ray_plan, runtime=Runtime(threads=threads), out_dir=out_dir)
    timings["ray_s"] = time.perf_counter() - t0

    # 4. SD1.5 at full size: stage split and the teacher's estimate.
    t0 = time.perf_counter()
    sd = sd15_cpu.run(repeats=1 if quick else 2, out_dir=out_dir)
    timings["sd15_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    report = combine(lat, ld, ray, sd, settings={"threads": threads, "quick": quick}, timings=timings)
    print_table(summary_rows(report), SUMMARY_COLUMNS, title="\nflashstep CPU benchmark summary")
    path = write_report(report, out_dir / "cpu.json")
    print(f"wrote {path}")
    md = path.with_suffix(".md")
    md.write_text(markdown(report))
    print(f"wrote {md}")
    return report


def combine(lat: dict, ld: dict, ray: dict, sd: dict, *, settings: dict, timings: dict) -> dict:
    """One cpu.json from the four parts' reports: the ratio keys on top, the parts inside."""
    report = new_report("cpu", {**settings, "parts": ["latency", "load", "ray_scaling", "sd15_cpu"]})
    parts = (lat["figures"], ld["figures"], ray["figures"])
    report |= {key: next((p[key] for p in parts if key in p), None) for key in RATIO_KEYS}
    report["zero_errors"] = ld["figures"]["zero_errors"] and ray["figures"]["zero_errors"]
    report["targets"] = {**lat["targets"], **ld["targets"], **ray["targets"]}
    report["targets_met"] = {**lat["targets_met"], **ld["targets_met"], **ray["targets_met"]}
    report["targets_met"]["zero_errors"] = report["zero_errors"]
    report["sd15_cpu"] = {
        k: sd["figures"][k]
        for k in ("stages_median_s", "one_step_s", "one_step_tiny_decoder_s", "teacher_cfg_s", "teacher_cfg_label",
                  "one_step_speedup_vs_teacher_estimated", "one_step_tiny_speedup_vs_teacher_estimated")
    }  # fmt: skip
    report["timings"] = timings
    report["parts"] = {"latency": lat, "load": ld, "ray_scaling": ray, "sd15_cpu": sd}
    return report


SUMMARY_COLUMNS = [("figure", "figure", ""), ("value", "value", ""), ("target", "target", ""), ("met", "met", "")]


def summary_rows(report: dict) -> list[dict]:
    """The headline figures of a cpu.json report, with their targets and whether this run met them."""
    rows = [
        {"figure": key, "value": report[key], "target": report["targets"].get(key), "met": report["targets_met"].get(key)}
        for key in (*RATIO_KEYS, "zero_errors")
    ]
    rows.append({"figure": "sd15 one step, s (CPU, 512 px)", "value": report["sd15_cpu"]["one_step_s"]})
    rows.append({"figure": "sd15 one step with tiny decoder, s", "value": report["sd15_cpu"]["one_step_tiny_decoder_s"]})
    rows.append({"figure": "sd15 teacher 25 steps + CFG, s (estimated)", "value": report["sd15_cpu"]["teacher_cfg_s"]})
    rows.append({"figure": "wall time of this run, min", "value": report["timings"]["total_s"] / 60})
    return [{**r, "value": round(r["value"], 3) if isinstance(r["value"], float) else r["value"]} for r in rows]


def markdown(report: dict) -> str:
    """The run as README-ready markdown: summary, latency, load, Ray and SD1.5 tables, the plots."""
    m, parts = report["machine"], report["parts"]
    lat, ld, sd = parts["latency"]["figures"], parts["load"], parts["sd15_cpu"]["figures"]
    load_rows = ld["figures"]["levels"] + ([ld["figures"]["in_process"]] if ld["figures"]["in_process"] else [])
    workload = ld["settings"]["workload"]
    sd_rows = [{"stage": k, "median_s": v} for k, v in sd["stages_median_s"].items()]
    sd_rows += [
        {"stage": "one step (text + UNet + VAE)", "median_s": sd["one_step_s"]},
        {"stage": "one step, tiny decoder", "median_s": sd["one_step_tiny_decoder_s"]},
        {"stage": f"teacher {sd['teacher_steps']} steps + CFG ({sd15_cpu.ESTIMATE_LABEL})", "median_s": sd["teacher_cfg_s"]},
    ]
    how = "`flashstep bench cpu --quick` (a smoke run: few calls)" if report["settings"].get("quick") else "`make bench`"
    busy = f", 1-min load average {m['load_average_1m']:.1f} at the end" if "load_average_1m" in m else ""
    out = [
        f"Measured by {how} on {m['cpu']} ({m['cores']} cores{busy}; torch {m['torch']}, "
        f"{report['settings']['threads']} torch thread(s)), {report['date'][:10]}, commit {report['git']['commit'][:7]}"
        f"{' (dirty tree)' if report['git']['dirty'] else ''}; the whole run took {report['timings']['total_s'] / 60:.1f} min.",
        "",
        markdown_table(summary_rows(report), SUMMARY_COLUMNS),
        "",
        f"In-process latency (`Engine.generate`, seconds per image; {lat['one_step_note']}):",
        "",
        markdown_table(
            [{**r, "tiny": "yes" if r["tiny_decoder"] else ""} for r in lat["rows"]], latency.TABLE_COLUMNS
        ),
        "",
        f"HTTP load on `{ld['settings']['model']}` ({workload['steps']} step(s), guidance {workload['guidance_scale']:g}, "
        f"{workload['resolution']} px, PNG), batches of at most {ld['settings']['batch']['max_batch_size']} with "
        f"{ld['settings']['batch']['max_wait_ms']:g} ms wait for flashstep and LitServe:",
        "",
        markdown_table(load_rows, load.TABLE_COLUMNS),
        "",
        "Ray Serve beside the native server (same checkpoint and batching, one torch thread per replica or worker):",
        "",
        markdown_table(parts["ray_scaling"]["figures"]["levels"], load.TABLE_COLUMNS),
        "",
        "SD1.5 size (random weights, public configs), CPU float32, 512 px, seconds:",
        "",
        markdown_table(sd_rows, [("stage", "stage", ""), ("median_s", "seconds", ".3f")]),
        "",
        "![latency vs batch size](bench/results/latency.png)",
        "![throughput and p99 vs concurrency](bench/results/load.png)",
        "![Ray Serve throughput by replica count](bench/results/ray_scaling.png)",
        "![SD1.5 stages on the CPU](bench/results/sd15_cpu.png)",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashstep bench cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default_threads(), help="torch threads of every part")
    parser.add_argument("--quick", action="store_true", help="fewer calls and requests: a smoke run")
    parser.add_argument("--models-root", type=Path, default=None, help="folder whose sub-folders are models, besides the shipped ones")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="folder cpu.json is written to")
    parser.add_argument("--markdown-from", type=Path, default=None, help="only print the markdown of a cpu.json")
    args = parser.parse_args(argv)
    if args.markdown_from is not None:
        print(markdown(json.loads(args.markdown_from.read_text())))
        return 0
    run(threads=args.threads, quick=args.quick, out_dir=args.out_dir, models_root=args.models_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
