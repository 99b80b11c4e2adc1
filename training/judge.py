"""The ShapesBench judge: a small CNN that reads the five attributes of a 64x64 image.

It plays the role CLIP/Inception play for real images: one head per attribute gives adherence
and diversity, and its penultimate features give the Frechet distance. It is trained on renders
of every (shape, color) pair, held-out ones included, with mild noise and blur so that it reads
decoded model outputs as reliably as clean renders.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from training.data import render_dataset
from training.shapes import ATTRIBUTES

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


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and blur of the strength a VAE decode adds, so the judge is not fooled by them."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.12
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16
        kernel = kernel.expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return x.clamp(-1.2, 1.2)


@dataclass(frozen=True)
class JudgeTrainConfig:
    steps: int = 3000
    batch_size: int = 96
    lr: float = 2e-3
    n_train: int = 60000
    seed: int = 1000
    n_eval: int = 5000
    eval_seed: int = 10_000_000


def evaluate_judge(judge: Judge, n: int, seed: int) -> dict[str, float]:
    """Per-attribute accuracy on `n` fresh renders (seeds never used in training)."""
    data = render_dataset(n, seed, allow_held_out=True, progress=False)
    x, labels, _ = data.batch(np.arange(n))
    _, preds = judge.read(x)
    return {name: float((preds[name] == labels[:, i].numpy()).mean()) for i, name in enumerate(ATTRIBUTES)}


def train_judge(cfg: JudgeTrainConfig, out: str | Path, progress: bool = True) -> dict:
    """Train on renders of every pair, save to `out`, return accuracies and wall time."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = render_dataset(cfg.n_train, cfg.seed, allow_held_out=True, progress=progress)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="judge", disable=not progress, mininterval=5.0)
    for _ in bar:
        x, labels, _ = data.batch(rng.integers(0, len(data), cfg.batch_size))
        _, logits = judge(augment(x, gen))
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits.values()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    judge.eval()
    judge.save(out)
    accuracy = evaluate_judge(judge, cfg.n_eval, cfg.eval_seed)
    report = {"accuracy": accuracy, "seconds": time.time() - t0, "config": asdict(cfg)}
    (Path(out) / "judge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
