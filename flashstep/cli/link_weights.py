"""`flashstep link-weights`: replace duplicate weight files by relative symlinks."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    w = sub.add_parser("link-weights", help="replace weight files that duplicate another (a student's copy of the teacher's VAE) by relative symlinks")
    w.add_argument("--root", type=Path, default=None, help="models root (default: the shipped models)")
    w.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashstep.models.registry import SHIPPED_MODELS_DIR
    from flashstep.training.shared_weights import link_identical_weights, unique_weight_bytes

    root = args.root or SHIPPED_MODELS_DIR
    for link, target in link_identical_weights(root):
        print(f"{link.relative_to(root)} -> {target.relative_to(root)}")
    print(f"{unique_weight_bytes(root):,} bytes of distinct weights under {root}")
    return 0
