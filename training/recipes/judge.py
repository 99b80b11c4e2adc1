"""`flashstep train judge`: the ShapesBench judge (`training/judge.py`) on renders of every pair.

Held-out (shape, colour) pairs are included: the judge must read what any generator draws. Mild
noise and blur (`augment`) make it read decoded model outputs as reliably as clean renders.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flashstep.training.data import render_dataset
from flashstep.training.judge import Judge
from flashstep.training.shapes import ATTRIBUTES

__all__ = ["JudgeTrainConfig", "train_judge"]


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
    """The judge recipe's settings; `n_eval` fresh renders from `eval_seed` measure it."""

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
