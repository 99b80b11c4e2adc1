"""Ray Serve against itself and the native server: throughput by replica count, and Ray's overhead.

    python -m flashstep.bench.ray_scaling            # bench/results/ray_scaling.json + .png
    flashstep bench ray --levels 1,16

On one checkpoint, one server at a time (bench/servers.py), each swept with the load bench's closed
loop (bench/load.py):

- flashstep-workers: `flashstep serve` as it runs by default (one engine worker process);
- flashstep-ray with 1 replica, then with 2 (`--ray --replicas N`, a local Ray cluster), every
  replica with `--threads` torch threads (one by default: two replicas on a 2-core machine).

Ratios: ray_scaling_2_vs_1 (throughput of 2 replicas over 1 at the top level) and
ray_overhead_ratio (Ray's p50 at one client over the native server's).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path

from flashstep.bench import load
from flashstep.bench.report import RESULTS_DIR, new_report, print_table, pyplot, save_figure, write_report
from flashstep.bench.servers import START_TIMEOUT_S, BatchSettings, Runtime, flashstep_spec, start_server

LEVELS = (1, 16)
REQUESTS = {1: 40, 16: 240}
TARGETS = {"ray_scaling_2_vs_1": (">=", 1.6), "ray_overhead_ratio": ("<=", 1.3)}
RAY_START_TIMEOUT_S = 600.0  # a local cluster, its Serve controller and proxy come up before the replicas


def ratios(rows: list[dict], top: int) -> dict:
    def row(server: str, concurrency: int) -> dict | None:
        return next((r for r in rows if r["server"] == server and r["concurrency"] == concurrency), None)

    one, two = row("flashstep-ray-1", top), row("flashstep-ray-2", top)
    ray1, native1 = row("flashstep-ray-1", 1), row("flashstep-workers", 1)
    scaling = two["throughput_rps"] / one["throughput_rps"] if one and two and one["throughput_rps"] else None
    overhead = ray1["p50_s"] / native1["p50_s"] if ray1 and native1 and ray1.get("p50_s") and native1.get("p50_s") else None
    return {"compare_concurrency": top, "ray_scaling_2_vs_1": scaling, "ray_overhead_ratio": overhead}


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Throughput against concurrency for each server, and against replica count at the top level."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_c, ax_r) = plt.subplots(1, 2, figsize=(11, 4.5))
    for server in dict.fromkeys(r["server"] for r in rows):
        points = sorted((r for r in rows if r["server"] == server), key=lambda r: r["concurrency"])
        ax_c.plot([p["concurrency"] for p in points], [p["throughput_rps"] for p in points], marker="o", label=server)
    ax_c.set_xscale("log", base=2)
    ax_c.set_xlabel("concurrent clients")
    ax_c.set_ylabel("images per second")
    ax_c.legend(fontsize=8)
    top = max(r["concurrency"] for r in rows)
    ray = sorted((r for r in rows if r["server"].startswith("flashstep-ray-") and r["concurrency"] == top),
                 key=lambda r: r["replicas"])  # fmt: skip
    ax_r.plot([r["replicas"] for r in ray], [r["throughput_rps"] for r in ray], marker="o", label=f"Ray Serve, {top} clients")
    if ray:
        base = ray[0]["throughput_rps"]
        ax_r.plot([r["replicas"] for r in ray], [base * r["replicas"] for r in ray], linestyle=":", color="gray", label="linear")
    ax_r.set_xticks([r["replicas"] for r in ray])
    ax_r.set_xlabel("engine replicas")
    ax_r.set_ylabel("images per second")
    ax_r.legend(fontsize=8)
    for ax in (ax_c, ax_r):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return True


def run(
    folder: Path,
    *,
    plan: load.LoadPlan | None = None,
    batch: BatchSettings | None = None,
    runtime: Runtime | None = None,
    replicas: tuple[int, ...] = (1, 2),
    name: str = "ray_scaling",
    out_dir: Path = RESULTS_DIR,
) -> dict:
    """Sweep the native server and Ray Serve at each replica count; write <out_dir>/<name>.json and .png."""
    plan = plan or load.LoadPlan(levels=LEVELS, requests=dict(REQUESTS), warmup=16)
    batch, runtime = batch or BatchSettings(), runtime or Runtime(threads=1)
    workload = load.choose_workload(folder, None, None)
    settings = {"model": folder.name, "workload": asdict(workload), "plan": asdict(plan), "batch": asdict(batch),
                "runtime": asdict(runtime), "replicas": list(replicas)}  # fmt: skip
    report = new_report(name, settings, device=runtime.device)
    log_dir = Path(tempfile.gettempdir()) / "flashstep-bench" / name
    specs = [("flashstep-workers", 1, flashstep_spec(folder, batch, runtime), START_TIMEOUT_S)]
    specs += [(f"flashstep-ray-{n}", n, flashstep_spec(folder, batch, runtime, ray_replicas=n), RAY_START_TIMEOUT_S)
              for n in replicas]  # fmt: skip
    rows: list[dict] = []
    for label, count, spec, timeout in specs:
        spec.name = label
        print(f"starting {label} on {folder.name} ...", flush=True)
        with start_server(spec, log_dir, start_timeout_s=timeout) as running:
            for row in load.measure_server(label, running.url, running.spec.generate_path, workload, plan):
                rows.append({**row, "replicas": count})
    errors = {r["server"]: 0 for r in rows}
    for r in rows:
        errors[r["server"]] += r["errors"]
    figures = {"levels": rows, **ratios(rows, max(plan.levels)), "errors_by_server": errors,
               "zero_errors": not any(errors.values())}  # fmt: skip
    report["figures"] = figures
    report["targets"] = {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()} | {"zero_errors": "true"}
    report["targets_met"] = load.targets_met(figures, TARGETS)
    print_table(rows, load.TABLE_COLUMNS, title=f"\nRay Serve scaling on {folder.name}")
    for key in TARGETS:
        value = figures[key]
        print(f"{key} = {'-' if value is None else f'{value:.3f}'}  (target {report['targets'][key]})")
    path = write_report(report, out_dir / f"{name}.json")
    print(f"wrote {path}")
    title = f"{folder.name}, {runtime.device}, {runtime.threads or 'default'} torch thread(s) per replica or worker"
    if plot(rows, path.with_suffix(".png"), title):
        print(f"wrote {path.with_suffix('.png')}")
    return report


def main(argv: list[str] | None = None) -> int:
    from flashstep.bench.latency import parse_ints

    parser = argparse.ArgumentParser(prog="flashstep bench ray", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=None, help="model name or folder (default: shapes-swiftbrush, else shapes-teacher)")
    add("--models-root", type=Path, default=None, help="folder whose sub-folders are models, besides the shipped ones")
    add("--levels", type=parse_ints, default=LEVELS, help="concurrency levels (default 1,16)")
    add("--requests", type=parse_ints, default=None, help="requests per level, one per level (default 40,240)")
    add("--replicas", type=parse_ints, default=(1, 2), help="Ray Serve replica counts to compare (default 1,2)")
    add("--threads", type=int, default=1, help="torch threads per replica and per worker process (default 1)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="folder the JSON results and plot are written to")
    args = parser.parse_args(argv)
    folder = load.default_model(args.models_root) if args.model is None else _resolve(args.model, args.models_root)
    requests = dict(REQUESTS) if args.requests is None else dict(zip(args.levels, args.requests, strict=True))
    plan = load.LoadPlan(levels=tuple(args.levels), requests=requests, warmup=16)
    run(folder, plan=plan, runtime=Runtime(threads=args.threads), replicas=tuple(args.replicas), out_dir=args.out_dir)
    return 0


def _resolve(model: str, models_root: Path | None) -> Path:
    from flashstep.models.registry import resolve

    return resolve(model, models_root)


if __name__ == "__main__":
    raise SystemExit(main())
