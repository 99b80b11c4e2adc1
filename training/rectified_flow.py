"""Rectified-flow parts the instaflow recipes share: their config, teacher ODE pairs, the reflow
and one-step maths, the training loop of every stage, and loading an exported instaflow student.

InstaFlow (Liu et al. 2023, arXiv:2309.06380): a velocity UNet learns the straight path between
noise z and the teacher's sample x of it (`reflow`); a one-step student maps z to `z + v(z, 1000)`.
Teacher pairs are the guided teacher's DPM-Solver++(2M) endpoints, stored in chunks seeded by index
so generation resumes mid-way and a later leg can take pairs no earlier one fitted.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from flashstep.models.denoiser import Conditioning, Denoiser
from flashstep.models.diffusers_compat import to_flashstep_convention
from flashstep.models.families.teacher import sample_dpmpp_2m
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.schedule import FLOW_NOISE_TIMESTEP, NoiseSchedule, linspace_timesteps
from flashstep.training.checkpointing import EMA, config_dict, load_train_state, save_train_state
from flashstep.training.distill import (
    PromptSampler,
    Teacher,
    Timer,
    autocast,
    lr_at,
    optimizer_step,
    set_lr,
    student_unet,
)
from flashstep.training.distribution_matching import DistributionMatching, DistributionMatchingConfig
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.teacher_refinement import TeacherRefinement, refine_with_teacher

NOISE_TIMESTEP = float(FLOW_NOISE_TIMESTEP)


@dataclass(frozen=True)
class InstaFlowTrainConfig:
    """The instaflow recipe's settings; `instaflow-refine` starts from these with `REFINE_DEFAULTS` over them."""

    pairs: int = 6144
    pair_steps: int = 15  # DPM-Solver++(2M) steps per teacher pair
    pair_guidance: float = 4.0
    pair_batch: int = 128
    # The first pair's index (a multiple of pair_batch): pairs are seeded by index, so a refinement
    # leg can take pairs no earlier leg fitted.
    pair_start: int = 0
    # Teacher pairs and the student's forward passes under bfloat16 autocast (weights, optimiser and
    # the solver's state stay fp32): faster on CPUs with bfloat16 support, and a pair's endpoint
    # moves far less than a coarser solver grid would move it.
    bf16: bool = False
    reflow_steps: int = 1200
    distill_steps: int = 2400
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


def run_pairs(teacher: Teacher, cfg: InstaFlowTrainConfig, folder: Path, progress: bool) -> tuple[tuple, float]:
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


def train_stage(
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
    noise, so matching there
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
    to_flashstep_convention(unet, FlashstepConfig.load(folder))  # training works on flashstep's velocity sign
    return unet

