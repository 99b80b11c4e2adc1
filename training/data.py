"""Rendered datasets of the shapes world, cached in memory as uint8 arrays.

Rendering costs about 0.7 ms an image, so every training stage renders its set once (tens of
thousands of images, a few hundred MB at most) and then samples batches from memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from flashstep.training.shapes import (
    ATTRIBUTES,
    random_caption,
    render,
    sample_scene,
    sample_training_example,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


@dataclass
class ShapesDataset:
    """`images` (N, 64, 64, 3) uint8, `labels` (N, 5) attribute indices, `captions` N strings."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Images as float (B, 3, 64, 64) in [-1, 1], labels (B, 5), captions."""
        x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x, torch.from_numpy(self.labels[idx]), [self.captions[i] for i in idx]


def encode_labels(attrs: dict[str, str]) -> list[int]:
    return [values.index(attrs[name]) for name, values in ATTRIBUTES.items()]


def render_dataset(n: int, seed: int, allow_held_out: bool = False, progress: bool = True) -> ShapesDataset:
    """N training examples from seeds seed..seed+n-1 (captions name random attribute subsets).

    `allow_held_out=True` draws scenes uniformly over every (shape, color) pair, as the judge
    needs; its captions are then empty because no model trains on them.
    """
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    labels = np.empty((n, len(ATTRIBUTES)), dtype=np.int64)
    captions: list[str] = []
    for i in tqdm(range(n), desc="render", disable=not progress, mininterval=2.0):
        if allow_held_out:
            scene = sample_scene(np.random.default_rng(seed + i), allow_held_out=True)
            caption = ""
        else:
            scene, caption = sample_training_example(seed + i)
        images[i] = render(scene)
        labels[i] = encode_labels(scene.attributes())
        captions.append(caption)
    return ShapesDataset(images, labels, captions)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Scaled posterior means (N, 4, 8, 8) of uint8 images (N, 64, 64, 3): the UNet's data."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode", disable=not progress, mininterval=5.0):
        x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def captions_for_labels(labels: np.ndarray, rng: np.random.Generator, dropout: float) -> list[str]:
    """A fresh random caption per row of attribute indices; `dropout` of them empty."""
    names = list(ATTRIBUTES)
    captions = []
    for row in labels:
        if rng.random() < dropout:
            captions.append("")
        else:
            attrs = {name: ATTRIBUTES[name][int(i)] for name, i in zip(names, row, strict=True)}
            captions.append(random_caption(attrs, rng))
    return captions
