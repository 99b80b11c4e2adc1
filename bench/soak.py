"""Soak: a real `flashstep serve` under mixed valid and hostile traffic, with hot swaps, for minutes.

    python -m flashstep.bench.soak                          # 10 min, 64 clients, a swap every 30 s
    python -m flashstep.bench.soak --swaps 20 --swap-every-s 3 --out bench/results/swaps.json

The server runs as its own process (`python -m flashstep.server`) over a copy of the shipped models
(relative links kept, so every folder stays inside its models root), with an admin token so a
swapper task can hot-swap `shapes-instaflow` between two folders while the clients run. Each client
loops until the deadline, drawing a request kind: valid native and OpenAI generations on the shipped
models, and hostile ones (lone surrogates, an oversized prompt, a 2 MiB body, malformed JSON, an
unknown model, out-of-range fields). Every answer is recorded.

What the run must show, per the targets below: every request answered (no connection error, no
5xx), every valid request a 200 and every hostile one a 4xx, every swap a 200, and the server's
RSS (the server process and its engine worker processes) growing by less than 5 % from the
warm-up's end to the end of the run, each end the median of a minute of samples under load. p50/p99 of valid requests per
window and RSS over time go to the PNG. With `--swaps N` the run stops after N swaps, lets the
server settle, and compares RSS with its baseline the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from flashstep.bench.report import RESULTS_DIR, new_report, percentile, print_table, write_report
from flashstep.bench.servers import ServerSpec, free_port, start_server

ADMIN_TOKEN = "soak-admin-token"
SWAPPED = "shapes-instaflow"
SWAP_FOLDERS = ("shapes-instaflow", "shapes-swiftbrush")  # same family and steps: clients never notice
MODELS = ("shapes-instaflow", "shapes-swiftbrush", "shapes-hypersd", "shapes-2rf")
RSS_GROWTH_TARGET = 0.05
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class SoakPlan:
    """How long, how hard and how hostile the soak is."""

    duration_s: float = 600.0
    concurrency: int = 64
    swap_every_s: float = 30.0
    swaps: int | None = None  # stop after this many swaps instead of at duration_s
    warmup_s: float = 60.0  # RSS baseline is taken at the end of this window
    rss_window_s: float = 60.0  # baseline and final RSS: medians over this long at each end
    settle_s: float = 10.0  # after the last request, before the final RSS reading
    hostile_fraction: float = 0.25
    window_s: float = 30.0
    sample_every_s: float = 2.0
    request_timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("duration_s", "swap_every_s", "window_s", "sample_every_s", "request_timeout_s", "rss_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0 but is {getattr(self, name)}")
        if self.concurrency < 1:
            raise ValueError(f"`concurrency` must be >= 1 but is {self.concurrency}")
        if not 0 <= self.hostile_fraction <= 1:
            raise ValueError(f"`hostile_fraction` must be in [0, 1] but is {self.hostile_fraction}")
        if self.swaps is not None and self.swaps < 1:
            raise ValueError(f"`swaps` must be >= 1 but is {self.swaps}")
        if self.warmup_s < 0 or self.settle_s < 0:
            raise ValueError("`warmup_s` and `settle_s` must be >= 0")


# ----- requests -----


def valid_request(rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, path, JSON body) of a generation that must answer 200."""
    prompt = rng.choice(["a red circle", "a small blue star at the top", "a green triangle on a black background",
                         "a large yellow square on the left, white background", "a purple star"])  # fmt: skip
    model = rng.choice(MODELS)
    if rng.random() < 0.5:
        body = {"prompt": prompt, "model": model, "seed": rng.randrange(2**31), "output_format": "png"}
        return "valid-native", "/generate", json.dumps(body).encode()
    body = {"prompt": prompt, "model": model, "size": "64x64", "response_format": "b64_json", "seed": rng.randrange(2**31)}
    return "valid-openai", "/v1/images/generations", json.dumps(body).encode()


def hostile_request(rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, path, body) of a request the server must refuse with a 4xx and survive."""
    kind = rng.choice(["surrogate", "huge-prompt", "huge-body", "bad-json", "unknown-model", "bad-field", "many-keys"])
    path = rng.choice(["/generate", "/v1/images/generations"])
    if kind == "surrogate":  # a lone UTF-16 surrogate is valid JSON escaping but not valid text
        body = b'{"prompt": "a red circle", "negative_prompt": "\\ud800"}'
    elif kind == "huge-prompt":
        body = json.dumps({"prompt": "a red circle " * 8000}).encode()
    elif kind == "huge-body":
        body = json.dumps({"prompt": "a red circle", "user": "x" * (3 << 19)}).encode()  # 1.5 MiB: over the cap, drained
    elif kind == "bad-json":
        body = b'{"prompt": "a red circle", '
    elif kind == "unknown-model":
        body = json.dumps({"prompt": "a red circle", "model": "no-such-model"}).encode()
    elif kind == "bad-field":
        body = json.dumps({"prompt": "a red circle", "n": rng.choice([0, -1, 10_000]), "seed": -5}).encode()
    else:
        body = json.dumps({"prompt": "a red circle", **{f"k{i}": i for i in range(20_000)}}).encode()
    return f"hostile-{kind}", path, body


def classify(kind: str, status: int | None, content: bytes) -> str | None:
    """None when the answer is what `kind` must get, else what went wrong."""
    if status is None:
        return "no answer"
    if status >= 500:
        return f"status {status}"
    if kind.startswith("valid"):
        if status != 200:
            return f"status {status}"
        if kind == "valid-native" and not content.startswith(PNG_MAGIC):
            return "not a PNG"
        return None
    return None if 400 <= status < 500 else f"status {status}"


# ----- the run -----


def process_tree(pid: int) -> list[int]:
    """`pid` and every process descended from it (the server's engine worker processes), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while listed
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ")"
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += parents.get(current, [])
    return tree


def server_rss_bytes(pid: int) -> int:
    """Resident memory of the server: process `pid` and its worker processes (Linux /proc), bytes."""
    total = 0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), 0)
    if total == 0:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return total


async def _drive(url: str, pid: int, plan: SoakPlan) -> dict:
    rng = random.Random(plan.seed)
    records: list[tuple[float, str, str | None, float]] = []  # (t, kind, problem, seconds)
    rss: list[tuple[float, int]] = []
    swaps: list[tuple[float, int | None]] = []
    limits = httpx.Limits(max_connections=plan.concurrency + 2, max_keepalive_connections=plan.concurrency)
    started = time.monotonic()
    deadline = started + plan.duration_s
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, timeout=plan.request_timeout_s, limits=limits) as client:

        async def one_client(index: int) -> None:
            local = random.Random(rng.random() + index)
            while not stop.is_set() and time.monotonic() < deadline:
                make = hostile_request if local.random() < plan.hostile_fraction else valid_request
                kind, path, body = make(local)
                t0 = time.monotonic()
                try:
                    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
                    status, content = response.status_code, response.content
                except httpx.HTTPError as exc:
                    status, content = None, type(exc).__name__.encode()
                problem = classify(kind, status, content)
                if status is None:
                    problem = f"no answer ({content.decode()})"
                records.append((t0 - started, kind, problem, time.monotonic() - t0))

        async def swapper() -> None:
            turn = 0
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=plan.swap_every_s)
                    return
                except TimeoutError:
                    pass
                turn += 1
                folder = SWAP_FOLDERS[turn % len(SWAP_FOLDERS)]
                try:
                    response = await client.post(
                        f"/admin/models/{SWAPPED}/swap", json={"path": folder},
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    )  # fmt: skip
                    swaps.append((time.monotonic() - started, response.status_code))
                except httpx.HTTPError:
                    swaps.append((time.monotonic() - started, None))
                if plan.swaps is not None and len(swaps) >= plan.swaps:
                    stop.set()

        async def sampler() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                rss.append((time.monotonic() - started, server_rss_bytes(pid)))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=plan.sample_every_s)
                except TimeoutError:
                    pass

        await asyncio.gather(swapper(), sampler(), *(one_client(i) for i in range(plan.concurrency)))
        wall = time.monotonic() - started
        await asyncio.sleep(plan.settle_s)  # let in-flight work drain before the last RSS reading
        rss.append((time.monotonic() - started, server_rss_bytes(pid)))
        ready = (await client.get("/readyz")).status_code
    return {"records": records, "rss": rss, "swaps": swaps, "wall_s": wall, "ready_after": ready}


def summarize_run(raw: dict, plan: SoakPlan) -> dict:
    """Counts, problems, RSS growth and per-window latency of one run."""
    records = raw["records"]
    problems = Counter(f"{kind}: {problem}" for _, kind, problem, _ in records if problem)
    kinds = Counter(kind for _, kind, _, _ in records)
    rss = raw["rss"]
    # Levels, not single samples: RSS swings by a few percent with each swap (two engines held
    # while the old one drains), so each end is the median of one window of samples under load.
    baseline_at = min(plan.warmup_s, raw["wall_s"] / 2)
    span = min(plan.rss_window_s, raw["wall_s"] / 4)
    under_load = [(t, v) for t, v in rss if t <= raw["wall_s"]]
    baseline = statistics.median(
        [v for t, v in under_load if baseline_at <= t <= baseline_at + span] or [rss[0][1]]
    )
    final = statistics.median([v for t, v in under_load if t >= raw["wall_s"] - span] or [rss[-1][1]])
    windows = []
    n_windows = max(1, int(raw["wall_s"] // plan.window_s) + 1)
    for w in range(n_windows):
        lo, hi = w * plan.window_s, (w + 1) * plan.window_s
        lat = [s for t, kind, problem, s in records if lo <= t < hi and kind.startswith("valid") and not problem]
        if lat:
            windows.append({"start_s": lo, "requests": len(lat), "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99)})
    swaps_failed = sum(1 for _, status in raw["swaps"] if status != 200)
    growth = (final - baseline) / baseline
    figures = {
        "wall_s": raw["wall_s"],
        "requests": len(records),
        "valid": sum(v for k, v in kinds.items() if k.startswith("valid")),
        "hostile": sum(v for k, v in kinds.items() if k.startswith("hostile")),
        "by_kind": dict(sorted(kinds.items())),
        "problems": dict(problems.most_common()),
        "unanswered": sum(v for k, v in problems.items() if "no answer" in k),
        "server_errors": sum(v for k, v in problems.items() if ": status 5" in k),
        "swaps": len(raw["swaps"]),
        "swaps_failed": swaps_failed,
        "rss_baseline_mib": baseline / 2**20,
        "rss_final_mib": final / 2**20,
        "rss_growth": growth,
        "ready_after": raw["ready_after"],
        "windows": windows,
    }
    figures["targets_met"] = {
        "every_request_answered_right": not problems,
        "every_swap_ok": swaps_failed == 0 and len(raw["swaps"]) > 0,
        "rss_growth_under_5_percent": growth < RSS_GROWTH_TARGET,
        "ready_after": raw["ready_after"] == 200,
    }
    figures["rss_mib"] = [(round(t, 1), round(v / 2**20, 1)) for t, v in rss]
    return figures


def plot_soak(figures: dict, path: Path, title: str) -> bool:
    """p50/p99 per window and RSS over time; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    windows = figures["windows"]
    starts = [w["start_s"] for w in windows]
    top.plot(starts, [w["p50_s"] * 1000 for w in windows], marker="o", label="p50")
    top.plot(starts, [w["p99_s"] * 1000 for w in windows], marker="o", label="p99")
    top.set_ylabel("valid request latency (ms)")
    top.legend()
    top.set_title(title)
    times, mib = zip(*figures["rss_mib"], strict=True)
    bottom.plot(times, mib, color="tab:red")
    bottom.axhline(figures["rss_baseline_mib"] * (1 + RSS_GROWTH_TARGET), color="gray", linestyle="--", label="baseline + 5 %")
    bottom.set_ylabel("server RSS (MiB)")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def models_copy(dst: Path) -> Path:
    """A copy of the shipped models with their relative links, as a models root the server may use."""
    from flashstep.models.registry import SHIPPED_MODELS_DIR

    shutil.copytree(SHIPPED_MODELS_DIR, dst, symlinks=True)
    return dst


def run(plan: SoakPlan, out: Path, max_batch_size: int = 8, max_wait_ms: float = 10.0) -> dict:
    """Start the server, soak it, write `out` (JSON) and its PNG; returns the report."""
    with tempfile.TemporaryDirectory(prefix="flashstep-soak-") as tmp:
        root = models_copy(Path(tmp) / "models")
        port = free_port()
        argv = [
            sys.executable, "-m", "flashstep.server", "--host", "127.0.0.1", "--port", str(port),
            "--models-root", str(root), "--models", ",".join(sorted({*MODELS, *SWAP_FOLDERS})),
            "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
            "--queue-limit", str(max(256, 4 * plan.concurrency)), "--log-level", "warning",
        ]  # fmt: skip
        spec = ServerSpec("flashstep-soak", argv, port, lambda r: r.status_code == 200, "/readyz",
                          env={"FLASHSTEP_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
        with start_server(spec, Path(tmp) / "logs") as server:
            raw = asyncio.run(_drive(server.url, server.process.pid, plan))
            log_tail = server.log_tail(2000)
    figures = summarize_run(raw, plan)
    settings = asdict(plan) | {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "models": list(MODELS),
                               "swapped": SWAPPED, "swap_folders": list(SWAP_FOLDERS),
                               # the server inherits the environment: an allocator preloaded there is its allocator
                               "ld_preload": os.environ.get("LD_PRELOAD")}  # fmt: skip
    report = new_report(out.stem, settings)
    report["figures"] = figures
    if figures["problems"]:
        report["server_log_tail"] = log_tail
    write_report(report, out)
    plot_soak(figures, out.with_suffix(".png"), f"{out.stem}: {plan.concurrency} clients, swap every {plan.swap_every_s:g} s")
    return report


def print_summary(report: dict) -> None:
    f = report["figures"]
    rows = [
        {"figure": "requests (valid / hostile)", "value": f"{f['requests']} ({f['valid']} / {f['hostile']})"},
        {"figure": "unanswered / 5xx / other problems", "value": f"{f['unanswered']} / {f['server_errors']} / "
                                                              f"{sum(f['problems'].values()) - f['unanswered'] - f['server_errors']}"},
        {"figure": "swaps (failed)", "value": f"{f['swaps']} ({f['swaps_failed']})"},
        {"figure": "RSS baseline -> final (MiB)", "value": f"{f['rss_baseline_mib']:.0f} -> {f['rss_final_mib']:.0f} "
                                                           f"({100 * f['rss_growth']:+.1f} %)"},
        {"figure": "targets met", "value": ", ".join(k for k, v in f["targets_met"].items() if v) or "none"},
        {"figure": "targets missed", "value": ", ".join(k for k, v in f["targets_met"].items() if not v) or "none"},
    ]  # fmt: skip
    print_table(rows, [("figure", "figure", ""), ("value", "value", "")], title=report["benchmark"])
    for problem, count in list(f["problems"].items())[:10]:
        print(f"  {count:6d}  {problem}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--duration-s", type=float, default=SoakPlan.duration_s, help="longest the clients run")
    parser.add_argument("--concurrency", type=int, default=SoakPlan.concurrency, help="clients sending at once")
    parser.add_argument("--swap-every-s", type=float, default=SoakPlan.swap_every_s, help="seconds between hot swaps")
    parser.add_argument("--swaps", type=int, default=None, help="stop after this many hot swaps instead of at --duration-s")
    parser.add_argument("--warmup-s", type=float, default=SoakPlan.warmup_s, help="the RSS baseline is read at the end of this window")
    parser.add_argument("--settle-s", type=float, default=SoakPlan.settle_s, help="wait after the last request before the final RSS reading")
    parser.add_argument("--hostile-fraction", type=float, default=SoakPlan.hostile_fraction, help="share of hostile requests")
    parser.add_argument("--window-s", type=float, default=SoakPlan.window_s, help="latency percentiles per window of this length")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json", help="results JSON; the PNG goes beside it")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="flashstep bench soak", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        plan = SoakPlan(duration_s=args.duration_s, concurrency=args.concurrency, swap_every_s=args.swap_every_s,
                        swaps=args.swaps, warmup_s=args.warmup_s, settle_s=args.settle_s,
                        hostile_fraction=args.hostile_fraction, window_s=args.window_s)  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    report = run(plan, args.out)
    print_summary(report)
    return 0 if all(report["figures"]["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
