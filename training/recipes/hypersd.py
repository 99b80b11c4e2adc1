"""`flashstep train hypersd`: trajectory-segmented consistency distillation (TSCD) into a LoRA.

Hyper-SD (Ren et al. 2024, arXiv:2404.13686, Sec. 3.1) at toy scale; the maths and the LoRA live in
`training/tscd.py`. k goes 8 -> 4 -> 2 -> 1, each stage with its own steps, the LoRA carried across
stages; after k = 1 every t maps to x0, which is what 1-step sampling asks for, while the earlier
stages leave the LoRA's jumps to 749/499/249 aligned with the multi-step schedules.

Choices, and why:
- **Data**: real latents (training scenes, held-out pairs excluded, encoded once by the
  teacher's VAE and cached in the run folder), noised to x_t. Hyper-SD distils on real
  image-text pairs; a fresh caption of the same attributes is drawn each time a latent is used.
- **Student**: a PEFT LoRA on the attention projections, the transformer ff/proj layers and the
  resnet/resampling convs. At this size the convs hold most of the UNet's weights; without them a
  1-step map has little to change.
- **Teacher**: the frozen teacher UNet (a separate module, so its calls pay no LoRA cost), one
  DDIM step with classifier-free guidance at the teacher's default scale 4.0; the student
  serves at guidance 0, so it absorbs the guided trajectory.
- **Target network**: the student itself under stop-gradient (EMA decay 0), as diffusers'
  LCM-LoRA recipe does and as improved consistency training (Song & Dhariwal 2023, Sec. 3.2)
  recommends; an EMA lags the target by ~1 / (1 - decay) steps, which a run of a few thousand
  steps cannot spare, and keeping one would double the LoRA state.
- **Loss**: MSE between the two x_s in latent space (the paper's consistency term; its
  adversarial term is left out).

Exported as a LoRA folder naming the teacher as its base: the engine fuses the LoRA at scale 1 and
samples with TCD or DDIM-trailing at guidance 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flashstep.training.checkpointing import config_dict, load_train_state, save_train_state
from flashstep.training.data import captions_for_labels
from flashstep.training.distill import (
    DEFAULT_TEACHER,
    Provenance,
    Timer,
    load_teacher,
    lr_at,
    optimizer_step,
    set_lr,
)
from flashstep.training.tscd import (
    HyperSDTrainConfig,
    export_hypersd,
    lora_student,
    stage_of,
    training_latents,
    tscd_loss,
)

__all__ = ["TINY", "HyperSDTrainConfig", "train_hypersd"]

# Smoke-run sizes (`flashstep train hypersd --tiny`).
TINY = dict(latents=16, stage_steps=(1, 1, 1, 1), batch_size=2, save_every=2)



def train_hypersd(
    cfg: HyperSDTrainConfig,
    run_dir: str | Path,
    export_dir: str | Path | None,
    teacher_dir: str | Path = DEFAULT_TEACHER,
    progress: bool = True,
) -> dict:
    """Encode latents (cached), run every TSCD stage (resumable), export the LoRA folder. Returns a report."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(teacher_dir)
    data_timer = Timer(run_dir / "latents")
    latents, labels = training_latents(teacher, cfg.latents, cfg.seed, run_dir / "latents", progress)
    data_timer.save()
    data_seconds = data_timer.seconds  # frozen here: the timer keeps counting

    unet = lora_student(teacher, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    state_dir = run_dir / "tscd"
    start = load_train_state(state_dir, {"unet": unet}, {"lora": opt}) or 0
    timer = Timer(state_dir)
    total = sum(cfg.stage_steps)
    rng = np.random.default_rng(cfg.seed + start)
    gen = torch.Generator().manual_seed(cfg.seed + start)
    uncond = teacher.empty_prompt_embeds.expand(cfg.batch_size, -1, -1)
    losses: dict[str, list[float]] = {}
    loop_start = time.time()
    bar = tqdm(
        range(start, total), desc="tscd", disable=not progress, mininterval=5.0, initial=start, total=total
    )
    for step in bar:
        stage, local = stage_of(step, cfg.stage_steps)
        k = cfg.segments[stage]
        set_lr(opt, lr_at(local, cfg.stage_steps[stage], cfg.lr, cfg.warmup))
        idx = rng.integers(0, len(latents), cfg.batch_size)
        cond = teacher.encode_prompts(captions_for_labels(labels[idx], rng, cfg.cond_dropout))
        loss = tscd_loss(unet, teacher.unet, teacher.alphas_cumprod, latents[idx], cond, uncond, k, cfg, gen)
        optimizer_step(opt, loss, params)
        losses.setdefault(f"k={k}", []).append(loss.item())
        bar.set_postfix(k=k, loss=f"{loss.item():.4f}", refresh=False)  # refresh would bypass mininterval
        stage_end = local + 1 == cfg.stage_steps[stage]
        if (step + 1) % cfg.save_every == 0 or stage_end:
            save_train_state(state_dir, step + 1, {"unet": unet}, {"lora": opt}, config_dict(cfg))
            timer.save()

    report = {
        "latents_seconds": round(data_seconds),
        "train_seconds": round(timer.seconds),
        "steps_run": total - min(start, total),
        "seconds_per_step": round((time.time() - loop_start) / max(total - start, 1), 3),
        # Mean loss per stage over this call's steps (a resumed run reports only what it trained).
        "losses": {name: float(np.mean(v)) for name, v in losses.items()},
        "config": config_dict(cfg),
    }
    if export_dir is not None:
        provenance = Provenance(
            "tscd-lora", teacher.folder.name, total, cfg.batch_size, data_seconds + timer.seconds,
            {"segments": list(cfg.segments), "stage_steps": list(cfg.stage_steps), "rank": cfg.rank,
             "teacher_guidance": cfg.guidance_scale, "latents": cfg.latents, "target": "stop-grad student"},
        ).to_dict()  # fmt: skip
        export_hypersd(export_dir, unet, teacher, cfg, provenance)
    (run_dir / "hypersd_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----- score distillation for one step (Hyper-SD Sec. 3.3) -----
