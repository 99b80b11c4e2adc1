"""`flashstep report`: the ShapesBench table of every shipped generator, in one command.

Each row is one `flashstep eval` (same prompt files, seeds and judge), so a row can be
re-run alone with the flags it names. Rows whose model is not installed are listed as missing
rather than silently dropped. Three sections, as the distillation issue asks:

- quality: adherence (seen / held-out), FD, diversity and cost on `shapesbench.jsonl`, for the
  teacher at 25 steps with CFG, the teacher at 1/2/4 steps (the naive few-step baseline) and
  every student at its step counts;
- NASA: negative efficacy and positive adherence kept, on `negative.jsonl`, for each one-step
  model with its own `nasa_alpha` (and the teacher, where the negative is also the CFG uncond);
- hybrid: diversity when the teacher takes the first step of a few-step student.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from training.evaluate import EvalOptions, evaluate_model
from training.prompts import PROMPTS_DIR

REPORT_DIR = Path(__file__).resolve().parent / "reports"


@dataclass(frozen=True)
class Row:
    section: str  # "quality", "nasa" or "hybrid"
    model: str
    steps: int | None = None
    hybrid: bool = False
    prompts: str = "shapesbench.jsonl"

    @property
    def label(self) -> str:
        steps = f"@{self.steps}" if self.steps else ""
        return f"{self.model}{steps}{' hybrid' if self.hybrid else ''}"

    @property
    def command(self) -> str:
        flags = f" --steps {self.steps}" if self.steps else ""
        flags += " --hybrid" if self.hybrid else ""
        return f"flashstep eval --model {self.model} --prompts training/prompts/{self.prompts}{flags}"


ROWS: tuple[Row, ...] = (
    Row("quality", "shapes-teacher", 25),
    Row("quality", "shapes-teacher", 1),
    Row("quality", "shapes-teacher", 2),
    Row("quality", "shapes-teacher", 4),
    Row("quality", "shapes-swiftbrush", 1),
    Row("quality", "shapes-instaflow", 1),
    Row("quality", "shapes-2rf", 2),
    Row("quality", "shapes-2rf", 4),
    Row("quality", "shapes-hypersd", 1),
    Row("quality", "shapes-hypersd", 2),
    Row("quality", "shapes-hypersd", 4),
    Row("quality", "shapes-hypersd", 8),
    Row("quality", "shapes-hypersd-1step", 1),
    Row("nasa", "shapes-teacher", 25, prompts="negative.jsonl"),
    Row("nasa", "shapes-swiftbrush", 1, prompts="negative.jsonl"),
    Row("nasa", "shapes-instaflow", 1, prompts="negative.jsonl"),
    Row("nasa", "shapes-hypersd", 1, prompts="negative.jsonl"),
    Row("nasa", "shapes-hypersd-1step", 1, prompts="negative.jsonl"),
    Row("hybrid", "shapes-hypersd", 2, hybrid=True),
    Row("hybrid", "shapes-hypersd", 4, hybrid=True),
    Row("hybrid", "shapes-hypersd", 8, hybrid=True),
    Row("hybrid", "shapes-2rf", 2, hybrid=True),
)


def run_report(
    rows: tuple[Row, ...] = ROWS, seeds: int = 8, models_root: Path | None = None, out: Path | None = REPORT_DIR
) -> list[dict]:
    """Evaluate every row whose model is installed; write `shapesbench.json` and `.md` to `out`."""
    from models.registry import discover, load_engine

    installed = discover(models_root)
    engines: dict[str, object] = {}
    results = []
    for row in rows:
        entry = {"row": asdict(row), "label": row.label, "command": row.command}
        if row.model not in installed:
            results.append({**entry, "missing": True})
            continue
        engine = engines.get(row.model) or engines.setdefault(row.model, load_engine(row.model, models_root))
        opts = EvalOptions(
            model=row.model, prompts=PROMPTS_DIR / row.prompts, seeds=seeds, models_root=models_root,
            steps=row.steps, hybrid=row.hybrid,
        )  # fmt: skip
        report = evaluate_model(opts, engine=engine)
        report["nasa_alpha"] = engine.config.nasa_alpha
        results.append({**entry, **report})
        print(f"{row.label}: {_brief(report)}", flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "shapesbench.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "shapesbench.md").write_text(markdown(results, seeds))
    return results


def _brief(r: dict) -> str:
    keys = ("adherence", "adherence_heldout", "fd", "diversity", "negative_efficacy", "negative_adherence")
    return ", ".join(f"{k} {r[k]:.3f}" for k in keys if isinstance(r.get(k), float))


def _f(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _attributes(r: dict) -> str:
    """Per-attribute accuracy for the three attributes that decide adherence (size and background are ~1)."""
    acc = r.get("attribute_accuracy") or {}
    return " / ".join(_f(acc.get(name), 2) for name in ("shape", "color", "position"))


def markdown(results: list[dict], seeds: int) -> str:
    """The three tables, with the command that made them."""
    lines = [f"ShapesBench, {seeds} seeds per prompt (`flashstep report --seeds {seeds}`).", ""]
    lines += [
        "| model | UNet evals | s/image | adherence seen | adherence held-out | FD | diversity "
        "| shape / color / position drawn as named |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["row"]["section"] != "quality":
            continue
        if r.get("missing"):
            lines.append(f"| {r['label']} | not installed | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['unet_evals_per_image']} | {_f(r['seconds_per_image'], 4)} | {_f(r['adherence'])} "
            f"| {_f(r['adherence_heldout'])} | {_f(r['fd'], 0)} | {_f(r['diversity'])} | {_attributes(r)} |"
        )
    lines += [
        "",
        "| NASA (negative.jsonl) | alpha | efficacy | efficacy without negative | adherence kept | adherence without negative |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["row"]["section"] != "nasa" or r.get("missing"):
            continue
        lines.append(
            f"| {r['label']} | {r['nasa_alpha']} | {_f(r['negative_efficacy'])} | "
            f"{_f(r['negative_efficacy_without_negative'])} | {_f(r['negative_adherence'])} | "
            f"{_f(r['negative_adherence_without_negative'])} |"
        )
    quality = {(r["row"]["model"], r["row"]["steps"]): r for r in results
               if r["row"]["section"] == "quality" and not r.get("missing")}  # fmt: skip
    teacher = quality.get(("shapes-teacher", 25), {})
    lines += [
        "",
        "| hybrid (teacher takes step 1) | UNet evals | adherence seen | FD | diversity | diversity alone "
        "| teacher@25 diversity |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["row"]["section"] != "hybrid" or r.get("missing"):
            continue
        alone = quality.get((r["row"]["model"], r["row"]["steps"]), {})  # the same model and steps, no hybrid
        lines.append(
            f"| {r['label']} | {r['unet_evals_per_image']} | {_f(r['adherence'])} | {_f(r['fd'], 0)} | {_f(r['diversity'])} "
            f"| {_f(alone.get('diversity'))} | {_f(teacher.get('diversity'))} |"
        )
    return "\n".join(lines) + "\n"
