"""The ShapesBench judge: a small CNN that reads the five attributes of a 64x64 image.

It plays the role CLIP/Inception play for real images: one head per attribute gives adherence
and diversity, and its penultimate features give the Frechet distance. It is trained on renders
of every (shape, color) pair, held-out ones included, with mild noise and blur so that it reads
decoded model outputs as reliably as clean renders (`flashstep train judge`, `training/recipes/judge.py`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flashstep.training.shapes import ATTRIBUTES

JUDGE_DIR = Path(__file__).parent / "assets"
JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"


@dataclass(frozen=True)
class JudgeConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128


class Judge(nn.Module):
    """Conv stack (64 -> 8 px) flattened to keep where the object is, then one head per attribute."""

    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = 3
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.features = nn.Sequential(
            nn.Conv2d(c_in, 32, 1), nn.SiLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, config.feature_dim), nn.SiLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(config.feature_dim, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, 3, 64, 64) in [-1, 1] -> features (B, feature_dim), logits per attribute."""
        f = self.features(self.conv(x))
        return f, {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Features (N, feature_dim) and predicted attribute indices for images in [-1, 1]."""
        feats, preds = [], {name: [] for name in ATTRIBUTES}
        for chunk in images.split(batch_size):
            f, logits = self(chunk.float())
            feats.append(f.numpy())
            for name, lg in logits.items():
                preds[name].append(lg.argmax(-1).numpy())
        return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / JUDGE_WEIGHTS))
        (folder / JUDGE_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path = JUDGE_DIR) -> Judge:
        folder = Path(folder)
        cfg = json.loads((folder / JUDGE_CONFIG).read_text())
        judge = cls(JudgeConfig(channels=tuple(cfg["channels"]), feature_dim=cfg["feature_dim"]))
        judge.load_state_dict(load_file(str(folder / JUDGE_WEIGHTS)))
        return judge.eval()
