"""`flashstep eval`: ShapesBench on one model: adherence, FD, diversity, negative efficacy, cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashstep.cli.options import add_model_options


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="ShapesBench: adherence, FD, diversity, negative efficacy, cost")
    add_model_options(e)
    e.add_argument("--prompts", required=True, help="prompt file: text (one a line, # comments) or JSONL")
    e.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    e.add_argument("--first-seed", type=int, default=0,
                   help="first seed of each prompt's range; a fresh range checks a choice made on another")
    e.add_argument("--batch-size", type=int, default=32, help="images per engine call")
    e.add_argument("--json", default=None, help="write the report here")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashstep.training.evaluate import EvalOptions, evaluate_model, print_report

    try:
        opts = EvalOptions(
            model=args.model,
            models_root=args.models_root,
            family=args.family,
            prompts=Path(args.prompts),
            seeds=args.seeds,
            first_seed=args.first_seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            nasa_alpha=args.nasa_alpha,
            hybrid=args.hybrid,
            batch_size=args.batch_size,
        )
    except ValueError as err:
        raise SystemExit(f"flashstep eval: {err}") from err
    report = evaluate_model(opts)
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
