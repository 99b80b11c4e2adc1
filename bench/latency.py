"""In-process latency of every shipped model x steps x batch size, against the teacher at 25 steps with CFG.

    python -m flashstep.bench.latency                       # table, bench/results/latency.json, bench/results/latency.png
    flashstep bench latency --models shapes-teacher,shapes-swiftbrush --batch-sizes 1,4

Each model found by `models.registry.discover` (shipped, plus --models-root) is loaded as a flashstep
`Engine` and timed through `Engine.generate`, the call the server's batcher makes: prompt encoding,
per-request noise, the family's sampler and the VAE decode, but no HTTP and no PNG encoding.
Students run each of their allowed step counts among 1, 2, 4, 8 (and their default); the teacher
runs the baseline only: 25 steps with its classifier-free guidance. Every image has its own prompt
(bench/workload.py), so the prompt cache never answers. One untimed call warms each configuration.

Figures per configuration: seconds per image (median and p90 over calls; a call's seconds over its
batch size), the per-stage split (encode, denoise, decode, per image), UNet evaluations per image
(a CFG step counts two), images per second, and the teacher's median over this one's at the same
batch size. `one_step_speedup_vs_teacher` is that ratio at batch 1 for the one-step models
(default_steps == 1), the smallest of them; where none is found, the teacher itself at one step
without CFG stands in (same architecture, same cost) and the report says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flashstep.bench.report import (
    RESULTS_DIR,
    new_report,
    percentile,
    print_table,
    pyplot,
    save_figure,
    write_report,
)
from flashstep.bench.workload import unique_prompts

TEACHER = "shapes-teacher"
TEACHER_STEPS = 25
STUDENT_STEPS = (1, 2, 4, 8)
BATCH_SIZES = (1, 4, 16)
ONE_STEP_TARGET = 30.0  # the goal: one-step students take >= 30x fewer seconds per image than teacher@25+CFG


@dataclass(frozen=True)
class Scenario:
    """One configuration to time. `guidance_scale` None means the model's default."""

    model: str
    family: str
    steps: int
    guidance_scale: float | None
    batch_size: int
    role: str  # "baseline" (teacher@25+CFG) | "student" | "stand-in" (teacher@1, no CFG)
    tiny_decoder: bool = False


@dataclass(frozen=True)
class TimingBudget:
    """How long each configuration is timed: at least `min_calls` calls and `seconds`, at most `max_calls`."""

    min_calls: int = 5
    seconds: float = 4.0
    max_calls: int = 50


def student_steps(allowed: tuple[int, ...], default: int) -> list[int]:
    """The step counts a student is timed at: its allowed ones among 1, 2, 4, 8, plus its default."""
    return sorted({s for s in allowed if s in STUDENT_STEPS} | {default})


def scenarios(
    configs: dict[str, object],
    teacher: str,
    teacher_steps: int,
    batch_sizes: tuple[int, ...],
    tiny_decoders: frozenset[str] = frozenset(),
) -> list[Scenario]:
    """Every configuration to time, the baseline first; `configs` maps model name -> FlashstepConfig.

    One-step configurations of the models in `tiny_decoders` (folders with vae_tiny/) are timed a
    second time with the tiny decoder.
    """
    if teacher not in configs:
        raise ValueError(f"the teacher {teacher!r} must be among the models {sorted(configs)} (it is the baseline)")
    found = []
    tcfg = configs[teacher]
    if teacher_steps not in tcfg.allowed_steps:
        raise ValueError(
            f"`teacher_steps` must be one of {list(tcfg.allowed_steps)} for {teacher} but is {teacher_steps}"
        )
    for b in batch_sizes:
        found.append(Scenario(teacher, tcfg.family, teacher_steps, tcfg.default_guidance_scale, b, "baseline"))
    one_step = [n for n, c in configs.items() if n != teacher and c.default_steps == 1]
    if not one_step and 1 in tcfg.allowed_steps:
        for tiny in (False, True) if teacher in tiny_decoders else (False,):
            for b in batch_sizes:
                found.append(Scenario(teacher, tcfg.family, 1, 0.0, b, "stand-in", tiny))
    for name, cfg in sorted(configs.items()):
        if name == teacher:
            continue
        for steps in student_steps(cfg.allowed_steps, cfg.default_steps):
            for tiny in (False, True) if steps == 1 and name in tiny_decoders else (False,):
                for b in batch_sizes:
                    found.append(Scenario(name, cfg.family, steps, None, b, "student", tiny))
    return found


class PromptStream:
    """Hands out the workload's unique prompts in order; one stream per engine defeats its LRU cache."""

    def __init__(self) -> None:
        self.prompts = unique_prompts()
        self.next = 0

    def take(self, n: int) -> list[str]:
        out = [self.prompts[(self.next + i) % len(self.prompts)] for i in range(n)]
        self.next += n
        return out


def measure(engine, scenario: Scenario, budget: TimingBudget, prompts: PromptStream) -> dict:
    """Time `engine.generate` for one scenario: one warm-up call, then calls within `budget`."""
    from flashstep.models.outputs import GenerationRequest

    def call() -> tuple[float, object]:
        first = prompts.next  # request i of the stream gets prompt i and seed i
        requests = [
            GenerationRequest(
                prompt=p, seed=first + i, num_inference_steps=scenario.steps,
                guidance_scale=scenario.guidance_scale, tiny_decoder=scenario.tiny_decoder,
            )  # fmt: skip
            for i, p in enumerate(prompts.take(scenario.batch_size))
        ]
        start = time.perf_counter()
        result = engine.generate(requests)
        return time.perf_counter() - start, result

    call()  # warm-up: allocator, kernels, first-call paths
    per_image, stages, evals = [], {"encode": [], "denoise": [], "decode": []}, 0
    started = time.perf_counter()
    while True:
        seconds, result = call()
        b = scenario.batch_size
        per_image.append(seconds / b)
        for stage in stages:
            stages[stage].append(getattr(result.timings, stage) / b)
        evals = result.unet_evals
        n, elapsed = len(per_image), time.perf_counter() - started
        if n >= budget.max_calls or (n >= budget.min_calls and elapsed >= budget.seconds):
            break
    median = percentile(per_image, 50)
    return {
        **asdict(scenario),
        "guidance_scale": engine.validate(
            GenerationRequest(prompt="x", seed=0, num_inference_steps=scenario.steps, guidance_scale=scenario.guidance_scale)
        ).guidance_scale,
        "calls": len(per_image),
        "median_s_per_image": median,
        "p90_s_per_image": percentile(per_image, 90),
        "encode_s_per_image": percentile(stages["encode"], 50),
        "denoise_s_per_image": percentile(stages["denoise"], 50),
        "decode_s_per_image": percentile(stages["decode"], 50),
        "unet_evals_per_image": evals,
        "images_per_s": 1.0 / median,
    }


def add_ratios(rows: list[dict]) -> None:
    """Each row's `speedup_vs_teacher`: the baseline's median over its own, at the same batch size."""
    baseline = {r["batch_size"]: r["median_s_per_image"] for r in rows if r["role"] == "baseline"}
    baseline_denoise = {r["batch_size"]: r["denoise_s_per_image"] for r in rows if r["role"] == "baseline"}
    for r in rows:
        b = r["batch_size"]
        r["speedup_vs_teacher"] = baseline[b] / r["median_s_per_image"] if b in baseline else None
        r["denoise_speedup_vs_teacher"] = baseline_denoise[b] / r["denoise_s_per_image"] if b in baseline else None


def one_step_speedups(rows: list[dict], configs: dict[str, object]) -> dict:
    """Speedup at batch 1 of each one-step model (or the stand-in) over the teacher@25+CFG."""
    at_b1 = [r for r in rows if r["batch_size"] == 1 and r["steps"] == 1 and r["role"] in ("student", "stand-in")]
    at_b1 = [r for r in at_b1 if r["role"] == "stand-in" or configs[r["model"]].default_steps == 1]
    one_step = {r["model"]: r for r in at_b1 if not r["tiny_decoder"]}
    tiny = {r["model"]: r["speedup_vs_teacher"] for r in at_b1 if r["tiny_decoder"]}
    if not one_step:
        return {"one_step_speedup_vs_teacher": None, "one_step_models": {}, "one_step_note": "no one-step model at batch 1"}
    per_model = {name: r["speedup_vs_teacher"] for name, r in one_step.items()}
    stand_in = any(r["role"] == "stand-in" for r in one_step.values())
    return {
        "one_step_speedup_vs_teacher": min(per_model.values()),
        "one_step_models": per_model,
        "one_step_tiny_decoder_speedup_vs_teacher": tiny or None,
        "one_step_denoise_speedup_vs_teacher": {n: r["denoise_speedup_vs_teacher"] for n, r in one_step.items()},
        "one_step_note": (
            "no shipped one-step model: the teacher at 1 step without CFG stands in (same architecture and cost)"
            if stand_in
            else "smallest over the one-step models (default_steps == 1), batch 1, same run"
        ),
    }


def plot_latency(rows: list[dict], path: Path) -> bool:
    """Seconds per image against batch size, one line per (model, steps); the baseline dashed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault((r["model"], r["steps"], r["role"], r["tiny_decoder"]), []).append(r)
    for (model, steps, role, tiny), points in lines.items():
        points.sort(key=lambda r: r["batch_size"])
        label = f"{model} {steps} step{'s' if steps > 1 else ''}" + (" + CFG (baseline)" if role == "baseline" else "")
        label += " + tiny decoder" if tiny else ""
        ax.plot(
            [p["batch_size"] for p in points], [p["median_s_per_image"] for p in points],
            marker="o", linestyle="--" if role == "baseline" else "-", label=label,
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("seconds per image (median)")
    ax.set_title("in-process latency (Engine.generate)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


TABLE_COLUMNS = [
    ("model", "model", ""),
    ("steps", "steps", ""),
    ("guidance_scale", "cfg", ".1f"),
    ("tiny", "tiny dec", ""),
    ("batch_size", "batch", ""),
    ("median_s_per_image", "median s/img", ".4f"),
    ("p90_s_per_image", "p90 s/img", ".4f"),
    ("encode_s_per_image", "encode", ".4f"),
    ("denoise_s_per_image", "denoise", ".4f"),
    ("decode_s_per_image", "decode", ".4f"),
    ("unet_evals_per_image", "UNet evals", ""),
    ("images_per_s", "img/s", ".1f"),
    ("speedup_vs_teacher", "x teacher", ".1f"),
]


def run(
    models: dict[str, Path],
    *,
    teacher: str = TEACHER,
    teacher_steps: int = TEACHER_STEPS,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    budget: TimingBudget | None = None,
    models_root: Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    attention_backend: str | None = None,
    name: str = "latency",
    out_dir: Path = RESULTS_DIR,
) -> dict:
    """Time every scenario of `models` (name -> folder); write <out_dir>/<name>.json and .png; return the report."""
    budget = budget or TimingBudget()
    import torch

    from flashstep.models.engine import Engine
    from flashstep.models.flashstep_config import FlashstepConfig

    configs = {n: FlashstepConfig.load(p) for n, p in models.items()}
    tiny_decoders = frozenset(n for n, p in models.items() if (Path(p) / "vae_tiny").is_dir())
    plan = scenarios(configs, teacher, teacher_steps, batch_sizes, tiny_decoders)
    settings = {
        "models": {n: str(p) for n, p in models.items()},
        "teacher": teacher,
        "teacher_steps": teacher_steps,
        "batch_sizes": list(batch_sizes),
        "budget": asdict(budget),
        "device": device,
        "dtype": dtype,
        "attention_backend": attention_backend,
        "torch_threads": torch.get_num_threads(),
        "timed": "Engine.generate wall time per call / batch size; unique prompts; one warm-up call per configuration",
    }
    report = new_report(name, settings, device=device)
    rows = []
    for model in dict.fromkeys(s.model for s in plan):
        engine = Engine.load(
            models[model], name=model, models_root=models_root, device=device, dtype=dtype,
            attention_backend=attention_backend,
        )  # fmt: skip
        prompts = PromptStream()
        for scenario in (s for s in plan if s.model == model):
            print(f"timing {scenario.model} steps={scenario.steps} batch={scenario.batch_size} ...", flush=True)
            rows.append({**measure(engine, scenario, budget, prompts), "version": engine.version})
        engine.close()
    add_ratios(rows)
    report["figures"] = {"rows": rows, **one_step_speedups(rows, configs)}
    report["targets"] = {"one_step_speedup_vs_teacher": f">= {ONE_STEP_TARGET:g}"}
    speedup = report["figures"]["one_step_speedup_vs_teacher"]
    report["targets_met"] = {"one_step_speedup_vs_teacher": None if speedup is None else speedup >= ONE_STEP_TARGET}
    table = [{**r, "tiny": "yes" if r["tiny_decoder"] else ""} for r in rows]
    print_table(table, TABLE_COLUMNS, title=f"\nin-process latency ({device}, {torch.get_num_threads()} threads)")
    print(f"one_step_speedup_vs_teacher = {speedup if speedup is None else round(speedup, 2)} "
          f"({report['figures']['one_step_note']})", flush=True)  # fmt: skip
    path = write_report(report, out_dir / f"{name}.json")
    print(f"wrote {path}")
    png = path.with_suffix(".png")
    if plot_latency(rows, png):
        print(f"wrote {png}")
    return report


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers but is {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive integers but is {text!r}")
    return values


def select_models(names: str | None, models_root: Path | None) -> dict[str, Path]:
    """name -> folder of the models to time: all discovered ones, or the comma-separated `names`."""
    from flashstep.models.registry import discover

    found = discover(models_root)
    if not names:
        return found
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise SystemExit(f"--models names {missing} which are not among the known models {sorted(found)}")
    return {n: found[n] for n in wanted}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("--models", default=None, help="comma-separated model names (default: every discovered model)")
    add("--models-root", type=Path, default=None, help="folder whose sub-folders are models, besides the shipped ones")
    add("--teacher", default=TEACHER, help=f"the baseline model (default {TEACHER})")
    add("--teacher-steps", type=int, default=TEACHER_STEPS, help=f"baseline steps, with CFG (default {TEACHER_STEPS})")
    add("--batch-sizes", type=parse_ints, default=BATCH_SIZES, help="comma-separated images per generate call to time (default 1,4,16)")
    add("--min-calls", type=int, default=TimingBudget.min_calls, help="timed calls per configuration, at least")
    add("--seconds", type=float, default=TimingBudget.seconds, help="timed seconds per configuration, at least")
    add("--max-calls", type=int, default=TimingBudget.max_calls, help="timed calls per configuration, at most")
    add("--device", default="cpu", help="torch device the models run on, e.g. cuda:0 (default cpu)")
    add("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="weights dtype (default: the engine's for the device)")
    add("--attention-backend", default=None, help="attention backend: sdpa, triton, xformers or math (default: kernels' choice)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--name", default="latency", help="results file name (bench/results/<name>.json)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="folder the JSON results and plot are written to")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="flashstep bench latency", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    models = select_models(args.models, args.models_root)
    if args.teacher not in models:
        parser.error(f"--teacher {args.teacher!r} must be among the timed models {sorted(models)}")
    run(
        models,
        teacher=args.teacher,
        teacher_steps=args.teacher_steps,
        batch_sizes=args.batch_sizes,
        budget=TimingBudget(args.min_calls, args.seconds, args.max_calls),
        models_root=args.models_root,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        name=args.name,
        out_dir=args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
