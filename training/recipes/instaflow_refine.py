"""`flashstep train instaflow-refine --student FOLDER`: continue an exported instaflow student.

A one-step student continues stage 3 of the instaflow recipe: more steps on more teacher pairs (the
recipe's pairs first, same seeds), at a lower learning rate, with the perceptual loss throughout; a
2-rectified flow continues its reflow. The student's provenance gains one entry per refinement.

With `self_refine` a one-step student trains on fresh noise with no pairs at all: its target is its
own sample of that noise, touched up by the guided teacher (`training.teacher_refinement`). A pair
costs many teacher evaluations and a fixed set of pairs' noises is fitted far better than new
noise; a refined target costs a few and is never the same noise twice, and it leads the student
as the student improves.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from flashstep.training.checkpointing import config_dict
from flashstep.training.distill import DEFAULT_TEACHER, export_student, load_teacher
from flashstep.training.distribution_matching import DistributionMatching
from flashstep.training.export import git_commit
from flashstep.training.judge import Judge
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.rectified_flow import (
    InstaFlowTrainConfig,
    fresh_batches,
    instaflow_student_config,
    load_instaflow_unet,
    one_step_loss,
    pair_batches,
    reflow_loss,
    run_pairs,
    train_stage,
)

__all__ = ["REFINE_DEFAULTS", "TINY", "InstaFlowTrainConfig", "refine_config", "refine_instaflow"]

# Refinement of an exported student: twice the recipe's pairs, half its learning rate, a short warmup.
# Refinement of an exported student: twice the recipe's pairs, half its learning rate, a short warmup.
REFINE_DEFAULTS = dict(pairs=12288, distill_steps=2400, perceptual_steps=2400, reflow_steps=2400, lr=1e-4, warmup=50)
# Smoke-run sizes (`--tiny`): the instaflow recipe's, with two perceptual steps.
TINY = dict(pairs=8, pair_steps=2, pair_batch=4, reflow_steps=2, distill_steps=2, perceptual_steps=2, batch_size=2)


def refine_config(**overrides) -> InstaFlowTrainConfig:
    """The refinement's config: the recipe's with `REFINE_DEFAULTS`, then `overrides` (checked by the config)."""
    return replace(InstaFlowTrainConfig(), **{**REFINE_DEFAULTS, **overrides})


def refine_instaflow(
    cfg: InstaFlowTrainConfig,
    run_dir: str | Path,
    student_dir: str | Path,
    export_dir: str | Path,
    teacher_dir: str | Path = DEFAULT_TEACHER,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict:
    """Continue the instaflow student in `student_dir` on teacher pairs; export it with the leg recorded.

    A one-step student continues its distillation for `cfg.distill_steps` steps: L2 plus the judge
    perceptual loss from step `distill_steps - perceptual_steps` on (and DMD with
    `distribution_matching`). A multi-step student (the 2-rectified flow) continues its reflow for
    `cfg.reflow_steps` steps. Pairs are generated (or reused) in run_dir/pairs; with `self_refine` a
    one-step student needs none, its targets are its own samples of fresh noise as the teacher refines
    them. The export keeps the student's config and appends this run to its provenance's `refinements`.
    """
    run_dir = Path(run_dir)
    student_dir = Path(student_dir)
    student_cfg = instaflow_student_config(student_dir)  # before the pairs: a wrong folder fails at once
    is_one_step = student_cfg.allowed_steps == (1,)
    for option in ("distribution_matching", "self_refine"):
        if not is_one_step and getattr(cfg, option) is not None:
            raise ValueError(f"{student_dir} is a multi-step rectified flow: `{option}` acts on one-step samples only")
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(teacher_dir)
    if cfg.self_refine is not None:
        batches, pairs_seconds = fresh_batches(teacher, cfg.batch_size), 0.0
    else:
        pairs, pairs_seconds = run_pairs(teacher, cfg, run_dir / "pairs", progress)
        batches = pair_batches(pairs, cfg.batch_size)

    init = load_instaflow_unet(student_dir, teacher)
    dm = cfg.distribution_matching
    matching = DistributionMatching(teacher, dm) if dm is not None else None
    if is_one_step:
        loss = one_step_loss(cfg, JudgePerceptual(teacher, judge or Judge.load(), cfg.colour_weight), matching, teacher)
        steps, extra = cfg.distill_steps, matching.state() if matching is not None else ({}, {})
    else:
        loss, steps, extra = reflow_loss, cfg.reflow_steps, ({}, {})
    refined, seconds = train_stage("refine", teacher, init, batches, cfg, steps, run_dir / "refine", loss, progress, extra)
    provenance = dict(student_cfg.provenance)
    pairs_used = {"pairs": cfg.pairs, "pair_start": cfg.pair_start} if cfg.self_refine is None else {
        "pairs": 0, "target": f"its own one-step sample of fresh noise, {cfg.self_refine.recipe}",
        "self_refine": config_dict(cfg.self_refine),
    }  # fmt: skip
    leg = {
        "student": student_dir.name, "steps": steps, **pairs_used, "bf16": cfg.bf16, "lr": cfg.lr,
        "train_seconds": round(pairs_seconds + seconds),
        "commit": git_commit(),
    }  # fmt: skip
    if is_one_step:
        leg.update(perceptual_steps=cfg.perceptual_steps, perceptual_weight=cfg.perceptual_weight, colour_weight=cfg.colour_weight)
    else:
        leg["recipe"] = "reflow"
    if dm is not None:
        leg["distribution_matching"] = config_dict(dm)
    provenance["refinements"] = [*provenance.get("refinements", []), leg]
    config = replace(student_cfg, provenance=provenance)
    export_student(export_dir, teacher, refined, config)
    report = {"pairs_seconds": round(pairs_seconds), "refine_seconds": round(seconds), "config": config_dict(cfg)}
    (run_dir / "refine_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
