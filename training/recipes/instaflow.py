"""`flashstep train instaflow`: reflow the teacher into a 2-rectified flow, then distil it to one step.

InstaFlow (Liu et al. 2023, arXiv:2309.06380) in three stages, each resumable in its own folder
of the run:

1. **pairs**: (noise z, latent x) pairs from the teacher's own ODE sampler (DPM-Solver++(2M)
   with CFG, exactly the served sampler), stored in chunks so generation resumes mid-way.
2. **reflow**: a velocity UNet initialised from the teacher learns the straight path between
   each pair: with t in [0, 1] (1 = data), `x_t = t x + (1 - t) z` and the target is `x - z`.
   The UNet sees the timestep `(1 - t) * 1000`, so noise sits at 1000 as in the teacher and the
   engine's `instaflow` sampler. Exported as `shapes-2rf` (2 to 8 Euler steps, CFG allowed).
3. **distil**: a one-step student initialised from the 2-rectified flow maps z to
   `z + v(z, 1000)` and regresses the pair's x with L2, then adds a perceptual loss on the
   judge's features of decoded images (LPIPS weights cannot be downloaded here). The targets
   are the teacher pairs the 2-RF was fitted to, which its straightened ODE reproduces from the
   same z; regenerating them with the 2-RF would cost more samples for the same coupling.
   Exported as `shapes-instaflow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.training.checkpointing import config_dict
from flashstep.training.distill import (
    DEFAULT_TEACHER,
    HYBRID_GUIDANCE_SCALE,
    Provenance,
    export_student,
    load_teacher,
    student_unet,
)
from flashstep.training.judge import Judge
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.rectified_flow import (
    InstaFlowTrainConfig,
    one_step_loss,
    pair_batches,
    reflow_loss,
    run_pairs,
    train_stage,
)

__all__ = ["TINY", "InstaFlowTrainConfig", "train_instaflow"]

# Smoke-run sizes (`flashstep train instaflow --tiny`): seconds, every stage exercised.
TINY = dict(pairs=8, pair_steps=2, pair_batch=4, reflow_steps=2, distill_steps=2, perceptual_steps=1, batch_size=2)


def train_instaflow(
    cfg: InstaFlowTrainConfig,
    run_dir: str | Path,
    export_2rf: str | Path | None,
    export_one_step: str | Path | None,
    teacher_dir: str | Path = DEFAULT_TEACHER,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict:
    """All three stages (each resumes), then the two exports. Returns a report."""
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(teacher_dir)
    pairs, pairs_seconds = run_pairs(teacher, cfg, run_dir / "pairs", progress)
    batches = pair_batches(pairs, cfg.batch_size)
    rf2, reflow_seconds = train_stage(
        "reflow", teacher, student_unet(teacher), batches, cfg, cfg.reflow_steps, run_dir / "reflow", reflow_loss, progress
    )

    distill_loss = one_step_loss(cfg, JudgePerceptual(teacher, judge or Judge.load(), cfg.colour_weight))

    init = student_unet(teacher)
    init.load_state_dict(rf2.state_dict())
    one, distill_seconds = train_stage(
        "distill", teacher, init, batches, cfg, cfg.distill_steps, run_dir / "distill", distill_loss, progress
    )

    report = {
        "pairs_seconds": round(pairs_seconds),
        "reflow_seconds": round(reflow_seconds),
        "distill_seconds": round(distill_seconds),
        "config": config_dict(cfg),
    }
    total = pairs_seconds + reflow_seconds + distill_seconds
    teacher_name = teacher.folder.name
    if export_2rf is not None:
        config = FlashstepConfig(
            family="instaflow",
            prediction="flow",
            default_steps=2,
            allowed_steps=(1, 2, 3, 4, 6, 8),
            default_guidance_scale=1.0,
            nasa_alpha=0.19,
            base=teacher.folder.name,
            hybrid_guidance_scale=HYBRID_GUIDANCE_SCALE,
            resolution=teacher.config.resolution,
            provenance=Provenance(
                "reflow", teacher_name, cfg.reflow_steps, cfg.batch_size, pairs_seconds + reflow_seconds,
                {"pairs": cfg.pairs, "pair_sampler": f"dpmpp_2m x{cfg.pair_steps}, cfg {cfg.pair_guidance}", "bf16": cfg.bf16},
            ).to_dict(),
        )
        export_student(export_2rf, teacher, rf2, config)
    if export_one_step is not None:
        config = FlashstepConfig(
            family="instaflow",
            prediction="flow",
            default_steps=1,
            allowed_steps=(1,),
            default_guidance_scale=0.0,
            nasa_alpha=0.19,
            base=teacher.folder.name,
            resolution=teacher.config.resolution,
            provenance=Provenance(
                "reflow+one-step distillation (L2, then judge-feature perceptual)", teacher_name,
                cfg.reflow_steps + cfg.distill_steps, cfg.batch_size, total,
                {"pairs": cfg.pairs, "distill_steps": cfg.distill_steps, "perceptual_steps": cfg.perceptual_steps,
                 "bf16": cfg.bf16},
            ).to_dict(),
        )
        export_student(export_one_step, teacher, one, config)
    (run_dir / "instaflow_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

