"""HTTP load against flashstep and its peers on one checkpoint: throughput and p50/p95/p99 per concurrency.

    python -m flashstep.bench.load                          # table, bench/results/load.json, bench/results/load.png
    flashstep bench load --model shapes-swiftbrush --levels 1,4,16,64

Servers, one at a time, each a subprocess on 127.0.0.1 (bench/servers.py) loading the same folder:
flashstep-workers (`python -m flashstep.server` as it runs by default, inference in an engine worker
process, batches of `--max-batch-size` with `--max-wait-ms`), the FastAPI per-request peer, and
LitServe batching with the same two settings (bench/peers); on request also flashstep-in-process
(`--workers 0`) and flashstep-ray (`--ray`, one replica). Each is warmed up,
then swept over the concurrency levels with a closed loop: `concurrency` asyncio workers share one
httpx.AsyncClient and each sends its next request as soon as its last one is answered, until the
level's request count is reached or its time cap passes (requests in flight then finish, bounded by
the client timeout). A request counts as an error unless it returns 200 with a PNG body. The vanilla
pipeline called in-process (bench/peers/in_process.py, its own subprocess) gives the floor: the
latency of the same work with no server at all.

Every request has its own prompt and seed (bench/workload.py); all servers get the same sequence.
Default checkpoint: shapes-swiftbrush when shipped, else shapes-teacher at 1 step without CFG (a
one-step model's cost on the same architecture). Ratios (flashstep over peer, at concurrency 16):
http_overhead_ratio (p50 at concurrency 1 over the in-process median), throughput_ratio_vs_naive,
throughput_ratio_vs_litserve, p99_ratio_vs_litserve.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from flashstep.bench.report import (
    REPO_ROOT,
    RESULTS_DIR,
    new_report,
    percentile,
    print_table,
    pyplot,
    save_figure,
    write_report,
)
from flashstep.bench.servers import (
    BatchSettings,
    Runtime,
    fastapi_spec,
    flashstep_spec,
    litserve_spec,
    start_server,
)
from flashstep.bench.workload import PNG_MAGIC, Workload

LEVELS = (1, 4, 16, 64)
REQUESTS_PER_LEVEL = {1: 40, 4: 80, 16: 160, 64: 192}
COMPARE_AT = 16
SERVERS = ("flashstep-workers", "flashstep-in-process", "flashstep-ray", "fastapi-per-request", "litserve")
DEFAULT_SERVERS = ("flashstep-workers", "fastapi-per-request", "litserve")
FLASHSTEP = "flashstep-workers"  # the server as `flashstep serve` runs by default: the ratios are its
DEFAULT_MODELS = ("shapes-swiftbrush", "shapes-teacher")
# The throughput targets, read against this run's figures (never asserted in tests)
TARGETS = {
    "http_overhead_ratio": ("<=", 1.15),
    "throughput_ratio_vs_naive": (">=", 2.5),
    "throughput_ratio_vs_litserve": (">=", 1.2),
    "p99_ratio_vs_litserve": ("<=", 1.0),
}


@dataclass(frozen=True)
class LoadPlan:
    """How much load: concurrency levels, requests per level, a time cap per level, warm-up requests."""

    levels: tuple[int, ...] = LEVELS
    requests: dict[int, int] = field(default_factory=lambda: dict(REQUESTS_PER_LEVEL))
    time_cap_s: float = 90.0
    warmup: int = 16
    request_timeout_s: float = 120.0
    in_process_requests: int = 40

    def requests_at(self, concurrency: int) -> int:
        """Requests at a level: as planned, else 10 per worker (at least 20)."""
        return self.requests.get(concurrency, max(20, 10 * concurrency))


async def _send(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, str | None]:
    """(seconds, None) for a 200 with a PNG body, else (seconds, what went wrong)."""
    start = time.perf_counter()
    try:
        response = await client.post(path, json=body)
    except httpx.HTTPError as exc:
        return time.perf_counter() - start, type(exc).__name__
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        return elapsed, f"status {response.status_code}"
    if not response.content.startswith(PNG_MAGIC):
        return elapsed, "not a PNG"
    return elapsed, None


async def run_level(
    url: str, path: str, workload: Workload, concurrency: int, requests: int, time_cap_s: float,
    first_index: int, timeout_s: float,
) -> dict:  # fmt: skip
    """One closed-loop level: `concurrency` workers, `requests` in all or until `time_cap_s` passes."""
    issued = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + time_cap_s

        async def worker() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                index = first_index + issued
                issued += 1
                seconds, error = await _send(client, path, workload.body(index))
                if error is None:
                    latencies.append(seconds)
                else:
                    errors[error] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    row = {
        "concurrency": concurrency,
        "requests": issued,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall,
        "capped": issued < requests,
    }
    if latencies:
        row |= {
            "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99),
            "mean_s": sum(latencies) / len(latencies),
            "max_s": max(latencies),
        }
    return row


def flashstep_batches(url: str) -> tuple[float, float]:
    """(images, batches) so far from flashstep's /metrics batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "flashstep_batch_size_sum":
                total = sample.value
            elif sample.name == "flashstep_batch_size_count":
                count = sample.value
    return total, count


def measure_server(name: str, url: str, path: str, workload: Workload, plan: LoadPlan) -> list[dict]:
    """Warm the server up, then run every level; each level's prompts and seeds follow on from the last."""
    index = 0
    warm = asyncio.run(run_level(url, path, workload, min(8, plan.warmup or 1), plan.warmup, 600, index, plan.request_timeout_s))
    if plan.warmup and warm["errors"]:
        raise RuntimeError(f"{name} failed its warm-up requests: {warm['error_kinds']}")
    index += plan.warmup
    rows = []
    for concurrency in plan.levels:
        before = flashstep_batches(url) if name.startswith("flashstep") else None
        row = asyncio.run(
            run_level(url, path, workload, concurrency, plan.requests_at(concurrency), plan.time_cap_s, index, plan.request_timeout_s)
        )
        if before is not None:
            after = flashstep_batches(url)
            batches = after[1] - before[1]
            row["mean_batch_size"] = (after[0] - before[0]) / batches if batches else None
        index += row["requests"]
        rows.append({"server": name, **row})
        print(
            f"  {name} c={concurrency}: {row['ok']}/{row['requests']} ok, {row['throughput_rps']:.1f} img/s, "
            f"p50 {row.get('p50_s', float('nan')):.4f} s, p99 {row.get('p99_s', float('nan')):.4f} s",
            flush=True,
        )
    return rows


def measure_in_process(folder: Path, workload: Workload, runtime: Runtime, requests: int, log_dir: Path) -> dict:
    """The vanilla pipeline in its own process: median/p95/p99 latency and images per second."""
    out = log_dir / "in_process.json"
    argv = [
        sys.executable, "-m", "flashstep.bench.peers.in_process", "--model-dir", str(folder), "--steps", str(workload.steps),
        "--guidance-scale", str(workload.guidance_scale), "--resolution", str(workload.resolution),
        "--requests", str(requests), "--device", runtime.device, "--dtype", runtime.dtype, "--out", str(out),
    ]  # fmt: skip
    if runtime.threads:
        argv += ["--threads", str(runtime.threads)]
    env_threads = {"OMP_NUM_THREADS": str(runtime.threads)} if runtime.threads else {}
    done = subprocess.run(
        argv, cwd=REPO_ROOT, env={**os.environ, **env_threads}, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"in-process peer failed ({done.returncode}):\n{done.stderr[-3000:]}")
    data = json.loads(out.read_text())
    lat = data["latencies_s"]
    return {
        "server": "in-process",
        "concurrency": 1,
        "requests": len(lat),
        "ok": len(lat),
        "errors": 0,
        "wall_s": data["wall_s"],
        "throughput_rps": len(lat) / data["wall_s"],
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "p99_s": percentile(lat, 99),
        "mean_s": sum(lat) / len(lat),
        "max_s": max(lat),
    }


def _level(rows: list[dict], server: str, concurrency: int) -> dict | None:
    return next((r for r in rows if r["server"] == server and r["concurrency"] == concurrency), None)


def ratios(rows: list[dict], in_process: dict | None, compare_at: int) -> dict:
    """The ratio keys (None where a side is missing), and error totals per server."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    fs1, fsc = _level(rows, FLASHSTEP, 1), _level(rows, FLASHSTEP, compare_at)
    naive, lit = _level(rows, "fastapi-per-request", compare_at), _level(rows, "litserve", compare_at)

    def get(row: dict | None, key: str) -> float | None:
        return None if row is None else row.get(key)

    errors = {}
    for r in rows:
        errors[r["server"]] = errors.get(r["server"], 0) + r["errors"]
    return {
        "compare_concurrency": compare_at,
        "http_overhead_ratio": ratio(get(fs1, "p50_s"), get(in_process, "p50_s")),
        "throughput_ratio_vs_naive": ratio(get(fsc, "throughput_rps"), get(naive, "throughput_rps")),
        "throughput_ratio_vs_litserve": ratio(get(fsc, "throughput_rps"), get(lit, "throughput_rps")),
        "p99_ratio_vs_litserve": ratio(get(fsc, "p99_s"), get(lit, "p99_s")),
        "errors_by_server": errors,
        "zero_errors": all(v == 0 for v in errors.values()),
    }


def targets_met(figures: dict, targets: dict[str, tuple[str, float]] | None = None) -> dict:
    """Per target (`TARGETS` unless given), whether `figures` meet it (None when not measured), and zero errors."""
    met = {}
    for key, (op, bound) in (TARGETS if targets is None else targets).items():
        value = figures.get(key)
        met[key] = None if value is None else (value <= bound if op == "<=" else value >= bound)
    met["zero_errors"] = figures["zero_errors"]
    return met


def plot_load(rows: list[dict], in_process: dict | None, path: Path, title: str) -> bool:
    """Throughput and p99 latency against concurrency, one line per server; the in-process floor dotted."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(11, 4.5))
    for server in dict.fromkeys(r["server"] for r in rows):
        points = sorted((r for r in rows if r["server"] == server and r.get("p99_s")), key=lambda r: r["concurrency"])
        xs = [p["concurrency"] for p in points]
        ax_t.plot(xs, [p["throughput_rps"] for p in points], marker="o", label=server)
        ax_p.plot(xs, [p["p99_s"] for p in points], marker="o", label=server)
    if in_process is not None:
        ax_t.axhline(in_process["throughput_rps"], linestyle=":", color="gray", label="in-process pipeline (1 at a time)")
        ax_p.axhline(in_process["p99_s"], linestyle=":", color="gray", label="in-process pipeline p99")
    levels = sorted({r["concurrency"] for r in rows})
    for ax, label in ((ax_t, "images per second"), (ax_p, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_p.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return True


TABLE_COLUMNS = [
    ("server", "server", ""),
    ("concurrency", "clients", ""),
    ("ok", "ok", ""),
    ("errors", "errors", ""),
    ("throughput_rps", "img/s", ".2f"),
    ("p50_s", "p50 s", ".4f"),
    ("p95_s", "p95 s", ".4f"),
    ("p99_s", "p99 s", ".4f"),
    ("mean_batch_size", "batch", ".1f"),
]


def choose_workload(folder: Path, steps: int | None, guidance_scale: float | None) -> Workload:
    """The per-image work: the model's own one-step use (teacher: 1 step, no CFG) unless told otherwise."""
    from flashstep.models.flashstep_config import FlashstepConfig

    config = FlashstepConfig.load(folder)
    if config.lora is not None:
        raise SystemExit(
            f"{folder.name} is a LoRA checkpoint ({config.lora}); the vanilla-diffusers peers need a full folder"
        )
    if steps is None:
        steps = 1 if config.family == "teacher" else config.default_steps
    if guidance_scale is None:
        guidance_scale = 0.0 if config.family != "teacher" or steps == 1 else config.default_guidance_scale
    return Workload(steps, guidance_scale, config.resolution)


def run(
    folder: Path,
    workload: Workload,
    *,
    plan: LoadPlan | None = None,
    batch: BatchSettings | None = None,
    runtime: Runtime | None = None,
    servers: tuple[str, ...] = DEFAULT_SERVERS,
    in_process: bool = True,
    compare_at: int = COMPARE_AT,
    name: str = "load",
    out_dir: Path = RESULTS_DIR,
) -> dict:
    """Sweep every server over `plan` on `folder`; write <out_dir>/<name>.json and .png; return the report."""
    plan, batch, runtime = plan or LoadPlan(), batch or BatchSettings(), runtime or Runtime()
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        raise ValueError(f"`servers` must be among {list(SERVERS)} but names {unknown}")
    if compare_at not in plan.levels:
        compare_at = max((c for c in plan.levels if c <= compare_at), default=plan.levels[0])
    settings = {
        "model": folder.name,
        "model_dir": str(folder),
        "workload": asdict(workload),
        "plan": {**asdict(plan), "requests": {str(c): plan.requests_at(c) for c in plan.levels}},
        "batch": asdict(batch),
        "runtime": asdict(runtime),
        "servers": list(servers),
        "client": "asyncio + httpx.AsyncClient, closed loop, one connection per worker, loopback",
        "error": "any response other than 200 with a PNG body, or a transport error",
    }
    report = new_report(name, settings, device=runtime.device)
    log_dir = Path(tempfile.gettempdir()) / "flashstep-bench" / name  # server logs, for failures
    specs = {
        "flashstep-workers": lambda: flashstep_spec(folder, batch, runtime),
        "flashstep-in-process": lambda: flashstep_spec(folder, batch, runtime, workers=0),
        "flashstep-ray": lambda: flashstep_spec(folder, batch, runtime, ray_replicas=1),
        "fastapi-per-request": lambda: fastapi_spec(folder, runtime),
        "litserve": lambda: litserve_spec(folder, batch, runtime),
    }
    rows: list[dict] = []
    for server in servers:
        print(f"starting {server} on {folder.name} ...", flush=True)
        with start_server(specs[server](), log_dir) as running:
            rows += measure_server(server, running.url, running.spec.generate_path, workload, plan)
    floor = None
    if in_process:
        print("timing the in-process pipeline ...", flush=True)
        floor = measure_in_process(folder, workload, runtime, plan.in_process_requests, log_dir)
    figures = {"levels": rows, "in_process": floor, **ratios(rows, floor, compare_at)}
    report["figures"] = figures
    report["targets"] = {k: f"{op} {bound:g}" for k, (op, bound) in TARGETS.items()} | {"zero_errors": "true"}
    report["targets_met"] = targets_met(figures)
    print_table(rows + ([floor] if floor else []), TABLE_COLUMNS, title=f"\nHTTP load on {folder.name} ({workload.steps} step(s))")
    for key in ("http_overhead_ratio", "throughput_ratio_vs_naive", "throughput_ratio_vs_litserve", "p99_ratio_vs_litserve"):
        value = figures[key]
        print(f"{key} = {'-' if value is None else f'{value:.3f}'}  (target {report['targets'][key]})")
    print(f"errors: {figures['errors_by_server']}", flush=True)
    path = write_report(report, out_dir / f"{name}.json")
    print(f"wrote {path}")
    png = path.with_suffix(".png")
    title = f"{folder.name}, {workload.steps} step(s), {runtime.device}, batch <= {batch.max_batch_size}, wait {batch.max_wait_ms:g} ms"
    if plot_load(rows, floor, png, title):
        print(f"wrote {png}")
    return report


def default_model(models_root: Path | None) -> Path:
    from flashstep.models.registry import discover

    found = discover(models_root)
    for name in DEFAULT_MODELS:
        if name in found:
            return found[name]
    raise SystemExit(f"none of {list(DEFAULT_MODELS)} is available; pass --model")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from flashstep.bench.latency import parse_ints

    add = parser.add_argument
    add("--model", default=None, help="model name or folder (default: shapes-swiftbrush, else shapes-teacher)")
    add("--models-root", type=Path, default=None, help="folder whose sub-folders are models, besides the shipped ones")
    add("--steps", type=int, default=None, help="steps per image (default: the model's; teacher: 1)")
    add("--guidance-scale", type=float, default=None, help="CFG scale (default: 0 for one-step work)")
    add("--levels", type=parse_ints, default=LEVELS, help="concurrency levels (default 1,4,16,64)")
    add("--requests", type=parse_ints, default=None, help="requests per level, one per level (default 40,80,160,192)")
    add("--time-cap-s", type=float, default=LoadPlan.time_cap_s, help="longest one concurrency level may run, in seconds")
    add("--warmup", type=int, default=LoadPlan.warmup, help="untimed requests per server")
    add("--in-process-requests", type=int, default=LoadPlan.in_process_requests, help="requests of the in-process pipeline floor")
    add("--servers", default=",".join(DEFAULT_SERVERS), help="comma-separated, among " + ", ".join(SERVERS))
    add("--no-in-process", action="store_true", help="skip the in-process pipeline floor")
    add("--compare-at", type=int, default=COMPARE_AT, help="concurrency of the throughput and p99 ratios")
    add("--max-batch-size", type=int, default=BatchSettings.max_batch_size, help="most images per forward pass, every server")
    add("--max-wait-ms", type=float, default=BatchSettings.max_wait_ms, help="longest a request waits for its batch to fill")
    add("--device", default="cpu", help="torch device of every server (default cpu)")
    add("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype of every server")
    add("--threads", type=int, default=None, help="torch threads of every server (default: torch's)")
    add("--name", default="load", help="results file name (bench/results/<name>.json)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="folder the JSON results and plot are written to")
    return parser


def plan_from_args(args: argparse.Namespace) -> LoadPlan:
    requests = dict(REQUESTS_PER_LEVEL)
    if args.requests is not None:
        if len(args.requests) != len(args.levels):
            raise SystemExit(f"--requests gives {len(args.requests)} counts for {len(args.levels)} --levels")
        requests = dict(zip(args.levels, args.requests, strict=True))
    return LoadPlan(
        levels=args.levels, requests=requests, time_cap_s=args.time_cap_s, warmup=args.warmup,
        in_process_requests=args.in_process_requests,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="flashstep bench load", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.model is None:
        folder = default_model(args.models_root)
    else:
        from flashstep.models.registry import resolve

        folder = resolve(args.model, args.models_root)
    workload = choose_workload(folder, args.steps, args.guidance_scale)
    run(
        folder,
        workload,
        plan=plan_from_args(args),
        batch=BatchSettings(args.max_batch_size, args.max_wait_ms),
        runtime=Runtime(args.device, args.dtype, args.threads),
        servers=tuple(s.strip() for s in args.servers.split(",") if s.strip()),
        in_process=not args.no_in_process,
        compare_at=args.compare_at,
        name=args.name,
        out_dir=args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
