"""The `shapes` world: a deterministic renderer and caption sampler (see shared/DESIGN.md).

Every image is 64x64 RGB with one object described by five attributes. Quality of any model
trained on this world can be measured exactly by the judge (`training/judge.py`), which is why
flashstep ships it as its embedded default: no model hub is reachable from where it runs.

Five (shape, color) pairs are held out of every training scene, not only of the captions, so a
model that draws a purple star has composed it rather than remembered it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges like a real photo's

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("white", "black", "gray")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("star", "purple"), ("triangle", "orange"), ("square", "cyan"), ("circle", "pink"), ("diamond", "yellow")}
)

COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 165, 55),
    "blue": (35, 65, 225),
    "yellow": (240, 220, 30),
    "purple": (135, 40, 180),
    "orange": (250, 135, 20),
    "pink": (250, 135, 195),
    "cyan": (30, 210, 225),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

# Object centre per position and radius range per size, in 64-px image coordinates.
_OFFSET = 17
POSITION_XY = {
    "left": (32 - _OFFSET, 32),
    "right": (32 + _OFFSET, 32),
    "top": (32, 32 - _OFFSET),
    "bottom": (32, 32 + _OFFSET),
    "center": (32, 32),
}
SIZE_RADIUS = {"small": (6.0, 8.0), "large": (12.0, 14.0)}
_POSITION_JITTER = 2.5
_ROTATION_JITTER_DEG = 12.0

POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# How often a training caption names each attribute. The shape is named most of the time;
# attributes left out are drawn uniformly, which is the spread the diversity metric reads.
MENTION_PROB = {"shape": 0.85, "color": 0.7, "size": 0.45, "position": 0.5, "background": 0.45}


@dataclass(frozen=True)
class Scene:
    """One object on a background: the five attributes plus the render jitter."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    radius: float = 10.0
    rotation: float = 0.0

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)


def is_held_out(shape: str, color: str) -> bool:
    return (shape, color) in HELD_OUT_PAIRS


def sample_scene(
    rng: np.random.Generator, fixed: dict[str, str] | None = None, allow_held_out: bool = False
) -> Scene:
    """Draw a scene; attributes in `fixed` are kept, the rest are uniform.

    Unless `allow_held_out`, (shape, color) pairs in HELD_OUT_PAIRS are redrawn, so training
    data never contains them. Eval references pass `allow_held_out=True`.
    """
    fixed = dict(fixed or {})
    for name, value in fixed.items():
        if name not in ATTRIBUTES or value not in ATTRIBUTES[name]:
            raise ValueError(f"`{name}` must be one of {ATTRIBUTES.get(name)} but is {value!r}")
    if not allow_held_out and "shape" in fixed and "color" in fixed and is_held_out(fixed["shape"], fixed["color"]):
        raise ValueError(f"({fixed['shape']}, {fixed['color']}) is held out of training scenes")
    while True:
        attrs = {
            name: fixed[name] if name in fixed else values[rng.integers(len(values))]
            for name, values in ATTRIBUTES.items()
        }
        if allow_held_out or not is_held_out(attrs["shape"], attrs["color"]):
            break
    lo, hi = SIZE_RADIUS[attrs["size"]]
    return Scene(
        **attrs,
        dx=float(rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)),
        dy=float(rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)),
        radius=float(rng.uniform(lo, hi)),
        rotation=float(rng.uniform(-_ROTATION_JITTER_DEG, _ROTATION_JITTER_DEG)),
    )


def _polygon(shape: str, cx: float, cy: float, r: float, rotation_deg: float) -> list[tuple[float, float]]:
    """Vertices of the shape (not used for circles), rotated about its centre."""
    if shape == "square":
        s = r * 0.85  # half-side: a square of equal area-ish to the circle reads as the same size
        base = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        base = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        base = [(x, y + r * 0.15) for x, y in base]  # centre the triangle's bounding box
    elif shape == "diamond":
        base = [(0.0, -r), (r * 0.62, 0.0), (0.0, r), (-r * 0.62, 0.0)]
    elif shape == "star":
        base = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            base.append((rr * math.cos(a), rr * math.sin(a)))
    else:
        raise ValueError(f"`shape` must be one of {SHAPES} but is {shape!r}")
    t = math.radians(rotation_deg)
    c, s_ = math.cos(t), math.sin(t)
    return [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in base]


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a (64, 64, 3) uint8 array. Deterministic in the scene."""
    k = _SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(big)
    bx, by = POSITION_XY[scene.position]
    cx, cy, r = (bx + scene.dx) * k, (by + scene.dy) * k, scene.radius * k
    fill = COLOR_RGB[scene.color]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r, scene.rotation), fill=fill)
    return np.asarray(big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.uint8)


def render_seed(seed: int, fixed: dict[str, str] | None = None, allow_held_out: bool = False) -> tuple[Scene, np.ndarray]:
    """Scene and image for one seed: the same seed always gives the same pixels."""
    scene = sample_scene(np.random.default_rng(seed), fixed, allow_held_out)
    return scene, render(scene)


# ---------------------------------------------------------------------------------------------
# Captions


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def caption_for(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """Plain-English caption naming exactly the attributes in `attrs` (a subset of the five).

    Templates vary the article, the background phrasing and the order, e.g. "a large red circle
    on the left, white background", "red circle", "a star on a black background".
    """
    words = [attrs[a] for a in ("size", "color") if a in attrs]
    words.append(attrs.get("shape", "shape"))
    noun = " ".join(words)
    if "shape" not in attrs and not words[:-1] and rng.random() < 0.5:
        noun = "object"
    use_article = rng.random() < 0.8 or "shape" not in attrs
    text = f"{_article(noun)} {noun}" if use_article else noun
    if "position" in attrs:
        text += " " + POSITION_PHRASE[attrs["position"]]
    if "background" in attrs:
        bg = attrs["background"]
        text += f", {bg} background" if rng.random() < 0.5 else f" on a {bg} background"
    return text


def sample_caption_subset(rng: np.random.Generator) -> list[str]:
    return [name for name in ATTRIBUTES if rng.random() < MENTION_PROB[name]]


def random_caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    """A caption naming a random subset of a scene's attributes (possibly none: "a shape")."""
    named = sample_caption_subset(rng)
    return caption_for({a: attrs[a] for a in named}, rng)


def sample_training_example(seed: int) -> tuple[Scene, str]:
    """A training pair: a (non held-out) scene and a caption naming a random subset of it."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    return scene, random_caption(scene.attributes(), rng)


# ---------------------------------------------------------------------------------------------
# Parsing prompts back into attributes

_WORD = re.compile(r"[a-z]+")
_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center", "big": "large", "little": "small"}


def parse_prompt(prompt: str) -> dict[str, str]:
    """Which attribute values a prompt names, read with the world's vocabulary.

    "a small blue square at the top" -> {size: small, color: blue, shape: square, position: top}.
    White, black and gray are background words (no object has those colours). A word naming two
    values of one attribute keeps the first, as a reader would.
    """
    found: dict[str, str] = {}
    for raw in _WORD.findall(prompt.lower()):
        word = _SYNONYMS.get(raw, raw)
        if word.endswith("s") and word[:-1] in SHAPES:
            word = word[:-1]
        for name, values in ATTRIBUTES.items():
            if word in values and name not in found:
                found[name] = word
    return found
