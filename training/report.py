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

The same results also render the README's table of shipped models (`models_table`), which
`update_markdown` writes between marker comments, so the README and docs/shapesbench.md always
show what the checked-in `reports/shapesbench.json` says:

    python -m flashstep.training.report --update README.md docs/shapesbench.md
    python -m flashstep.training.report --check README.md docs/shapesbench.md   # exit 1 when stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from flashstep.training.evaluate import EvalOptions, evaluate_model
from flashstep.training.prompts import PROMPTS_DIR

REPORT_DIR = Path(__file__).resolve().parent / "reports"
REPORT_JSON = REPORT_DIR / "shapesbench.json"
REPORT_COMMAND = "flashstep report --seeds {seeds}"
UPDATE_COMMAND = "python -m flashstep.training.report --update"

def made_by(model: str, models_root: Path | None = None) -> str:
    """What produced `model`, as its flashstep.json `provenance.summary` says ("" when absent)."""
    from flashstep.models.errors import ModelNotFoundError
    from flashstep.models.flashstep_config import FlashstepConfig
    from flashstep.models.registry import resolve

    try:
        folder = resolve(model, models_root)
    except ModelNotFoundError:  # a row for a model not installed here
        return ""
    return str(FlashstepConfig.load(folder).provenance.get("summary", ""))


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
    from flashstep.models.engine import load_engine
    from flashstep.models.registry import discover

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


def load_results(path: Path = REPORT_JSON) -> list[dict]:
    """The rows of a written report (`shapesbench.json`), as `run_report` returned them."""
    return json.loads(Path(path).read_text())


def report_seeds(results: list[dict]) -> int:
    """Seeds per prompt of a report; every evaluated row of one report uses the same count."""
    seeds = {r["seeds_per_prompt"] for r in results if not r.get("missing")}
    if len(seeds) != 1:
        raise ValueError(f"a report's rows must share one seed count but have {sorted(seeds)}")
    return seeds.pop()


def models_table(results: list[dict]) -> str:
    """The README's table of shipped models: one row per evaluated step count of each model.

    Model, family and what made it are written on a model's first row only; a model of the
    report that is not installed reads "not installed".
    """
    seeds = report_seeds(results)
    lines = [
        "| model | family | made by | steps | UNet evals | adherence seen | adherence held-out | FD "
        "| diversity | s/image |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    named: set[str] = set()
    for r in results:
        if r["row"]["section"] != "quality":
            continue
        model = r["row"]["model"]
        first = model not in named
        named.add(model)
        head = f"| `{model}` | {r.get('family', '')} | {made_by(model)} " if first else "| | | "
        if r.get("missing"):
            lines.append(head + f"| {r['row']['steps']} | not installed | | | | | |")
            continue
        lines.append(
            head + f"| {r['row']['steps']} | {r['unet_evals_per_image']} | {_f(r['adherence'])} "
            f"| {_f(r['adherence_heldout'])} | {_f(r['fd'], 0)} | {_f(r['diversity'])} "
            f"| {_f(r['seconds_per_image'], 4)} |"
        )
    lines += [
        "",
        f"ShapesBench on `shapesbench.jsonl`, {seeds} seeds a prompt, 2-core CPU: "
        f"`{REPORT_COMMAND.format(seeds=seeds)}` wrote `training/reports/shapesbench.json`, and "
        f"`{UPDATE_COMMAND} README.md` rendered this table from it.",
    ]
    return "\n".join(lines) + "\n"


def shapesbench_tables(results: list[dict]) -> str:
    """The report's three tables (quality, NASA, hybrid), as `shapesbench.md` has them."""
    return markdown(results, report_seeds(results))


# Marker name -> what fills it. A file may hold any of these blocks.
BLOCKS = {"models-table": models_table, "shapesbench-tables": shapesbench_tables}


def fill_block(text: str, name: str, body: str) -> str:
    """`text` with the lines between `<!-- name:start -->` and `<!-- name:end -->` replaced by `body`."""
    pattern = re.compile(rf"(<!-- {re.escape(name)}:start -->\n)(.*?)(<!-- {re.escape(name)}:end -->)", re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no `<!-- {name}:start -->` ... `<!-- {name}:end -->` block")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def render_markdown(text: str, results: list[dict]) -> str:
    """`text` with every known block it holds (see `BLOCKS`) filled from `results`."""
    for name, render in BLOCKS.items():
        if f"<!-- {name}:start -->" in text:
            text = fill_block(text, name, render(results))
    return text


def update_markdown(path: Path, results: list[dict] | None = None, *, check: bool = False) -> bool:
    """Fill the blocks of the markdown file at `path` from the report; True when it was stale.

    With `check`, the file is left as it is (a caller fails on True).
    """
    path = Path(path)
    text = path.read_text()
    new = render_markdown(text, load_results() if results is None else results)
    if new != text and not check:
        path.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    """`python -m flashstep.training.report --update FILE...` (or `--check FILE...`)."""
    parser = argparse.ArgumentParser(
        prog="python -m flashstep.training.report",
        description="Write the checked-in ShapesBench report's tables into markdown files between marker comments.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--update", nargs="+", type=Path, metavar="FILE", help="fill the blocks of these files")
    action.add_argument("--check", nargs="+", type=Path, metavar="FILE", help="exit 1 if any block is stale")
    parser.add_argument("--report", type=Path, default=REPORT_JSON, help="shapesbench.json to render from")
    args = parser.parse_args(argv)
    results = load_results(args.report)
    stale = [str(p) for p in (args.update or args.check) if update_markdown(p, results, check=bool(args.check))]
    if stale:
        print(("stale: " if args.check else "updated: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
