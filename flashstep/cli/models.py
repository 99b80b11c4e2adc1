"""`flashstep models`: the models the registry finds, with family and step counts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list available models")
    m.add_argument("--models-root", type=Path, default=None, help="folder whose sub-folders are models")
    m.add_argument("--names", action="store_true", help="one name a line")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashstep.models.errors import CheckpointError
    from flashstep.models.flashstep_config import FlashstepConfig
    from flashstep.models.registry import discover

    found = discover(args.models_root)
    if args.names:
        print("\n".join(sorted(found)))
        return 0
    print(f"{'name':24} {'family':11} {'steps':18} {'default':>7}  path")
    for name, path in sorted(found.items()):
        try:
            cfg = FlashstepConfig.load(path)
            family, steps, default = cfg.family, ",".join(map(str, cfg.allowed_steps)), str(cfg.default_steps)
        except CheckpointError:  # e.g. a public folder without flashstep.json: listed, family unknown
            family, steps, default = "?", "-", "-"
        print(f"{name:24} {family:11} {steps:18} {default:>7}  {path}")
    return 0
