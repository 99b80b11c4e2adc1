"""`flashstep train hypersd-refine --student FOLDER`: Hyper-SD's score distillation for one step.

Hyper-SD Sec. 3.3 (DMD) on an exported hypersd LoRA: it keeps training on the k = 1 TSCD loss
(`training/tscd.py`) while `training.distribution_matching` pulls its 1-step samples onto the guided
teacher's distribution. With `regression`, DMD's own regression loss joins them, on teacher ODE
pairs, on a one-step instaflow student's samples of fresh noise (`SourceRegressionConfig`) or on the
LoRA's own samples touched up by the teacher (`SelfRegressionConfig`); `one_step_timestep` moves
where the 1-step sample feeds pure noise (Hyper-SD's one-step UNet: 800). The human-feedback stage
(Sec. 3.2) is left out: it needs reward models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.schedule import trailing_timesteps
from flashstep.training.checkpointing import EMA, config_dict, load_train_state, save_train_state
from flashstep.training.data import captions_for_labels
from flashstep.training.distill import (
    DEFAULT_TEACHER,
    PromptSampler,
    Teacher,
    Timer,
    ddim_jump,
    load_teacher,
    lr_at,
    optimizer_step,
    set_lr,
    unet_eps,
)
from flashstep.training.distribution_matching import DistributionMatching, DistributionMatchingConfig
from flashstep.training.export import git_commit
from flashstep.training.judge import Judge
from flashstep.training.lora import lora_weights
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.rectified_flow import InstaFlowTrainConfig, generate_pairs, load_pairs
from flashstep.training.rectified_flow import one_step as instaflow_one_step
from flashstep.training.teacher_refinement import TeacherRefinement, refine_with_teacher
from flashstep.training.tscd import (
    SERVED_STEPS,
    HyperSDTrainConfig,
    export_hypersd,
    load_lora_student,
    one_step_sample,
    training_latents,
    tscd_loss,
)
from flashstep.training.warm_start import load_source

__all__ = ["TINY", "HyperSDRefineConfig", "refine_hypersd"]

# Smoke-run sizes (`flashstep train hypersd-refine --tiny`); `TINY_PAIRS` for its pair regression.
TINY = dict(steps=2, latents=8, batch_size=2, save_every=1)
TINY_PAIRS = dict(pairs=4, pair_start=0)



@dataclass(frozen=True, kw_only=True)
class RegressionWeights:
    """DMD's regression loss (Yin et al. 2023, arXiv:2311.18828, Sec. 3.3) on the 1-step sample, as weighed:
    latent MSE plus the judge-feature perceptual loss, which stands in for DMD's LPIPS. DMD weighs the term
    0.25 against distribution matching's 1. What it regresses onto is the subclass's to say."""

    weight: float = 0.25
    perceptual_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("weight", "perceptual_weight"):  # a negative weight would push the sample away from its target
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0 but is {getattr(self, name)}")


@dataclass(frozen=True)
class PairRegressionConfig(RegressionWeights):
    """The regression term on teacher ODE pairs: noise z and the guided teacher's DPM-Solver++ endpoint from
    it (the pairs instaflow trains on, generated the same way and seeded by index) tie the 1-step map to
    the teacher's own."""

    pairs: int = 12288
    pair_start: int = 0
    bf16: bool = False  # the pairs' teacher runs under bfloat16 autocast

    @property
    def recipe(self) -> str:
        return "regression on teacher ODE pairs"


@dataclass(frozen=True)
class SourceRegressionConfig(RegressionWeights):
    """The regression term with a one-step instaflow student's map as its target instead of teacher ODE pairs.

    InstaFlow's finding (Liu et al. 2023, arXiv:2309.06380, Sec. 3): a one-step student distils far
    better from the reflowed (straightened) coupling than from the teacher's own, whose noise-to-image
    map is harder to fit in one step. The shipped `shapes-instaflow` is that map already distilled, so
    its sample of fresh noise is the target: one UNet call per sample, never repeating (the take-over
    `training.warm_start` uses), with the same latent MSE + judge-feature perceptual loss as the pairs.
    With `refine`, the teacher touches each target up first (`training.teacher_refinement`): the LoRA
    had levelled off ~0.05 below its source, so a source nearer the teacher raises what it levels at.
    """

    source: str  # folder of a one-step instaflow student
    refine: TeacherRefinement | None = None  # None: the source's sample as it is

    @property
    def recipe(self) -> str:
        refined = f", {self.refine.recipe}" if self.refine is not None else ""
        return f"regression on {Path(self.source).name}'s one-step samples{refined}"


@dataclass(frozen=True)
class SelfRegressionConfig(RegressionWeights):
    """The regression term with the LoRA's own one-step sample of fresh noise, touched up by the teacher, as
    its target: the self-refinement that lifted the full-UNet instaflow students (`InstaFlowTrainConfig.
    self_refine`), here for the LoRA.

    Onto a source's map (`SourceRegressionConfig`) the LoRA has to bend its own map into another network's,
    which its rank may not reach. Its own sample, refined, differs from what it already draws only where the teacher
    corrects it (colour and shape at the attribute level), so every step's target is within its reach and
    no second network is run: one LoRA call and the refinement's teacher steps per sample.
    """

    refine: TeacherRefinement = TeacherRefinement()
    # The served step counts whose samples it regresses, one drawn per batch. (1,) trains the one-step map
    # alone, and nothing then asks the later steps of a k-step sample to draw what the prompt names. With
    # k > 1 the first
    # k - 1 served TCD steps run without gradient and the last one, at the k-step grid's last timestep, is
    # regressed onto the teacher's touch-up of the k-step sample.
    sample_steps: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sample_steps or any(k not in SERVED_STEPS for k in self.sample_steps):
            raise ValueError(f"`sample_steps` must list served step counts {list(SERVED_STEPS)} but is {list(self.sample_steps)}")

    @property
    def recipe(self) -> str:
        counts = "one-step" if self.sample_steps == (1,) else "/".join(map(str, self.sample_steps)) + "-step"
        return f"regression on its own {counts} samples, {self.refine.recipe}"


@dataclass(frozen=True)
class HyperSDRefineConfig:
    """Hyper-SD's third stage on an exported LoRA: DMD on the 1-step samples, the k = 1 TSCD loss beside it.

    The consistency loss on real latents keeps the unified LoRA's multi-step jumps in place while the
    distribution-matching term (training.distribution_matching) sharpens what one step draws.
    """

    steps: int = 1500
    # The timestep the 1-step sample feeds pure noise at; None keeps the student's (its flashstep.json).
    # Hyper-SD serves its SDXL one-step UNet at 800, not 999 (its model card: `timesteps=[800]`): x0 =
    # (z - sqrt(1 - abar) eps) / sqrt(abar) divides by sqrt(abar_800) = 0.19 there instead of
    # sqrt(abar_999) = 0.068, so an error in eps reaches the image 3x less amplified.
    one_step_timestep: int | None = None
    regression: PairRegressionConfig | SourceRegressionConfig | SelfRegressionConfig | None = None  # None: none
    # The k = 1 TSCD loss keeps the multi-step jumps; 0 drops it, for a LoRA that serves one step only (Hyper-SD
    # ships per-step-count LoRAs beside its unified one). The thought: at the one-step timestep a real x_t and
    # pure noise have the same variance, so reading x0 out of x_t (TSCD) and ignoring what looks like x0 in z
    # (the one-step sample) pull the same weights apart. Without TSCD the 2- to 8-step samples degrade.
    tscd_weight: float = 1.0
    rank: int | None = None  # widen the student's LoRA to this rank first (None keeps its own)
    export_rank: int | None = None  # store the trained LoRA at this lower rank (`low_rank_lora`); None: as trained
    latents: int = HyperSDTrainConfig.latents  # the recipe's real scenes (the same seed, so its cache is reused)
    batch_size: int = 32
    lr: float = 2e-4  # a fifth of TSCD's: the LoRA is trained already
    warmup: int = 50
    matching: DistributionMatchingConfig | None = DistributionMatchingConfig()  # None: no DMD term (regression only)
    # Export an exponential moving average of the LoRA instead of its last weights; None exports them as trained.
    # An average over the last ~1 / (1 - decay) steps removes a leg's step-to-step wander. No warm-up
    # (`EMA`'s cap would hold a short leg's decay near its cap whatever the decay asked for), so the
    # average starts at the student's LoRA and weighs it decay ** steps at the end.
    ema_decay: float | None = None
    save_every: int = 100
    # The leg's noise and prompts. Legs of one chain on the same seed revisit the same batches; a chain
    # whose legs each take their own sees fresh noise throughout, as served noise is.
    seed: int = 9500

    def __post_init__(self) -> None:
        if self.one_step_timestep is not None and not 1 <= self.one_step_timestep <= 999:
            raise ValueError(f"`one_step_timestep` must be in [1, 999] but is {self.one_step_timestep}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"`rank` must be a positive integer but is {self.rank}")
        if self.export_rank is not None and self.export_rank < 1:
            raise ValueError(f"`export_rank` must be a positive integer but is {self.export_rank}")
        if self.tscd_weight < 0:
            raise ValueError(f"`tscd_weight` must be >= 0 but is {self.tscd_weight}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in (0, 1) but is {self.ema_decay}")
        if (not self.tscd_weight and isinstance(self.regression, SelfRegressionConfig)
                and self.regression.sample_steps != (1,)):  # fmt: skip
            raise ValueError(
                f"`regression.sample_steps` {list(self.regression.sample_steps)} trains multi-step samples, but a leg "
                "with `tscd_weight` 0 exports a one-step LoRA; keep the TSCD term or train (1,) only"
            )
        if not self.tscd_weight and self.matching is None and self.regression is None:
            raise ValueError("a leg with `tscd_weight` 0, no `matching` and no `regression` has no loss to train on")



def regression_loss(
    cfg: RegressionWeights, perceptual: JudgePerceptual, pred: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """DMD's regression loss at the term's weight: latent MSE + the judge-feature perceptual distance."""
    return cfg.weight * (F.mse_loss(pred, target) + cfg.perceptual_weight * perceptual(pred, target))


class PairRegression:
    """The regression term of `PairRegressionConfig`: its pairs (generated where missing) and its loss."""

    def __init__(self, teacher: Teacher, cfg: PairRegressionConfig, folder: Path, judge: Judge | None, progress: bool) -> None:
        pair_cfg = InstaFlowTrainConfig(pairs=cfg.pairs, pair_start=cfg.pair_start, bf16=cfg.bf16)
        timer = Timer(folder)
        generate_pairs(teacher, pair_cfg, folder, progress=progress)
        timer.save()
        self.seconds = timer.seconds
        self.z, self.x, self.captions = load_pairs(folder, pair_cfg)
        self.teacher, self.cfg = teacher, cfg
        self.perceptual = JudgePerceptual(teacher, judge or Judge.load())

    def loss(self, unet: torch.nn.Module, timestep: int, rng: np.random.Generator, batch_size: int = 32) -> torch.Tensor:
        """Weighted latent MSE + perceptual distance between the 1-step samples of a pair batch's z and its x."""
        idx = rng.integers(0, len(self.z), min(batch_size, len(self.z)))
        embeds = self.teacher.encode_prompts([self.captions[i] for i in idx])
        pred = one_step_sample(unet, self.z[idx], embeds, self.teacher.alphas_cumprod, timestep)
        return regression_loss(self.cfg, self.perceptual, pred, self.x[idx])


class SourceRegression:
    """The regression term of `SourceRegressionConfig`: the source's one-step sample of fresh noise as target."""

    def __init__(self, teacher: Teacher, cfg: SourceRegressionConfig, judge: Judge | None, seed: int) -> None:
        self.source = load_source(cfg.source, teacher)
        self.teacher, self.cfg = teacher, cfg
        self.prompts = PromptSampler(seed)
        self.perceptual = JudgePerceptual(teacher, judge or Judge.load())

    def loss(self, unet: torch.nn.Module, timestep: int, rng: np.random.Generator, batch_size: int = 32) -> torch.Tensor:
        """Weighted latent MSE + perceptual distance between the student's and the source's 1-step samples of one z."""
        embeds = self.teacher.encode_prompts(self.prompts.draw(batch_size))
        z = torch.from_numpy(rng.standard_normal((batch_size, *self.teacher.latent_shape), dtype=np.float32))
        with torch.no_grad():
            target = instaflow_one_step(self.source, z, embeds)
        if self.cfg.refine is not None:
            target = refine_with_teacher(self.teacher, target, z, embeds, self.cfg.refine)
        pred = one_step_sample(unet, z, embeds, self.teacher.alphas_cumprod, timestep)
        return regression_loss(self.cfg, self.perceptual, pred, target)


@torch.no_grad()
def tcd_steps_before_last(
    unet: torch.nn.Module, z: torch.Tensor, embeds: torch.Tensor, alphas_cumprod: torch.Tensor,
    timesteps: list[int], eta: float, rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The served TCD sampler (`models.families.hypersd.sample_tcd`) from pure noise z, all steps but the last:
    x at `timesteps[-1]` and the fresh noise of its last re-noising (z itself for a single timestep).

    Step t -> t': predict x0, DDIM to s = floor((1 - eta) t'), re-noise from s up to t'.
    """
    x, noise = z, z
    for t, t_next in zip(timesteps[:-1], timesteps[1:], strict=True):
        s = int((1.0 - eta) * t_next)
        n = len(x)
        x = ddim_jump(x, unet_eps(unet, x, torch.full((n,), t, dtype=torch.long), embeds),
                      alphas_cumprod[t].expand(n), alphas_cumprod[s].expand(n))  # fmt: skip
        ratio = alphas_cumprod[t_next] / alphas_cumprod[s]
        noise = torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32))
        x = ratio.sqrt() * x + (1 - ratio).sqrt() * noise
    return x, noise


class SelfRegression:
    """The regression term of `SelfRegressionConfig`: the LoRA's own sample of fresh noise, refined, as target."""

    def __init__(self, teacher: Teacher, cfg: SelfRegressionConfig, judge: Judge | None, seed: int, eta: float = 1.0) -> None:
        self.teacher, self.cfg, self.eta = teacher, cfg, eta  # eta: the LoRA's served TCD eta, for k > 1
        self.prompts = PromptSampler(seed)
        self.perceptual = JudgePerceptual(teacher, judge or Judge.load())

    def loss(self, unet: torch.nn.Module, timestep: int, rng: np.random.Generator, batch_size: int = 32) -> torch.Tensor:
        """Weighted latent MSE + perceptual distance between the LoRA's k-step sample of z (k from `sample_steps`,
        one step fed at `timestep`) and the teacher's touch-up of that same sample (detached: the target is a
        fixed point to move toward, not a path for gradients), re-noised with the last step's noise."""
        embeds = self.teacher.encode_prompts(self.prompts.draw(batch_size))
        z = torch.from_numpy(rng.standard_normal((batch_size, *self.teacher.latent_shape), dtype=np.float32))
        steps = self.cfg.sample_steps
        # One count draws nothing, so a (1,) leg sees the same noise as before the counts existed (its chains rerun as shipped).
        k = steps[0] if len(steps) == 1 else int(rng.choice(steps))
        grid = [timestep] if k == 1 else trailing_timesteps(k, len(self.teacher.alphas_cumprod))
        x, noise = tcd_steps_before_last(unet, z, embeds, self.teacher.alphas_cumprod, grid, self.eta, rng)
        pred = one_step_sample(unet, x, embeds, self.teacher.alphas_cumprod, grid[-1])
        target = refine_with_teacher(self.teacher, pred.detach(), noise, embeds, self.cfg.refine)
        return regression_loss(self.cfg, self.perceptual, pred, target)


def leg_recipe(cfg: HyperSDRefineConfig) -> str:
    """The leg's loss terms, for its provenance: e.g. "k=1 TSCD + regression on teacher ODE pairs"."""
    terms = ["k=1 TSCD"] if cfg.tscd_weight else []
    terms += ["DMD on 1-step samples"] if cfg.matching is not None else []
    terms += [cfg.regression.recipe] if cfg.regression is not None else []
    return " + ".join(terms)


def refine_hypersd(
    cfg: HyperSDRefineConfig,
    run_dir: str | Path,
    student_dir: str | Path,
    export_dir: str | Path,
    teacher_dir: str | Path = DEFAULT_TEACHER,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict:
    """Continue an exported hypersd LoRA with k = 1 TSCD + DMD on its 1-step samples (and with `cfg.regression`,
    DMD's regression on teacher ODE pairs); export with the leg recorded."""
    run_dir, student_dir = Path(run_dir), Path(student_dir)
    student_cfg = FlashstepConfig.load(student_dir)
    if student_cfg.family != "hypersd" or student_cfg.lora is None:
        raise ValueError(f"{student_dir} is not a hypersd LoRA folder (family {student_cfg.family})")
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(teacher_dir)
    unet, base = load_lora_student(teacher, student_dir, cfg.rank)
    if cfg.export_rank is not None and cfg.export_rank > base.rank:
        raise ValueError(f"`export_rank` {cfg.export_rank} is above the rank {base.rank} the leg trains at")
    one_step_t = cfg.one_step_timestep or int(student_cfg.timesteps.get("1", [999])[0])
    latents, labels = training_latents(teacher, cfg.latents, base.seed, run_dir / "latents", progress)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    matching = DistributionMatching(teacher, cfg.matching) if cfg.matching is not None else None
    extra_modules, extra_opts = matching.state() if matching is not None else ({}, {})
    lora = lora_weights(unet)
    ema = EMA(lora, cfg.ema_decay, warmup=False) if cfg.ema_decay is not None else None  # the LoRA starts trained
    modules = {"lora": lora, **({"ema": ema.module} if ema is not None else {}), **extra_modules}
    optimizers = {"lora": opt, **extra_opts}
    state_dir = run_dir / "refine"
    start = load_train_state(state_dir, modules, optimizers) or 0
    # Seeded past `start`, as rng is: a resumed leg draws prompts it has not trained on yet.
    if isinstance(cfg.regression, SourceRegressionConfig):
        regression = SourceRegression(teacher, cfg.regression, judge, cfg.seed + start)
    elif isinstance(cfg.regression, SelfRegressionConfig):
        regression = SelfRegression(teacher, cfg.regression, judge, cfg.seed + start, eta=student_cfg.eta)
    elif cfg.regression is not None:
        regression = PairRegression(teacher, cfg.regression, run_dir / "pairs", judge, progress)
    else:
        regression = None
    timer = Timer(state_dir)
    rng = np.random.default_rng(cfg.seed + start)
    gen = torch.Generator().manual_seed(cfg.seed + start)
    uncond = teacher.empty_prompt_embeds.expand(cfg.batch_size, -1, -1)
    bar = tqdm(range(start, cfg.steps), desc="hypersd-refine", disable=not progress, mininterval=5.0,
               initial=start, total=cfg.steps)  # fmt: skip
    for step in bar:
        set_lr(opt, lr_at(step, cfg.steps, cfg.lr, cfg.warmup))
        idx = rng.integers(0, len(latents), cfg.batch_size)
        cond = teacher.encode_prompts(captions_for_labels(labels[idx], rng, base.cond_dropout))
        real = latents[idx]
        loss = torch.zeros(())
        if cfg.tscd_weight:
            loss = cfg.tscd_weight * tscd_loss(unet, teacher.unet, teacher.alphas_cumprod, real, cond, uncond, 1, base, gen)
        if matching is not None:
            x = one_step_sample(unet, torch.randn(real.shape, generator=gen), cond, teacher.alphas_cumprod, one_step_t)
            if step >= matching.cfg.fake_warmup:
                loss = loss + matching.cfg.weight * matching.loss(x, cond, gen)
            matching.fit(x, cond, gen)
        if regression is not None:
            loss = loss + regression.loss(unet, one_step_t, rng, cfg.batch_size)
        if loss.requires_grad:  # a one-step-only leg with no regression has nothing to train during the warm-up
            optimizer_step(opt, loss, params)
        if ema is not None:
            ema.update(lora, step)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_train_state(state_dir, step + 1, modules, optimizers, config_dict(cfg))
            timer.save()

    provenance = dict(student_cfg.provenance)
    leg = {"student": student_dir.name, "steps": cfg.steps, "lr": cfg.lr, "recipe": leg_recipe(cfg),
           "one_step_timestep": one_step_t, "tscd_weight": cfg.tscd_weight, "rank": base.rank, "export_rank": cfg.export_rank or base.rank,
           "distribution_matching": config_dict(cfg.matching) if cfg.matching is not None else None, "ema_decay": cfg.ema_decay,
           "train_seconds": round(timer.seconds), "seed": cfg.seed,
           "commit": git_commit()}  # fmt: skip
    if regression is not None:
        leg["regression"] = config_dict(cfg.regression)
        if isinstance(regression, PairRegression):
            leg["regression"]["pairs_seconds"] = round(regression.seconds)
    provenance["refinements"] = [*provenance.get("refinements", []), leg]
    # Without the TSCD term nothing holds the 2-, 4- and 8-step jumps in place, so the export serves one step only.
    served = SERVED_STEPS if cfg.tscd_weight else (1,)
    base = replace(base, default_steps=student_cfg.default_steps if cfg.tscd_weight else 1, eta=student_cfg.eta)
    if ema is not None:  # the export reads the LoRA from the UNet, whose parameters `lora` shares
        with torch.no_grad():
            for p, e in zip(lora.parameters(), ema.module.parameters(), strict=True):
                p.copy_(e)
    export_hypersd(
        export_dir, unet, teacher, base, provenance, one_step_timestep=one_step_t, rank=cfg.export_rank, served_steps=served
    )
    report = {"refine_seconds": round(timer.seconds), "config": config_dict(cfg)}
    (run_dir / "refine_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
