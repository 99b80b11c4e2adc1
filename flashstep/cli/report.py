"""`flashstep report`: the ShapesBench table of every shipped generator."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="ShapesBench table of every shipped generator (README figures)")
    r.add_argument("--seeds", type=int, default=8, help="seeds per prompt; fewer read diversity low and FD high")
    r.add_argument("--models-root", type=Path, default=None, help="folder whose sub-folders are models")
    r.add_argument("--out", default=None, help="folder for shapesbench.json/.md (default: training/reports)")
    r.add_argument("--markdown", nargs="+", type=Path, default=(), metavar="FILE",
                   help="then fill the generated-table blocks of these files (e.g. README.md docs/shapesbench.md)")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashstep.training.report import REPORT_DIR, run_report, update_markdown

    results = run_report(seeds=args.seeds, models_root=args.models_root, out=Path(args.out or REPORT_DIR))
    for path in args.markdown:
        update_markdown(path, results)
    return 0
