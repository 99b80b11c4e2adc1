"""`flashstep train swiftbrush`: image-free one-step distillation by variational score distillation.

SwiftBrush (Nguyen & Tran 2024, arXiv:2312.05239) with SNOOPI's PG-SB (Nguyen et al. 2024,
arXiv:2412.02687), on prompts only, never on images:

- The **student**, initialised from the teacher, maps pure noise z to a latent in one step:
  `x0 = (z - sqrt(1 - abar_999) eps_s(z, 999)) / sqrt(abar_999)` (the engine's `swiftbrush` sampler).
- A **LoRA teacher** (PEFT LoRA on a copy of the teacher's UNet) learns the student's own
  distribution by plain epsilon-MSE on detached student samples (10% empty prompts, so its
  unconditional branch is trained too).
- The student follows the VSD gradient (SwiftBrush eq. 6, ProlificDreamer eq. 9): noise x0 to a
  random `t ~ U[20, 980]` and push it along `(1 - abar_t) (eps_teacher - eps_lora)`, the
  difference between where the teacher and where the student's distribution would denoise it.
- Both teachers use classifier-free guidance (uncond = the empty prompt) with the same scale;
  PG-SB (SNOOPI Sec. 3.1) draws that scale per sample, `kappa ~ U(0.5, 4)` in the paper and
  U(0.5, 2) here (see `guidance_range`), which stabilises VSD across guidance levels. `guidance`
  in the config fixes it instead.
- The LoRA teacher takes five steps per student step (DMD2's two time-scale rule): at one, it lags
  the student and VSD collapses every prompt to one image.

The frozen teacher and the LoRA teacher are one module: the teacher's epsilon is the LoRA
teacher's with its adapters switched off, so the recipe holds two UNets (student and LoRA
teacher), not three. Student and LoRA steps alternate, each with its own AdamW.
Exported as `shapes-swiftbrush` (family swiftbrush, one step, no CFG).

With `warm_start` (`--start-from FOLDER`), the student starts as a stronger one-step model instead
of the teacher, as SwiftBrush v2 starts from SD-Turbo: training/warm_start.py takes that model's map
over into this parameterisation before the first VSD step. With `--prediction flow` the student
shares that model's parameterisation, so it starts from its weights as they are instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.schedule import FLOW_NOISE_TIMESTEP
from flashstep.training.checkpointing import EMA, config_dict, load_train_state, save_train_state
from flashstep.training.distill import (
    DEFAULT_TEACHER,
    PromptSampler,
    Provenance,
    Teacher,
    Timer,
    add_noise,
    cfg_eps,
    check_finite,
    export_student,
    load_teacher,
    lr_at,
    optimizer_step,
    set_lr,
    student_unet,
    unet_eps,
)
from flashstep.training.lora import LORA_TARGETS, adapters_off, lora_teacher, lora_weights
from flashstep.training.rectified_flow import one_step
from flashstep.training.warm_start import WarmStartConfig, load_source, warm_start

__all__ = ["TINY", "SwiftBrushTrainConfig", "train_swiftbrush"]

# Smoke-run sizes (`flashstep train swiftbrush --tiny`).
TINY = dict(steps=2, batch_size=2, save_every=1)

STUDENT_TIMESTEP = 999

# The student's output, all of which the engine serves. At t = 999, sqrt(abar) is small: an epsilon
# student's x0 is (z - sqrt(1 - abar) eps) / sqrt(abar), so every error in eps reaches the image
# amplified, where a v student's x0 = sqrt(abar) z - sqrt(1 - abar) v is as well conditioned as its
# output. A flow student predicts the rectified-flow velocity at the noise end, x0 = z + v(z, 1000): the instaflow student's own
# parameterisation, so it can start from that student's weights as they are (SwiftBrush v2 starts
# from SD-Turbo's weights), with no take-over regression and nothing of the source's map lost.
STUDENT_PREDICTIONS = ("epsilon", "v_prediction", "flow")


def student_timestep(prediction: str) -> int:
    """The timestep the student's UNet sees with pure noise: 1000 on the flow path, else 999."""
    return FLOW_NOISE_TIMESTEP if prediction == "flow" else STUDENT_TIMESTEP


PROBE_PROMPTS = (
    "a red circle", "a blue square", "a green triangle", "a yellow star",
    "a purple diamond", "an orange circle on the left", "a large cyan star, black background",
    "a small pink square at the top",
)  # fmt: skip


@dataclass(frozen=True)
class SwiftBrushTrainConfig:
    """The swiftbrush recipe's settings; `__post_init__` names a field that is out of range or needs another."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4  # student; lower rates leave it drawing colour blobs long after shapes should appear
    lora_lr: float = 1e-3
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    warmup: int = 50
    guidance: float | None = None  # None: PG-SB, kappa ~ U(guidance_range) per sample
    # PG-SB draws kappa ~ U(0.5, 4) on SD; on the shapes teacher the upper half of that range costs colour.
    guidance_range: tuple[float, float] = (0.5, 2.0)
    t_range: tuple[int, int] = (20, 980)  # inclusive
    lora_dropout: float = 0.1  # empty prompts in the LoRA teacher's step
    # LoRA-teacher updates per student update: DMD2's two time-scale rule (Yin et al. 2024,
    # arXiv:2405.14867, Sec. 4.1) keeps the student's score model current, so VSD's "away from
    # the student's own distribution" term is not stale and the student does not collapse to a mode.
    lora_updates: int = 5  # fewer let the LoRA teacher lag and the student lose diversity
    # Steps (counted in `steps`) in which only the LoRA teacher trains, on the starting student's samples:
    # from the teacher it equals the student already; from a warm start it has to catch up first.
    lora_warmup: int = 0
    ema_decay: float = 0.995  # ~200-step window: smooths single-t VSD noise, lags little
    grad_clip: float = 1.0
    save_every: int = 100
    seed: int = 8000
    # SwiftBrush v2's start (training/warm_start.py): the student first takes over a stronger one-step
    # model's map, then VSD refines it. None: the student starts as the teacher (SwiftBrush v1).
    warm_start: WarmStartConfig | None = None
    # What the student's UNet outputs at t = 999 (see STUDENT_PREDICTIONS). epsilon is SwiftBrush's own;
    # v_prediction is SD-Turbo's, which SwiftBrush v2 starts from.
    prediction: str = "epsilon"
    # DMD's regression loss (Yin et al. 2023, arXiv:2311.18828, Sec. 3.3), with the warm start's source as
    # the regression target on the step's own fresh noise: latent MSE to the source's one-step sample, at this
    # weight beside VSD. VSD alone trades the taken-over map's adherence for distribution; the anchor keeps
    # the map while VSD refines around it. 0: off.
    anchor_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.prediction == "flow" and self.warm_start is None:
            raise ValueError("prediction 'flow' needs warm_start: a flow student starts from an instaflow student's weights")
        if self.anchor_weight and self.warm_start is None:
            raise ValueError("anchor_weight needs warm_start: the anchor is the warm start's source model")
        if self.prediction not in STUDENT_PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(STUDENT_PREDICTIONS)}, got {self.prediction!r}")
        if self.lora_updates < 1:
            raise ValueError(f"lora_updates must be >= 1 (the LoRA teacher must follow the student), got {self.lora_updates}")


# ----- the VSD maths -----


def student_x0(
    unet: torch.nn.Module,
    z: torch.Tensor,
    embeds: torch.Tensor,
    abar_999: torch.Tensor,
    prediction: str = "epsilon",
) -> torch.Tensor:
    """The one-step sample from pure noise z (B, C, h, w), as the engine's `swiftbrush` sampler draws it.

    epsilon: x0 = (z - sqrt(1 - abar_999) eps(z, 999)) / sqrt(abar_999);
    v_prediction: x0 = sqrt(abar_999) z - sqrt(1 - abar_999) v(z, 999);
    flow: x0 = z + v(z, 1000), the rectified flow's one Euler step (abar_999 unused).
    """
    t = torch.full((z.shape[0],), float(student_timestep(prediction)))
    out = unet_eps(unet, z, t, embeds)
    if prediction == "flow":
        return z + out
    if prediction == "v_prediction":
        return abar_999.sqrt() * z - (1 - abar_999).sqrt() * out
    return (z - (1 - abar_999).sqrt() * out) / abar_999.sqrt()



def vsd_grad(eps_teacher: torch.Tensor, eps_lora: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """SwiftBrush eq. 6: the gradient on x0 is w(t) (eps_teacher - eps_lora) with w(t) = 1 - abar_t."""
    return (1 - abar_t).view(-1, 1, 1, 1) * (eps_teacher - eps_lora)


def vsd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x0, (x0 - grad).detach()): its gradient w.r.t. x0 is grad / x0.numel()."""
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def guidance_scales(n: int, cfg: SwiftBrushTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(n,) CFG scales shared by both teachers: PG-SB's kappa ~ U(lo, hi), or the fixed `guidance`."""
    if cfg.guidance is not None:
        return torch.full((n,), float(cfg.guidance))
    lo, hi = cfg.guidance_range
    return lo + (hi - lo) * torch.rand(n, generator=gen)


# ----- the training loop -----


@dataclass(frozen=True)
class StudentBatch:
    """Detached student samples with their prompt embeddings: what the LoRA teacher learns from."""

    x0: torch.Tensor
    embeds: torch.Tensor
    uncond: torch.Tensor


def student_vsd(
    teacher: Teacher,
    student: torch.nn.Module,
    guide: torch.nn.Module,
    prompts: list[str],
    cfg: SwiftBrushTrainConfig,
    gen: torch.Generator,
    source: torch.nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], StudentBatch]:
    """The student's losses and its samples: VSD at a random t, both teachers guided by the same scale,
    and with a `source` (an instaflow one-step UNet) the anchor, MSE to its sample from the same noise."""
    n = len(prompts)
    abar = teacher.alphas_cumprod
    embeds = teacher.encode_prompts(prompts)  # (B, L, C)
    uncond = teacher.empty_prompt_embeds.expand_as(embeds)
    z = torch.randn((n, *teacher.latent_shape), generator=gen)
    x0 = student_x0(student, z, embeds, abar[STUDENT_TIMESTEP], cfg.prediction)

    lo, hi = cfg.t_range
    t = torch.randint(lo, hi + 1, (n,), generator=gen)
    xt = add_noise(x0.detach(), torch.randn(x0.shape, generator=gen), abar[t])
    scale = guidance_scales(n, cfg, gen)
    with torch.no_grad():
        with adapters_off(guide):
            eps_teacher = cfg_eps(guide, xt, t, embeds, uncond, scale)
        eps_lora = cfg_eps(guide, xt, t, embeds, uncond, scale)
    losses = {"vsd": vsd_loss(x0, vsd_grad(eps_teacher, eps_lora, abar[t]))}
    if source is not None:
        with torch.no_grad():
            target = one_step(source, z, embeds)
        losses["anchor"] = F.mse_loss(x0, target)
    return losses, StudentBatch(x0.detach(), embeds, uncond)


def lora_loss(
    teacher: Teacher,
    guide: torch.nn.Module,
    batch: StudentBatch,
    cfg: SwiftBrushTrainConfig,
    gen: torch.Generator,
    rng: np.random.Generator,
) -> torch.Tensor:
    """The LoRA teacher's epsilon-MSE on the student's samples (fresh t and noise, some unconditioned).

    Its t range is VSD's: it only has to be right where the student's gradient asks it.
    """
    n = batch.x0.shape[0]
    lo, hi = cfg.t_range
    t = torch.randint(lo, hi + 1, (n,), generator=gen)
    noise = torch.randn(batch.x0.shape, generator=gen)
    drop = torch.from_numpy(rng.random(n) < cfg.lora_dropout).view(-1, 1, 1)
    xt = add_noise(batch.x0, noise, teacher.alphas_cumprod[t])
    return F.mse_loss(unet_eps(guide, xt, t, torch.where(drop, batch.uncond, batch.embeds)), noise)


@torch.no_grad()
def sample_grid(
    teacher: Teacher,
    unet: torch.nn.Module,
    prompts: Sequence[str] = PROBE_PROMPTS,
    seeds: int = 2,
    prediction: str = "epsilon",
) -> Image.Image:
    """One-step images, a row per seed and a column per prompt: the quick look at a student."""
    embeds = teacher.encode_prompts([p for _ in range(seeds) for p in prompts])
    z = torch.randn((len(embeds), *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    images = teacher.decode(student_x0(unet, z, embeds, teacher.alphas_cumprod[STUDENT_TIMESTEP], prediction))
    images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (B, 3, H, W)
    b, c, h, w = images.shape
    grid = (
        images.view(seeds, len(prompts), c, h, w)
        .permute(0, 3, 1, 4, 2)
        .reshape(seeds * h, len(prompts) * w, c)
    )
    return Image.fromarray(grid.numpy())


def train_swiftbrush(
    cfg: SwiftBrushTrainConfig,
    run_dir: str | Path,
    export_dir: str | Path | None,
    teacher_dir: str | Path = DEFAULT_TEACHER,
    progress: bool = True,
) -> dict:
    """Train (resuming from `run_dir`), write a probe grid at every save, export the EMA student. Returns a report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(teacher_dir)
    student = student_unet(teacher)
    warm_seconds = 0.0
    # The warm start's source, loaded once: the flow student's starting weights and the anchor's target.
    source = None
    if cfg.prediction == "flow" or cfg.anchor_weight:
        source = load_source(cfg.warm_start.source, teacher)
    if cfg.prediction == "flow":
        student.load_state_dict(source.state_dict())
    elif cfg.warm_start is not None:
        abar_999 = teacher.alphas_cumprod[STUDENT_TIMESTEP]
        started, warm_seconds = warm_start(
            teacher, lambda unet, z, embeds: student_x0(unet, z, embeds, abar_999, cfg.prediction), cfg.warm_start,
            run_dir / "warm_start", progress=progress,
        )  # fmt: skip
        student.load_state_dict(started.state_dict())
    guide = lora_teacher(teacher, cfg.lora_rank, cfg.lora_targets)
    anchor = source if cfg.anchor_weight else None
    ema = EMA(student, cfg.ema_decay)
    lora_params = [p for p in guide.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    lora_opt = torch.optim.AdamW(lora_params, lr=cfg.lora_lr, weight_decay=0.0)
    modules = {"student": student, "ema": ema.module, "lora": lora_weights(guide)}
    optimizers = {"student": opt, "lora": lora_opt}
    start = load_train_state(run_dir, modules, optimizers) or 0
    timer = Timer(run_dir)

    prompts = PromptSampler(cfg.seed + start)
    rng = np.random.default_rng(cfg.seed + start)
    gen = torch.Generator().manual_seed(cfg.seed + start)
    bar = tqdm(
        range(start, cfg.steps),
        desc="swiftbrush",
        disable=not progress,
        mininterval=5.0,
        initial=start,
        total=cfg.steps,
    )
    history: list[dict] = []
    for step in bar:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        set_lr(lora_opt, lr_at(step, cfg.steps, cfg.lora_lr, cfg.warmup))
        losses, batch = student_vsd(teacher, student, guide, prompts.draw(cfg.batch_size), cfg, gen, anchor)
        check_finite(step, **losses)
        vsd = losses["vsd"]
        if step >= cfg.lora_warmup:
            loss = vsd + cfg.anchor_weight * losses["anchor"] if anchor is not None else vsd
            optimizer_step(opt, loss, list(student.parameters()), cfg.grad_clip)
        for _ in range(cfg.lora_updates):  # the same samples, fresh t and noise each time
            lora = lora_loss(teacher, guide, batch, cfg, gen, rng)
            check_finite(step, lora=lora)
            optimizer_step(lora_opt, lora, lora_params, cfg.grad_clip)
        ema.update(student, step)
        history.append({"step": step + 1, **{k: v.item() for k, v in losses.items()}, "lora": lora.item()})
        bar.set_postfix(vsd=f"{vsd.item():.2e}", lora=f"{lora.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_train_state(run_dir, step + 1, modules, optimizers, config_dict(cfg))
            timer.save()
            (run_dir / "probes").mkdir(exist_ok=True)
            sample_grid(teacher, ema.module, prediction=cfg.prediction).save(run_dir / "probes" / f"step_{step + 1:05d}.png")
            with (run_dir / "losses.jsonl").open("a") as f:
                f.writelines(json.dumps(h) + "\n" for h in history)
            history = []

    seconds = timer.seconds + warm_seconds
    report = {"seconds": round(seconds), "warm_start_seconds": round(warm_seconds), "steps": cfg.steps,
              "config": config_dict(cfg)}  # fmt: skip
    if export_dir is not None:
        kind = f"fixed {cfg.guidance}" if cfg.guidance is not None else f"PG-SB kappa ~ U{cfg.guidance_range}"
        origin = {"start": "the teacher"}
        if cfg.prediction == "flow":
            origin = {"start": f"{Path(cfg.warm_start.source).name}'s weights, the same flow parameterisation (SwiftBrush v2)"}
        elif cfg.warm_start is not None:
            origin = {"start": f"{Path(cfg.warm_start.source).name}, taken over by regression (SwiftBrush v2)",
                     "warm_start": {**config_dict(cfg.warm_start), "source": Path(cfg.warm_start.source).name,
                                    "train_seconds": round(warm_seconds)}}  # fmt: skip
        config = FlashstepConfig(
            family="swiftbrush",
            prediction=cfg.prediction,
            default_steps=1,
            allowed_steps=(1,),
            timesteps={"1": [student_timestep(cfg.prediction)]},
            conditioning_timestep=student_timestep(cfg.prediction),
            default_guidance_scale=0.0,
            nasa_alpha=0.1,
            resolution=teacher.config.resolution,
            provenance=Provenance(
                "swiftbrush VSD, image-free",
                teacher.folder.name,
                cfg.steps,
                cfg.batch_size,
                seconds,
                {
                    **origin,
                    "lr": cfg.lr,
                    "prediction": cfg.prediction,
                    "anchor_weight": cfg.anchor_weight,
                    "guidance": kind,
                    "lora_rank": cfg.lora_rank,
                    "lora_updates": cfg.lora_updates,
                    "ema_decay": cfg.ema_decay,
                },
            ).to_dict(),
        )
        export_student(export_dir, teacher, ema.module, config)
    (run_dir / "swiftbrush_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
