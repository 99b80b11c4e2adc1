"""SwiftBrush v2's start: the VSD student begins as a stronger one-step model, not as the teacher.

SwiftBrush v2 (Dao et al. 2024, arXiv:2407.14294, Sec. 3.1) initialises its student from SD-Turbo
rather than from SD: VSD then refines a generator that already draws the prompt, instead of
having to turn a multi-step denoiser into one from scratch. On shapes, SwiftBrush from the
teacher stays far below the instaflow student in adherence, so the stronger start here is the
shipped `shapes-instaflow`.

The two students are parameterised differently: instaflow's one step is `x0 = z + v(z, 1000)`,
swiftbrush's `x0 = (z - sqrt(1 - abar_999) eps(z, 999)) / sqrt(abar_999)`. The UNet's output
cannot be rewritten from one to the other (the second needs z passed through to the output with
weight ~0.93, which the UNet has no path for), so the take-over is a regression: a student
initialised from the teacher (whose eps at t = 999 already carries that z) learns the source's
map on fresh noise, latent L2 plus the judge-feature perceptual loss the source was trained with.
Fresh noise each step, one cheap source call per sample: unlike the teacher's ODE pairs, the
targets cost one UNet evaluation and never repeat, so there is nothing to overfit to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from flashstep.training.checkpointing import EMA, config_dict, load_train_state, save_train_state
from flashstep.training.distill import (
    PromptSampler,
    Teacher,
    Timer,
    check_finite,
    lr_at,
    optimizer_step,
    set_lr,
    student_unet,
)
from flashstep.training.judge import Judge
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.rectified_flow import load_instaflow_unet, one_step, one_step_student_config


@dataclass(frozen=True)
class WarmStartConfig:
    source: str  # folder of a one-step instaflow student
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-4
    warmup: int = 50
    perceptual_weight: float = 1.0
    ema_decay: float = 0.995
    save_every: int = 100
    seed: int = 8100


def load_source(folder: str | Path, teacher: Teacher) -> torch.nn.Module:
    """The one-step instaflow student whose map the swiftbrush student takes over, frozen."""
    one_step_student_config(Path(folder))
    return load_instaflow_unet(Path(folder), teacher).eval().requires_grad_(False)


def warm_start(
    teacher: Teacher,
    student_x0,
    cfg: WarmStartConfig,
    run_dir: str | Path,
    judge: Judge | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, float]:
    """Regress a teacher-initialised student onto the source's one-step map; returns (EMA student, seconds).

    `student_x0(unet, z, embeds)` is the swiftbrush one-step sample. Resumable from `run_dir`.
    """
    run_dir = Path(run_dir)
    source = load_source(cfg.source, teacher)
    student = student_unet(teacher)
    ema = EMA(student, cfg.ema_decay)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    modules, optimizers = {"student": student, "ema": ema.module}, {"student": opt}
    start = load_train_state(run_dir, modules, optimizers) or 0
    timer = Timer(run_dir)
    perceptual = JudgePerceptual(teacher, judge or Judge.load())
    prompts = PromptSampler(cfg.seed + start)
    gen = torch.Generator().manual_seed(cfg.seed + start)
    bar = tqdm(range(start, cfg.steps), desc="warm start", disable=not progress, mininterval=5.0,
               initial=start, total=cfg.steps)  # fmt: skip
    for step in bar:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        embeds = teacher.encode_prompts(prompts.draw(cfg.batch_size))
        z = torch.randn((cfg.batch_size, *teacher.latent_shape), generator=gen)
        with torch.no_grad():
            target = one_step(source, z, embeds)
        pred = student_x0(student, z, embeds)
        loss = F.mse_loss(pred, target) + cfg.perceptual_weight * perceptual(pred, target)
        check_finite(step, warm_start=loss)
        optimizer_step(opt, loss, student.parameters())
        ema.update(student, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_train_state(run_dir, step + 1, modules, optimizers, config_dict(cfg))
            timer.save()
    return ema.module, timer.seconds  # resumed after the last step: the EMA loaded with the state
