"""`flashstep train hypersd`: trajectory-segmented consistency distillation (TSCD) into a LoRA.

Hyper-SD (Ren et al. 2024, arXiv:2404.13686, Sec. 3.1) at toy scale. The time axis [0, T) is cut
into k equal segments whose boundaries are the served trailing timesteps (for k = 4:
0 | 249 | 499 | 749 | 999). Within a segment the student learns the consistency map to the
segment's lower boundary s: from x_t it predicts eps, takes x0 and jumps deterministically to s
(a DDIM jump). The target is the same map from one teacher DDIM step further down the
trajectory, x_{t'} with t' = t - T/N (N = 50, the LCM/TCD solver grid), taken by the target
network. k goes 8 -> 4 -> 2 -> 1, each stage with its own steps, the LoRA carried across
stages; after k = 1 every t maps to x0, which is what 1-step sampling asks for, while the earlier
stages leave the LoRA's jumps to 749/499/249 aligned with the multi-step schedules.

Choices, and why:
- **Data**: real latents (training scenes, held-out pairs excluded, encoded once by the
  teacher's VAE and cached in the run folder), noised to x_t. Hyper-SD distils on real
  image-text pairs; a fresh caption of the same attributes is drawn each time a latent is used.
- **Student**: a PEFT LoRA (alpha = rank, so flashstep's fuse and diffusers' loader agree
  without an `alpha` key) on the attention projections, the transformer ff/proj layers and the
  resnet/resampling convs, the module set of public LCM-/Hyper-SD SD1.5 LoRAs. At this size the
  convs hold most of the UNet's weights; without them a 1-step map has little to change.
- **Teacher**: the frozen teacher UNet (a separate module, so its calls pay no LoRA cost), one
  DDIM step with classifier-free guidance at the teacher's default scale 4.0; the student
  serves at guidance 0, so it absorbs the guided trajectory.
- **Target network**: the student itself under stop-gradient (EMA decay 0), as diffusers'
  LCM-LoRA recipe does and as improved consistency training (Song & Dhariwal 2023, Sec. 3.2)
  recommends; an EMA lags the target by ~1 / (1 - decay) steps, which a run of a few thousand
  steps cannot spare, and keeping one would double the LoRA state.
- **Loss**: MSE between the two x_s in latent space (the paper's consistency term; its
  adversarial term is left out).

Exported as a LoRA folder (`flashstep.json` + the diffusers LoRA file) naming the teacher as
its base: the engine fuses the LoRA at scale 1 and samples with TCD or DDIM-trailing at
guidance 0.

`refine_hypersd` (`flashstep train hypersd-refine --student FOLDER`) is the paper's score
distillation for one step (Sec. 3.3, DMD): an exported LoRA keeps training on the k = 1 TSCD
loss while `training.distribution_matching` pulls its 1-step samples onto the guided teacher's
distribution. With `regression`, DMD's own regression loss joins them, on teacher ODE pairs or, with
a `SourceRegressionConfig`, on a one-step instaflow student's samples of fresh noise; and
`one_step_timestep` moves where the 1-step sample feeds pure noise (Hyper-SD's one-step UNet: 800).
The human-feedback stage (Sec. 3.2) is left out: it needs reward models.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.flashstep_config import FlashstepConfig
from models.lora import LoraLayer
from models.registry import discover
from models.schedule import trailing_timesteps
from training.checkpointing import EMA, config_dict, load_train_state, save_train_state
from training.data import render_dataset
from training.distill import (
    DEFAULT_TEACHER,
    HYBRID_GUIDANCE_SCALE,
    PromptSampler,
    Provenance,
    Teacher,
    Timer,
    cfg_eps,
    ddim_jump,
    load_teacher,
    lr_at,
    optimizer_step,
    set_lr,
    student_unet,
    unet_eps,
)
from training.distribution_matching import DistributionMatching, DistributionMatchingConfig
from training.export import git_commit
from training.instaflow import InstaFlowTrainConfig, JudgePerceptual, generate_pairs, load_pairs
from training.instaflow import one_step as instaflow_one_step
from training.judge import Judge
from training.swiftbrush import lora_weights
from training.teacher import captions_for_labels, encode_latents
from training.teacher_refinement import TeacherRefinement, refine_with_teacher

# Diffusers' default LoRA file name: `pipe.load_lora_weights(folder)` finds it without `weight_name`.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The module set of public SD1.5 LCM-/Hyper-SD LoRAs (PEFT matches these as name suffixes).
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
SERVED_STEPS = (1, 2, 4, 8)
LATENTS_FILE = "latents.safetensors"


@dataclass(frozen=True)
class HyperSDTrainConfig:
    """The defaults made the shipped `shapes-hypersd`: 12 minutes on one thread beside two other runs
    (~0.5 s a step at batch 32 x 1,400 steps, plus ~1 min to render and encode the latents).
    Batch 32 rather than 64 buys more updates, which consistency propagation needs more than
    gradient precision; k = 1, the map the 1-step model runs, gets most of the steps (400 left
    its 1-step images blurred)."""

    latents: int = 8192  # real training scenes, VAE-encoded once (~14 ms an image)
    segments: tuple[int, ...] = (8, 4, 2, 1)  # k per stage
    stage_steps: tuple[int, ...] = (100, 100, 200, 1000)  # optimizer steps per stage
    solver_steps: int = 50  # N: the teacher's DDIM grid t_n = n T/N - 1, one step is T/N
    guidance_scale: float = 4.0  # teacher CFG (its served default)
    rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    batch_size: int = 32
    lr: float = 1e-3  # beat 5e-4 in two 130-step probes (lower k=1 loss, right colours at 2 steps)
    warmup: int = 50  # per stage
    cond_dropout: float = 0.1
    eta: float = 1.0  # TCD eta in flashstep.json: k = 1 trains x0 maps, so re-noise fully between steps
    default_steps: int = 2  # flashstep.json's default, one of 1, 2, 4, 8: 2 steps doubles 1-step adherence on ShapesBench
    save_every: int = 100
    seed: int = 9000

    def __post_init__(self) -> None:
        if len(self.segments) != len(self.stage_steps):
            raise ValueError(
                f"`stage_steps` needs one entry per stage of `segments` {list(self.segments)} but is {list(self.stage_steps)}"
            )
        if any(k < 1 for k in self.segments):
            raise ValueError(f"`segments` must be positive integers but is {list(self.segments)}")
        if self.default_steps not in SERVED_STEPS:
            raise ValueError(
                f"`default_steps` must be one of {list(SERVED_STEPS)} but is {self.default_steps}"
            )


# ----- the TSCD maths -----


def segment_boundaries(k: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The k segments' lower boundaries, ascending: 0 and the trailing timesteps below 999.

    k = 4 -> [0, 249, 499, 749]: the timesteps a 4-step trailing sampler visits after 999, so
    a jump to a boundary is exactly one served step.
    """
    return torch.tensor([0, *sorted(trailing_timesteps(k, num_train_timesteps)[1:])], dtype=torch.long)


def segment_start(t: torch.Tensor, k: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Per sample, the boundary s the consistency map from t aims at: the largest boundary below t.

    A t on a boundary (749 for k = 4) belongs to the segment below it, as the served sampler
    calls the model at 749 and jumps to 499. t (B,) long, t >= 1 -> s (B,) long.
    """
    bounds = segment_boundaries(k, num_train_timesteps)
    below = torch.searchsorted(bounds, t, right=False)  # number of boundaries < t
    return bounds[below - 1]


def solver_timesteps(solver_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The teacher's DDIM grid t_n = n T/N - 1, n = 1..N (19, 39, ..., 999 for N = 50), as in LCM/TCD."""
    step = num_train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1, dtype=torch.long) * step - 1


def tscd_loss(
    student: torch.nn.Module,
    teacher_unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    k: int,
    cfg: HyperSDTrainConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """One TSCD loss for k segments on real latents x0 (B, 4, h, w) with text states cond (B, L, C).

    t on the solver grid; s its segment's boundary; t' = max(t - T/N, s) so the teacher never
    steps past the boundary. Student: x_t -> s. Target (no grad): the teacher's CFG DDIM step
    x_t -> x_{t'}, then the stop-grad student x_{t'} -> s; when t' = s the teacher's x_s is the
    target itself (the consistency boundary condition).
    """
    num_train = alphas_cumprod.shape[0]
    grid = solver_timesteps(cfg.solver_steps, num_train)
    t = grid[torch.randint(len(grid), (x0.shape[0],), generator=gen)]  # (B,)
    s = segment_start(t, k, num_train)
    t_prev = torch.maximum(t - num_train // cfg.solver_steps, s)
    noise = torch.randn(x0.shape, generator=gen)
    a_t = alphas_cumprod[t]
    x_t = a_t.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_t).sqrt().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        eps_teacher = cfg_eps(teacher_unet, x_t, t, cond, uncond, cfg.guidance_scale)
        x_prev = ddim_jump(x_t, eps_teacher, a_t, alphas_cumprod[t_prev])
        eps_target = unet_eps(student, x_prev, t_prev, cond)
        target = ddim_jump(x_prev, eps_target, alphas_cumprod[t_prev], alphas_cumprod[s])
        target = torch.where((t_prev == s).view(-1, 1, 1, 1), x_prev, target)
    pred = ddim_jump(x_t, unet_eps(student, x_t, t, cond), a_t, alphas_cumprod[s])
    return F.mse_loss(pred, target)


def stage_of(step: int, stage_steps: tuple[int, ...]) -> tuple[int, int]:
    """Global step -> (stage index, step within that stage)."""
    for i, n in enumerate(stage_steps):
        if step < n:
            return i, step
        step -= n
    raise ValueError(f"step is past the last stage of `stage_steps` {list(stage_steps)}")


# ----- data -----


def training_latents(
    teacher: Teacher, n: int, seed: int, folder: Path, progress: bool = True
) -> tuple[torch.Tensor, np.ndarray]:
    """Latents (n, 4, h, w) and attribute labels (n, 5) of training scenes seed..seed+n-1, cached in `folder`."""
    path = folder / LATENTS_FILE
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if (int(meta["n"]), int(meta["seed"])) == (n, seed):
                return f.get_tensor("latents"), f.get_tensor("labels").numpy()
    folder.mkdir(parents=True, exist_ok=True)
    data = render_dataset(n, seed, progress=progress)
    latents = encode_latents(teacher.vae, data.images, progress=progress)
    tmp = path.with_suffix(".tmp")
    save_file(
        {"latents": latents.contiguous(), "labels": torch.from_numpy(data.labels)},
        str(tmp),
        metadata={"n": str(n), "seed": str(seed)},
    )
    tmp.rename(path)
    return latents, data.labels


# ----- the LoRA and its export -----


def lora_config(cfg: HyperSDTrainConfig) -> LoraConfig:
    """alpha = rank: the update is B @ A unscaled, as read back by loaders that see no `alpha` key."""
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.rank, target_modules=list(cfg.lora_targets), init_lora_weights="gaussian"
    )


def lora_student(teacher: Teacher, cfg: HyperSDTrainConfig) -> UNet2DConditionModel:
    """A copy of the teacher's UNet, frozen, with a trainable LoRA (B = 0: it starts as the teacher)."""
    unet = student_unet(teacher).requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    return unet


def low_rank_lora(layers: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Each module's update B @ A cut to its best rank-`rank` approximation (Eckart-Young: the top singular
    directions of the product, sqrt(S) split between the factors), as LoRA resizing tools do.

    Training wide and storing narrow: a rank-32 leg of the shipped LoRA kept all but 1.4% of every layer's
    update energy at rank 16, where the file fits the shipped-set budget. Keys as PEFT's state dict; A is
    (r, in, ...) and B (out, r, ...), convolutions included (A's kernel is flattened into the columns).
    """
    if rank < 1:
        raise ValueError(f"`rank` must be a positive integer but is {rank}")
    out = {}
    for key_a in (k for k in layers if "lora_A" in k):
        key_b = key_a.replace("lora_A", "lora_B")
        a, b = layers[key_a], layers[key_b]
        if rank > a.shape[0]:
            raise ValueError(f"`rank` {rank} is above the LoRA's own rank {a.shape[0]} ({key_a})")
        update = LoraLayer("unet", key_a, down=a, up=b).delta().flatten(1)  # alpha = rank: B @ A unscaled
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        keep = min(rank, s.shape[0])  # a module narrower than `rank` has fewer directions: pad with zeros
        root = s[:keep].sqrt()
        new_a, new_b = a.new_zeros(rank, vh.shape[1]), b.new_zeros(b.shape[0], rank)
        new_a[:keep], new_b[:, :keep] = root[:, None] * vh[:keep], u[:, :keep] * root
        out[key_a] = new_a.reshape(rank, *a.shape[1:])
        out[key_b] = new_b.reshape(b.shape[0], rank, *b.shape[2:])
    return out


def base_reference(teacher_folder: Path, export_dir: Path) -> str:
    """How flashstep.json names the base: the teacher's model name when a models root holding the export
    resolves that name to it (a shipped teacher, or a sibling of the export), else its absolute path."""
    name = teacher_folder.name
    found = discover(export_dir.parent).get(name)
    if found is not None and found.resolve() == teacher_folder.resolve():
        return name
    return str(teacher_folder.resolve())


def export_hypersd(
    folder: str | Path,
    unet: UNet2DConditionModel,
    teacher: Teacher,
    cfg: HyperSDTrainConfig,
    provenance: dict,
    one_step_timestep: int = 999,
    rank: int | None = None,
    served_steps: tuple[int, ...] = SERVED_STEPS,
) -> Path:
    """Write `folder` with only flashstep.json and the diffusers/PEFT LoRA file (`unet.`-prefixed keys).

    Every step count samples on the trailing timesteps but one step, which starts at `one_step_timestep`.
    A `rank` below the trained one stores `low_rank_lora`'s best approximation at that rank. `served_steps`
    narrows the step counts the folder allows (a LoRA trained for one step only serves one step).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().float() for k, v in get_peft_model_state_dict(unet).items()}
    rank = cfg.rank if rank is None else rank
    if rank != cfg.rank:
        layers = low_rank_lora(layers, rank)
    # fp16 on disk halves the file (the shipped set must stay under 40 MB); loaders upcast on CPU.
    layers = {k: v.half().contiguous() for k, v in layers.items()}
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata={
            "r": rank,
            "lora_alpha": rank,
            "target_modules": list(cfg.lora_targets),
        },
    )
    config = FlashstepConfig(
        family="hypersd",
        default_steps=cfg.default_steps,
        allowed_steps=served_steps,
        timesteps={**{str(n): trailing_timesteps(n) for n in served_steps if n > 1}, "1": [one_step_timestep]},
        default_guidance_scale=0.0,
        eta=cfg.eta,
        base=base_reference(teacher.folder, folder),
        hybrid_guidance_scale=HYBRID_GUIDANCE_SCALE,
        lora=LORA_WEIGHT_NAME,
        lora_scale=1.0,
        nasa_alpha=0.1,
        resolution=teacher.config.resolution,
        provenance=provenance,
    )
    config.save(folder)
    return folder


# ----- the recipe -----


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
    bf16: bool = False  # the pairs' teacher runs under bfloat16 autocast (2.0x faster on the 2-core CPU)

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

    Onto a source's map (`SourceRegressionConfig`) the rank-16 LoRA levelled off near 0.65 held-out whatever
    the source, weight or training rank: it has to bend its own map into another network's, which its rank
    may not reach. Its own sample, refined, differs from what it already draws only where the teacher
    corrects it (colour and shape at the attribute level), so every step's target is within its reach and
    no second network is run: one LoRA call and the refinement's teacher steps per sample.
    """

    refine: TeacherRefinement = TeacherRefinement()
    # The served step counts whose samples it regresses, one drawn per batch. (1,) trains the one-step map
    # alone: with TSCD kept beside it, a unified LoRA's one step rose from the recipe's 0.27 to 0.79 in two
    # legs, its 2-8 steps only to 0.65-0.69 and no further in the second, since nothing asked the later
    # steps of a k-step sample to draw what the prompt names. With k > 1 the first
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
    # sqrt(abar_999) = 0.068, so an error in eps reaches the image 3x less amplified. The LoRA trained at
    # 999 drew 0.490 seen adherence there and 0.596 at 800 before any training at 800; the shipped one
    # went on to 700, then 650 (sqrt(abar) = 0.34), where it draws 0.696.
    one_step_timestep: int | None = None
    regression: PairRegressionConfig | SourceRegressionConfig | SelfRegressionConfig | None = None  # None: none
    # The k = 1 TSCD loss keeps the multi-step jumps; 0 drops it, for a LoRA that serves one step only (Hyper-SD
    # ships per-step-count LoRAs beside its unified one). The thought: at the one-step timestep a real x_t and
    # pure noise have the same variance, so reading x0 out of x_t (TSCD) and ignoring what looks like x0 in z
    # (the one-step sample) pull the same weights apart. Measured on shapes it bought little: one-step adherence
    # 0.719 without TSCD against 0.702 with it (regression-only legs, 8 seeds), while 2 and 4 steps fell.
    tscd_weight: float = 1.0
    rank: int | None = None  # widen the student's LoRA to this rank first (None keeps its own)
    export_rank: int | None = None  # store the trained LoRA at this lower rank (`low_rank_lora`); None: as trained
    latents: int = HyperSDTrainConfig.latents  # the recipe's real scenes (the same seed, so its cache is reused)
    batch_size: int = 32
    lr: float = 2e-4  # a fifth of TSCD's: the LoRA is trained already
    warmup: int = 50
    matching: DistributionMatchingConfig | None = DistributionMatchingConfig()  # None: no DMD term (regression only)
    # Export an exponential moving average of the LoRA instead of its last weights; None exports them as trained.
    # The thought: each DMD / regression leg from the shipped one-step LoRA ended within +-0.01 of it, the size
    # of one leg's step-to-step wander, and an average over the last ~1 / (1 - decay) steps removes that wander.
    # No warm-up (`EMA`'s cap would hold any leg under 1,790 steps near 0.99 whatever the decay), so the
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


def one_step_sample(
    unet: torch.nn.Module, z: torch.Tensor, embeds: torch.Tensor, alphas_cumprod: torch.Tensor, timestep: int = 999
) -> torch.Tensor:
    """The served 1-step TCD sample from pure noise z fed at `timestep`: eps there, then the DDIM jump to 0."""
    t = torch.full((z.shape[0],), timestep, dtype=torch.long)
    return ddim_jump(z, unet_eps(unet, z, t, embeds), alphas_cumprod[t], alphas_cumprod[0].expand(z.shape[0]))


def load_lora_student(
    teacher: Teacher, folder: Path, rank: int | None = None
) -> tuple[UNet2DConditionModel, HyperSDTrainConfig]:
    """`lora_student` with an exported hypersd folder's LoRA loaded (trainable), and the recipe config
    with that LoRA's rank and target modules, read from the file's adapter metadata.

    A `rank` above the file's widens the LoRA without changing what it computes: the stored A rows and
    B columns fill the leading slices, the new B columns are zero (the new A rows keep their random
    init, so the added directions start learning at once). alpha = rank keeps the scale at 1 either way.
    """
    with safe_open(str(folder / LORA_WEIGHT_NAME), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k.removeprefix("unet."): f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    stored = int(meta["unet.r"])
    rank = stored if rank is None else rank
    if rank < stored:
        raise ValueError(f"`rank` {rank} would narrow {folder}'s rank-{stored} LoRA; a refinement can only widen it")
    cfg = replace(HyperSDTrainConfig(), rank=rank, lora_targets=tuple(meta["unet.target_modules"]))
    unet = lora_student(teacher, cfg)
    if rank > stored:
        state = _widened(state, get_peft_model_state_dict(unet))
    result = set_peft_model_state_dict(unet, state)
    if result.unexpected_keys:
        raise ValueError(f"{folder} holds LoRA weights this student has no module for: {result.unexpected_keys[:3]}")
    return unet, cfg


def _widened(stored: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`fresh` (a wider LoRA's initial state) with `stored` in the leading rank slices: A is (r, in, ...),
    B is (out, r, ...), and the fresh B is zero, so B @ A is the stored update exactly."""
    out = {}
    for key, value in fresh.items():
        old = stored[key]
        new = value.detach().clone()
        if "lora_A" in key:
            new[: old.shape[0]] = old
        else:
            new[:, : old.shape[1]] = old
        out[key] = new
    return out


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
        from training.warm_start import load_source

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
