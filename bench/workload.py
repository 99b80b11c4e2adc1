"""The work every benchmark sends: unique shapes-world prompts, seeds, and the one request body.

Prompts are unique across a run (1,200 full captions of the shapes world, shuffled once with a
fixed seed), so no server answers from a prompt cache that the others lack: every image pays its
text encoding. The request body is flashstep's `POST /generate` body, which every peer in
bench/peers accepts too, so all servers do the same work per image: same checkpoint, steps,
guidance, size, seed, and a PNG back.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass

SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
BACKGROUNDS = ("white", "black", "gray")
PROMPT_SEED = 20240607
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@functools.cache
def unique_prompts() -> tuple[str, ...]:
    """Every full caption of the shapes world ("a large red circle on the left, white background"), shuffled."""
    prompts = [
        f"{_article(size)} {size} {color} {shape} {position}, {background} background"
        for size, color, shape, position, background in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)
    ]
    random.Random(PROMPT_SEED).shuffle(prompts)
    return tuple(prompts)


@dataclass(frozen=True)
class Workload:
    """What each image asks for. `guidance_scale` 0 turns CFG off in flashstep and in diffusers alike."""

    steps: int
    guidance_scale: float
    resolution: int

    def body(self, index: int) -> dict:
        """The JSON body of request number `index`: its own prompt and seed."""
        prompts = unique_prompts()
        return {
            "prompt": prompts[index % len(prompts)],
            "seed": index,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.resolution,
            "width": self.resolution,
            "output_format": "png",
        }

