"""Flags more than one command shares."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_RUNS = Path(os.environ.get("FLASHSTEP_RUNS", "runs"))


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Which model to run and how to sample it: `generate` and `eval`."""
    p.add_argument("--model", default="shapes-teacher", help="shipped model name, a name under --models-root, or a folder")
    p.add_argument("--models-root", type=Path, default=None, help="folder whose sub-folders are models")
    p.add_argument("--family", default=None, help="generator family for a folder without flashstep.json")
    p.add_argument("--steps", type=int, default=None, help="sampling steps: UNet evaluations per image (default: the model's own)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's own)")
    p.add_argument("--nasa-alpha", type=float, default=None, help="NASA negative-attention strength")
    p.add_argument("--hybrid", action="store_true", help="base model takes the first step (diversity hybrid)")
    p.add_argument("--tiny-decoder", action="store_true", help="decode with the folder's AutoencoderTiny")
