"""Hyper-SD's trajectory-segmented consistency distillation (TSCD) and its LoRA student, shared by
`flashstep train hypersd` and `flashstep train hypersd-refine`.

Hyper-SD (Ren et al. 2024, arXiv:2404.13686, Sec. 3.1) at toy scale. The time axis [0, T) is cut
into k equal segments whose boundaries are the served trailing timesteps (for k = 4:
0 | 249 | 499 | 749 | 999). Within a segment the student learns the consistency map to the
segment's lower boundary s: from x_t it predicts eps, takes x0 and jumps deterministically to s
(a DDIM jump). The target is the same map from one teacher DDIM step further down the
trajectory, x_{t'} with t' = t - T/N (N = 50, the LCM/TCD solver grid), taken by the target
network (the student itself under stop-gradient).

The student is a PEFT LoRA (alpha = rank, so flashstep's fuse and diffusers' loader agree without an
`alpha` key) on the module set of public LCM-/Hyper-SD SD1.5 LoRAs; it exports as a LoRA folder
(`flashstep.json` + the diffusers LoRA file) naming the teacher as its base.
"""

from __future__ import annotations

import json
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

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.lora import LoraLayer
from flashstep.models.registry import discover
from flashstep.models.schedule import trailing_timesteps
from flashstep.training.data import encode_latents, render_dataset
from flashstep.training.distill import (
    HYBRID_GUIDANCE_SCALE,
    Teacher,
    cfg_eps,
    ddim_jump,
    student_unet,
    unet_eps,
)

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
    """The hypersd recipe's settings. Batch 32 rather than 64 buys more updates, which consistency
    propagation needs more than gradient precision; k = 1, the map the 1-step model runs, gets most
    of the steps, since too few leave its 1-step images blurred."""

    latents: int = 8192  # real training scenes, VAE-encoded once and cached in the run folder
    segments: tuple[int, ...] = (8, 4, 2, 1)  # k per stage
    stage_steps: tuple[int, ...] = (100, 100, 200, 1000)  # optimizer steps per stage
    solver_steps: int = 50  # N: the teacher's DDIM grid t_n = n T/N - 1, one step is T/N
    guidance_scale: float = 4.0  # teacher CFG (its served default)
    rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50  # per stage
    cond_dropout: float = 0.1
    eta: float = 1.0  # TCD eta in flashstep.json: k = 1 trains x0 maps, so re-noise fully between steps
    default_steps: int = 2  # flashstep.json's default, one of 1, 2, 4, 8
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

    Training wide and storing narrow keeps most of every layer's update energy in a file that fits the
    shipped-set budget. Keys as PEFT's state dict; A is
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

