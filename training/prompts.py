"""Prompt files and the ShapesBench prompt sets.

A prompt file is plain text, one prompt a line (`#` starts a comment), or JSONL whose objects
carry `prompt` and optionally `negative_prompt`. The sets shipped in `training/prompts/` are
written by `write_prompt_sets` from fixed seeds, so they are reproducible and reviewable:
- seen: captions of training-distribution scenes (no held-out pair);
- heldout: the five held-out (shape, color) pairs in several templates;
- diversity: prompts that leave most attributes out, for the diversity metric;
- negative: a positive prompt and a negative naming one value to avoid (NASA).
`shapesbench.jsonl` is the three positive sets together, what README figures come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashstep.training.shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    caption_for,
    sample_scene,
)

PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str | None = None


def load_prompts(path: str | Path) -> list[PromptSpec]:
    """Read a text or JSONL prompt file; errors name the line that is wrong."""
    path = Path(path)
    specs: list[PromptSpec] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: a JSONL line needs a string `prompt`")
            specs.append(PromptSpec(obj["prompt"], obj.get("negative_prompt")))
        else:
            specs.append(PromptSpec(line))
    if not specs:
        raise ValueError(f"{path} holds no prompts")
    return specs


def _seen(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        attrs = sample_scene(rng).attributes()  # never a held-out pair
        # Name the shape and colour always, two or three of the rest at random.
        rest = [a for a in ("size", "position", "background") if rng.random() < 0.6]
        named = {a: attrs[a] for a in ("shape", "color", *rest)}
        text = caption_for(named, rng)
        if text not in out:
            out.append(text)
    return out


def _heldout(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for shape, color in sorted(HELD_OUT_PAIRS):
        out.append(caption_for({"shape": shape, "color": color}, rng))
        out.append(caption_for({"shape": shape, "color": color, "background": BACKGROUNDS[rng.integers(3)]}, rng))
        out.append(
            caption_for(
                {"shape": shape, "color": color, "size": SIZES[rng.integers(2)], "position": POSITIONS[rng.integers(5)]},
                rng,
            )
        )
    return out


def _diversity(seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = [caption_for({"shape": s}, rng) for s in SHAPES]
    out += [caption_for({"color": c}, rng) for c in ("red", "blue", "green")]
    out += [caption_for({"shape": s, "background": b}, rng) for s, b in (("star", "black"), ("square", "white"))]
    out += [caption_for({"shape": s, "color": c}, rng) for s, c in (("circle", "green"), ("triangle", "blue"))]
    return out


def _negative(seed: int) -> list[PromptSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for shape in SHAPES:
        for color in rng.choice(COLORS, size=2, replace=False):
            specs.append(PromptSpec(caption_for({"shape": shape}, rng), str(color)))
    specs.append(PromptSpec("a red shape", "circle"))
    specs.append(PromptSpec("a blue shape", "square"))
    specs.append(PromptSpec("a circle", "black background"))
    specs.append(PromptSpec("a star", "white background"))
    return specs


def prompt_sets() -> dict[str, list[PromptSpec]]:
    return {
        "seen": [PromptSpec(p) for p in _seen(48, seed=11)],
        "heldout": [PromptSpec(p) for p in _heldout(seed=12)],
        "diversity": [PromptSpec(p) for p in _diversity(seed=13)],
        "negative": _negative(seed=14),
    }


def write_prompt_sets(folder: str | Path = PROMPTS_DIR) -> dict[str, Path]:
    """Write every set as JSONL (plus the combined ShapesBench file) and return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = prompt_sets()
    sets["shapesbench"] = sets["seen"] + sets["heldout"] + sets["diversity"]
    paths = {}
    for name, specs in sets.items():
        lines = [json.dumps({k: v for k, v in vars(s).items() if v is not None}) for s in specs]
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths[name] = path
    return paths
