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

`refine_instaflow` (`flashstep train instaflow-refine --student FOLDER`) continues stage 3 from an
exported one-step student: more steps on more teacher pairs (the recipe's pairs first, same
seeds), at a lower learning rate, with the perceptual loss throughout. The student's provenance
gains one entry per refinement.

With `self_refine` a one-step student trains on fresh noise with no pairs at all: its target is its
own sample of that noise, touched up by the guided teacher (`training.teacher_refinement`). A pair
costs 30 teacher evaluations (15 solver steps with CFG) and the shipped student needed 196,608 of
them, because it fits a fixed set of pairs' noises far better than new noise; a refined target
costs 4 and is never the same noise twice. The recipe's student reads 0.69 seen adherence and its
samples refined from t = 300 in 2 steps 0.88 (4 seeds): the target leads the student, and follows
it as it improves. From the recipe's student, two legs (2,000 steps from t = 500 in 4 steps, then
1,600 at lr 2e-4; 106 min on one CPU thread) reach 0.850 seen at 16 seeds, where the pair legs took
about 150 min past the recipe to reach 0.78 (README, shapes-instaflow).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.denoiser import Conditioning, Denoiser
from models.families.teacher import sample_dpmpp_2m
from models.flashstep_config import FlashstepConfig
from models.schedule import FLOW_NOISE_TIMESTEP, NoiseSchedule, linspace_timesteps
from training.checkpointing import EMA, config_dict, load_train_state, save_train_state
from training.distill import (
    DEFAULT_TEACHER,
    HYBRID_GUIDANCE_SCALE,
    PromptSampler,
    Provenance,
    Teacher,
    Timer,
    autocast,
    export_student,
    load_teacher,
    lr_at,
    optimizer_step,
    set_lr,
    student_unet,
)
from training.distribution_matching import DistributionMatching, DistributionMatchingConfig
from training.export import git_commit
from training.judge import Judge
from training.teacher_refinement import TeacherRefinement, refine_with_teacher

NOISE_TIMESTEP = float(FLOW_NOISE_TIMESTEP)


@dataclass(frozen=True)
class InstaFlowTrainConfig:
    pairs: int = 6144
    pair_steps: int = 15  # DPM-Solver++(2M) steps per teacher pair
    pair_guidance: float = 4.0
    pair_batch: int = 128
    # The first pair's index (a multiple of pair_batch): pairs are seeded by index, so a refinement
    # leg can take pairs no earlier leg fitted (the shipped student has fitted 0..196,607).
    pair_start: int = 0
    # Teacher pairs and the student's forward passes under bfloat16 autocast (weights, optimiser and
    # the solver's state stay fp32). On the 2-core CPU: pairs 2.0x and training steps 1.4x
    # faster; a pair's endpoint moves by MSE 2e-4 (latent variance 1), a tenth of what 10 solver
    # steps instead of 15 move it (1.7e-3).
    bf16: bool = False
    reflow_steps: int = 1200  # the shipped pair: ~8 min of reflow, ~40 min of distillation on one thread
    distill_steps: int = 2400  # seen adherence at 1,000 steps 0.475, at 1,750 0.533 (ShapesBench, 4 seeds)
    perceptual_steps: int = 1800  # the last steps of `distill` add the perceptual loss (from step 600)
    perceptual_weight: float = 1.0
    colour_weight: float = 0.0  # the perceptual loss's pooled-colour term (JudgePerceptual)
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 100
    ema_decay: float = 0.995
    cond_dropout: float = 0.1
    save_every: int = 250
    seed: int = 7000
    # Stage 3 only: a DMD distribution-matching term beside the regression (None: regression alone).
    distribution_matching: DistributionMatchingConfig | None = None
    # Refinement of a one-step student only: regress onto its own sample of fresh noise as the teacher
    # refines it, instead of onto teacher pairs (None: the pairs).
    self_refine: TeacherRefinement | None = None

    def __post_init__(self) -> None:
        for name in ("perceptual_weight", "colour_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0 but is {getattr(self, name)}")


# Refinement of an exported student: twice the recipe's pairs, half its learning rate, a short warmup.
REFINE_DEFAULTS = dict(pairs=12288, distill_steps=2400, perceptual_steps=2400, reflow_steps=2400, lr=1e-4, warmup=50)


# ----- stage 1: teacher ODE pairs -----


@torch.no_grad()
def teacher_pairs(
    teacher: Teacher, captions: list[str], noise: torch.Tensor, steps: int, guidance: float, bf16: bool = False
) -> torch.Tensor:
    """The teacher's DPM-Solver++(2M) + CFG endpoint x for each (caption, z): fp32 latents (B, 4, h, w)."""
    schedule = NoiseSchedule(teacher.alphas_cumprod.double())
    cond = Conditioning(
        prompt_embeds=teacher.encode_prompts(captions),
        uncond_embeds=teacher.empty_prompt_embeds.expand(len(captions), -1, -1),
        guidance_scale=torch.full((len(captions),), float(guidance)),
    )
    model = Denoiser(teacher.unet, cond, "epsilon", schedule)
    with autocast(teacher.unet, bf16):
        return sample_dpmpp_2m(model, noise.clone(), linspace_timesteps(steps), schedule, []).float()


def _chunk_paths(cfg: InstaFlowTrainConfig, folder: Path) -> list[tuple[Path, int, int]]:
    """(file, first pair index, pair count) of each chunk of the config's pairs, named by global index."""
    if cfg.pair_start % cfg.pair_batch:
        raise ValueError(f"pair_start {cfg.pair_start} is not a multiple of pair_batch {cfg.pair_batch}")
    end = cfg.pair_start + cfg.pairs
    return [
        (folder / f"pairs_{start // cfg.pair_batch:04d}.safetensors", start, min(cfg.pair_batch, end - start))
        for start in range(cfg.pair_start, end, cfg.pair_batch)
    ]


def generate_pairs(teacher: Teacher, cfg: InstaFlowTrainConfig, folder: Path, progress: bool = True) -> None:
    """Write pairs pair_start.. pair_start + pairs as chunk files `pairs_XXXX.safetensors`; existing chunks are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, start, n in tqdm(_chunk_paths(cfg, folder), desc="pairs", disable=not progress, mininterval=5.0):
        if path.exists():
            continue
        captions = PromptSampler(cfg.seed + start).draw(n)
        z = torch.randn((n, *teacher.latent_shape), generator=torch.Generator().manual_seed(cfg.seed + start))
        x = teacher_pairs(teacher, captions, z, cfg.pair_steps, cfg.pair_guidance, cfg.bf16)
        tmp = path.with_suffix(".tmp")
        save_file({"z": z.contiguous(), "x": x.contiguous()}, str(tmp), metadata={"captions": json.dumps(captions)})
        tmp.rename(path)


def _pairs(teacher: Teacher, cfg: InstaFlowTrainConfig, folder: Path, progress: bool) -> tuple[tuple, float]:
    """The run's pairs, generated where missing, and the seconds spent generating them so far."""
    timer = Timer(folder)
    generate_pairs(teacher, cfg, folder, progress=progress)
    timer.save()
    return load_pairs(folder, cfg), timer.seconds


def load_pairs(folder: Path, cfg: InstaFlowTrainConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """z (N, 4, h, w), x (N, 4, h, w), N captions: the config's chunks, or without one every chunk in the folder."""
    zs, xs, captions = [], [], []
    paths = sorted(folder.glob("pairs_*.safetensors")) if cfg is None else [p for p, _, _ in _chunk_paths(cfg, folder)]
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            zs.append(f.get_tensor("z"))
            xs.append(f.get_tensor("x"))
            captions += json.loads(f.metadata()["captions"])
    if not zs:
        raise FileNotFoundError(f"no teacher pairs in {folder}")
    return torch.cat(zs), torch.cat(xs), captions


# ----- the rectified-flow maths -----


def reflow_target(z: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, UNet timestep, velocity target) for t in [0, 1] per sample (1 = data).

    x_t = t x + (1 - t) z moves at constant velocity x - z; the UNet's timestep is
    (1 - t) * 1000 so that pure noise is 1000, as in `rectified_flow_timesteps`.
    """
    tt = t.view(-1, 1, 1, 1)
    return tt * x + (1 - tt) * z, (1 - t) * NOISE_TIMESTEP, x - z


def reflow_loss(unet, z: torch.Tensor, x: torch.Tensor, embeds: torch.Tensor, step: int, gen: torch.Generator) -> torch.Tensor:
    """The 2-rectified flow's loss: velocity MSE at a uniform t on the straight line from z to its pair x."""
    t = torch.rand(z.shape[0], generator=gen)
    xt, timestep, target = reflow_target(z, x, t)
    return F.mse_loss(unet(xt, timestep, encoder_hidden_states=embeds).sample, target)


def one_step(unet: torch.nn.Module, z: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The one-step sample x = z + v(z, 1000)."""
    t = torch.full((z.shape[0],), NOISE_TIMESTEP)
    return z + unet(z, t, encoder_hidden_states=embeds).sample


def _embed(teacher: Teacher, captions: list[str], rng: np.random.Generator, dropout: float) -> torch.Tensor:
    return teacher.encode_prompts(["" if rng.random() < dropout else c for c in captions])


# A batch source: (numpy rng, torch generator) -> (noise z, target x or None, captions).
Batches = Callable[[np.random.Generator, torch.Generator], tuple[torch.Tensor, torch.Tensor | None, list[str]]]


def pair_batches(pairs: tuple[torch.Tensor, torch.Tensor, list[str]], batch_size: int) -> Batches:
    """Batches of teacher pairs, drawn with replacement."""
    z_all, x_all, captions = pairs

    def draw(rng: np.random.Generator, gen: torch.Generator):
        idx = rng.integers(0, len(z_all), batch_size)
        return z_all[idx], x_all[idx], [captions[i] for i in idx]

    return draw


def fresh_batches(teacher: Teacher, batch_size: int) -> Batches:
    """Fresh noise and fresh training captions every step, with no target: the loss makes its own."""

    def draw(rng: np.random.Generator, gen: torch.Generator):
        captions = PromptSampler(int(rng.integers(0, 2**31 - 1))).draw(batch_size)
        return torch.randn((batch_size, *teacher.latent_shape), generator=gen), None, captions

    return draw


def _train_stage(
    name: str,
    teacher: Teacher,
    init: torch.nn.Module,
    batches: Batches,
    cfg: InstaFlowTrainConfig,
    steps: int,
    run_dir: Path,
    loss_fn,
    progress: bool,
    extra_state: tuple[dict, dict] = ({}, {}),
) -> tuple[torch.nn.Module, float]:
    """The loop every stage shares: draw a batch, loss_fn(unet, z, x, embeds, step, gen), AdamW, EMA.

    `extra_state` (modules, optimizers) the loss trains itself are saved and resumed with the UNet's.
    """
    unet = init
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    modules = {"unet": unet, "ema": ema.module, **extra_state[0]}
    optimizers = {"unet": opt, **extra_state[1]}
    start = load_train_state(run_dir, modules, optimizers) or 0
    timer = Timer(run_dir)
    rng = np.random.default_rng(cfg.seed + start + zlib.crc32(name.encode()) % 1000)
    gen = torch.Generator().manual_seed(cfg.seed + start)
    bar = tqdm(range(start, steps), desc=name, disable=not progress, mininterval=5.0, initial=start, total=steps)
    loss = torch.tensor(float("nan"))
    for step in bar:
        set_lr(opt, lr_at(step, steps, cfg.lr, cfg.warmup))
        z, x, captions = batches(rng, gen)
        embeds = _embed(teacher, captions, rng, cfg.cond_dropout)
        with autocast(unet, cfg.bf16):
            loss = loss_fn(unet, z, x, embeds, step, gen)
        optimizer_step(opt, loss, unet.parameters())
        ema.update(unet, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            save_train_state(run_dir, step + 1, modules, optimizers, config_dict(cfg))
            timer.save()
    if start >= steps:
        load_train_state(run_dir, {"ema": ema.module}, {})
    return ema.module, timer.seconds


class JudgePerceptual:
    """Perceptual distance on the judge's penultimate features of decoded images (LPIPS stand-in).

    With `colour_weight`, plus the squared error of the two images' colours pooled to 16 x 16: a
    one-step student's wrong colours are mostly neighbouring hues (orange for red, blue for
    purple), a small step in the VAE's latents and in the judge's pooled features alike.
    Gradients flow through the frozen VAE decoder and judge into the student's latents.
    """

    def __init__(self, teacher: Teacher, judge: Judge, colour_weight: float = 0.0) -> None:
        self.vae = teacher.vae
        self.judge = judge.eval().requires_grad_(False)
        self.colour_weight = colour_weight

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.judge(images)[0], dim=-1)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            want_images = self._decode(target)
            want = self._features(want_images)
        images = self._decode(pred)
        loss = (self._features(images) - want).pow(2).sum(-1).mean()
        if self.colour_weight:
            size = images.shape[-1] // 16
            loss = loss + self.colour_weight * F.mse_loss(F.avg_pool2d(images, size), F.avg_pool2d(want_images, size))
        return loss


def one_step_loss(
    cfg: InstaFlowTrainConfig,
    perceptual: JudgePerceptual,
    matching: DistributionMatching | None = None,
    teacher: Teacher | None = None,
):
    """Stage 3's loss: L2 to the pair's latent, plus the perceptual loss in the last `perceptual_steps`.

    A batch with no pair latent (`fresh_batches`) takes `cfg.self_refine` of the student's own
    sample as its target: `teacher` re-noises it with the same z and takes it back (no gradient).

    With `matching`, the DMD term joins once its fake score has warmed up, on samples from fresh
    noise (same captions): the pairs' noises are a fixed set the student fits far better than new
    noise (shipped student: latent MSE 0.033 on its pairs, 0.151 on fresh noise), so matching there
    would leave the served case alone. The fake score takes its own steps on those samples.
    """
    perceptual_from = cfg.distill_steps - cfg.perceptual_steps

    def loss(unet, z, x, embeds, step, gen):
        pred = one_step(unet, z, embeds)
        if x is None:
            if teacher is None or cfg.self_refine is None:
                raise ValueError("a batch without pair latents needs `self_refine` and the teacher to make its targets")
            x = refine_with_teacher(teacher, pred.detach(), z, embeds, cfg.self_refine).float()
        value = F.mse_loss(pred, x)
        if step >= perceptual_from:
            value = value + cfg.perceptual_weight * perceptual(pred, x)
        if matching is not None:
            fresh = one_step(unet, torch.randn(z.shape, generator=gen), embeds)
            if step >= matching.cfg.fake_warmup:
                value = value + matching.cfg.weight * matching.loss(fresh, embeds, gen)
            matching.fit(fresh, embeds, gen)
        return value

    return loss


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
    pairs, pairs_seconds = _pairs(teacher, cfg, run_dir / "pairs", progress)
    batches = pair_batches(pairs, cfg.batch_size)
    rf2, reflow_seconds = _train_stage(
        "reflow", teacher, student_unet(teacher), batches, cfg, cfg.reflow_steps, run_dir / "reflow", reflow_loss, progress
    )

    distill_loss = one_step_loss(cfg, JudgePerceptual(teacher, judge or Judge.load(), cfg.colour_weight))

    init = student_unet(teacher)
    init.load_state_dict(rf2.state_dict())
    one, distill_seconds = _train_stage(
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


def instaflow_student_config(folder: Path) -> FlashstepConfig:
    """The config of an instaflow student (one-step, or a multi-step rectified flow); others are refused."""
    config = FlashstepConfig.load(folder)
    if config.family != "instaflow":
        raise ValueError(f"{folder} is not an instaflow student (family {config.family})")
    return config


def one_step_student_config(folder: Path) -> FlashstepConfig:
    """The config of a one-step instaflow student; any other folder is refused with what it is."""
    config = FlashstepConfig.load(folder)
    if config.family != "instaflow" or config.allowed_steps != (1,):
        raise ValueError(f"{folder} is not a one-step instaflow student (family {config.family}, "
                         f"steps {list(config.allowed_steps)})")  # fmt: skip
    return config


def load_instaflow_unet(folder: Path, teacher: Teacher) -> torch.nn.Module:
    """A trainable float32 copy of the UNet in `folder` (checked by `instaflow_student_config`)."""
    from diffusers import UNet2DConditionModel

    unet = student_unet(teacher)
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True).state_dict())
    return unet


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
        pairs, pairs_seconds = _pairs(teacher, cfg, run_dir / "pairs", progress)
        batches = pair_batches(pairs, cfg.batch_size)

    init = load_instaflow_unet(student_dir, teacher)
    dm = cfg.distribution_matching
    matching = DistributionMatching(teacher, dm) if dm is not None else None
    if is_one_step:
        loss = one_step_loss(cfg, JudgePerceptual(teacher, judge or Judge.load(), cfg.colour_weight), matching, teacher)
        steps, extra = cfg.distill_steps, matching.state() if matching is not None else ({}, {})
    else:
        loss, steps, extra = reflow_loss, cfg.reflow_steps, ({}, {})
    refined, seconds = _train_stage("refine", teacher, init, batches, cfg, steps, run_dir / "refine", loss, progress, extra)
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
