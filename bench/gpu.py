"""The benchmark scenarios at SD1.5 size in float16 on a GPU, once per attention backend.

    bash bench/gpu.sh                  # this, then the attention micro-benchmark, in under 8 minutes
    python -m flashstep.bench.gpu --budget-s 330

1. Export a random-weight SD1.5-size servable folder (bench/sd15_arch.py; float16, 512 px, TAESD
   in vae_tiny/) to a temporary folder.
2. bench/latency.py on it once per attention backend (sdpa, triton, xformers, math; a backend whose
   requirements fail here is listed as skipped, with why): one step without CFG at batch 1, 4, 16,
   with the VAE and with the tiny decoder, against the teacher at 25 steps with CFG 7.5, each figure
   measured (no estimates on a GPU). `math` materialises the attention matrix: batch 1 only.
3. bench/load.py on it with the default backend, if the time budget still allows: flashstep and its
   peers, one step, concurrency 1, 4, 16, 64 with fewer requests.

Writes bench/results/gpu_latency_<backend>.json/.png, gpu_load.json/.png and gpu.json (the card's
name, the backend table, the ratio keys); prints the table. Without CUDA it says so and exits 0.
Every step checks the remaining budget first and is skipped, with a note, when it would not fit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from flashstep.bench.report import RESULTS_DIR, new_report, print_table, pyplot, save_figure, write_report

BACKENDS = ("sdpa", "triton", "xformers", "math")
MODEL = "sd15-random"
# Rough worst-case seconds per step on an H100-class card, to decide what still fits the budget.
ESTIMATE_S = {"latency": 60, "latency_math": 45, "load": 150}


def backend_status(name: str) -> str | None:
    """None when `name` can run here, else the failed requirement checks."""
    from flashstep.kernels.backends import parse_backend, unmet_requirements

    unmet = unmet_requirements(parse_backend(name))
    return ", ".join(unmet) if unmet else None


def row_for(report: dict, *, role: str, batch: int, tiny: bool = False) -> dict | None:
    return next(
        (r for r in report["figures"]["rows"] if r["role"] == role and r["batch_size"] == batch and r["tiny_decoder"] == tiny),
        None,
    )


def backend_row(backend: str, report: dict) -> dict:
    """One line of the backend table: one-step seconds per image at batch 1/4/16, tiny decoder, teacher."""

    def s(role: str, batch: int, tiny: bool = False) -> float | None:
        row = row_for(report, role=role, batch=batch, tiny=tiny)
        return None if row is None else row["median_s_per_image"]

    return {
        "backend": backend,
        "one_step_b1_s": s("stand-in", 1),
        "one_step_b4_s": s("stand-in", 4),
        "one_step_b16_s": s("stand-in", 16),
        "one_step_tiny_b1_s": s("stand-in", 1, tiny=True),
        "teacher_cfg_b1_s": s("baseline", 1),
        "one_step_speedup_vs_teacher": report["figures"]["one_step_speedup_vs_teacher"],
    }


def plot_backends(rows: list[dict], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    keys = [("one_step_b1_s", "one step, batch 1"), ("one_step_tiny_b1_s", "one step + tiny decoder"),
            ("one_step_b16_s", "one step, batch 16 (per image)")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        ax.bar([j + i * width for j in range(len(rows))], [(r[key] or 0) * 1000 for r in rows], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["backend"] for r in rows])
    ax.set_ylabel("ms per image (median)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


@dataclass(frozen=True)
class GpuPlan:
    """What to run on a checkpoint: backends, dtype, the teacher's steps, the time budget, the load step."""

    device: str = "cuda"
    dtype: str = "float16"
    backends: tuple[str, ...] = BACKENDS
    teacher_steps: int = 25
    budget_s: float = 330.0
    with_load: bool = True
    resolution: int = 512
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    timing: tuple[int, float, int] = (3, 1.0, 20)  # latency.TimingBudget: min calls, seconds, max calls


TABLE_COLUMNS = [
    ("backend", "backend", ""), ("one_step_b1_s", "1 step b1 s", ".4f"), ("one_step_b4_s", "b4 s/img", ".4f"),
    ("one_step_b16_s", "b16 s/img", ".4f"), ("one_step_tiny_b1_s", "tiny dec b1 s", ".4f"),
    ("teacher_cfg_b1_s", "teacher s", ".3f"), ("one_step_speedup_vs_teacher", "speedup", ".1f"),
]  # fmt: skip


def run(folder: Path, plan: GpuPlan, *, out_dir: Path = RESULTS_DIR, started: float | None = None) -> dict:
    """Latency per backend (and the load sweep) on `folder`; writes gpu_*.json/.png and gpu.json."""
    from flashstep.bench import latency, load
    from flashstep.bench.servers import Runtime
    from flashstep.bench.workload import Workload

    started = time.monotonic() if started is None else started

    def left() -> float:
        return plan.budget_s - (time.monotonic() - started)

    report = new_report("gpu", {**asdict(plan), "model": folder.name}, device=plan.device)
    card = report["machine"].get("gpu", plan.device)
    skipped: dict[str, str] = {}
    rows: list[dict] = []
    models = {folder.name: folder}
    for backend in plan.backends:
        why = backend_status(backend)
        need = ESTIMATE_S["latency_math" if backend == "math" else "latency"]
        if why is None and left() < need:
            why = f"time budget: {left():.0f} s left, about {need} s needed"
        if why is not None:
            skipped[backend] = why
            print(f"skipping {backend}: {why}", flush=True)
            continue
        try:
            result = latency.run(
                models, teacher=folder.name, teacher_steps=plan.teacher_steps,
                batch_sizes=plan.batch_sizes[:1] if backend == "math" else plan.batch_sizes,
                budget=latency.TimingBudget(*plan.timing),
                device=plan.device, dtype=plan.dtype, attention_backend=backend,
                name=f"gpu_latency_{backend}", out_dir=out_dir,
            )  # fmt: skip
        except Exception as exc:  # one broken backend must not cost the others' figures on a lent GPU
            skipped[backend] = f"failed: {type(exc).__name__}: {exc}"[:500]
            print(f"{backend} failed:\n{traceback.format_exc()}", flush=True)
            continue
        rows.append(backend_row(backend, result))
    ratios = {}
    if not plan.with_load:
        skipped["load"] = "not asked for"
    elif left() < ESTIMATE_S["load"]:
        skipped["load"] = f"time budget: {left():.0f} s left, about {ESTIMATE_S['load']} s needed"
    else:
        load_plan = load.LoadPlan(requests={1: 20, 4: 40, 16: 80, 64: 128}, warmup=16, time_cap_s=30, in_process_requests=20)
        try:
            result = load.run(
                folder, Workload(1, 0.0, plan.resolution), plan=load_plan, runtime=Runtime(plan.device, plan.dtype),
                name="gpu_load", out_dir=out_dir,
            )  # fmt: skip
        except Exception as exc:
            skipped["load"] = f"failed: {type(exc).__name__}: {exc}"[:500]
            print(f"load failed:\n{traceback.format_exc()}", flush=True)
        else:
            ratios = {k: result["figures"][k] for k in load.TARGETS} | {"zero_errors": result["figures"]["zero_errors"]}
    report["backends"] = rows
    report["skipped"] = skipped
    sdpa = next((r for r in rows if r["backend"] == "sdpa"), rows[0] if rows else None)
    report["sd15_one_step_fp16_b1_s"] = None if sdpa is None else sdpa["one_step_b1_s"]
    report["one_step_speedup_vs_teacher"] = None if sdpa is None else sdpa["one_step_speedup_vs_teacher"]
    report |= ratios
    report["wall_s"] = time.monotonic() - started
    print_table(rows, TABLE_COLUMNS, title=f"\n{folder.name}, {plan.dtype}, {card} (teacher: {plan.teacher_steps} steps + CFG)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    path = write_report(report, out_dir / "gpu.json")
    print(f"wrote {path}")
    png = path.with_suffix(".png")
    if rows and plot_backends(rows, png, f"{folder.name}, {plan.dtype}, {card}"):
        print(f"wrote {png}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashstep bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=GpuPlan.budget_s, help="seconds for the whole run; no step starts once they are spent")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated attention backends to time")
    parser.add_argument("--no-load", action="store_true", help="skip the HTTP load step")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="folder the JSON results and plot are written to")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; the SD1.5 fp16 benchmark needs a GPU. Nothing measured.")
        return 0
    from flashstep.bench.sd15_arch import export_random_sd15

    started = time.monotonic()
    plan = GpuPlan(
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        budget_s=args.budget_s,
        with_load=not args.no_load,
    )
    print(f"GPU: {torch.cuda.get_device_name(0)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="flashstep-sd15-") as tmp:
        folder = export_random_sd15(Path(tmp) / MODEL, dtype=torch.float16)
        print(f"exported {folder} in {time.monotonic() - started:.0f} s", flush=True)
        run(folder, plan, out_dir=args.out_dir, started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
