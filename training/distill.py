"""What every distillation recipe shares: the frozen teacher, training prompts, CFG, export.

Recipes (`training/recipes/`) start from a servable teacher folder
(by default the shipped `shapes-teacher`) rather than from a training run, so anyone holding a
diffusers folder can distil it. The text encoder and VAE stay frozen: students learn only their
UNet (or a LoRA on it), which is what lets them share the teacher's prompt embeddings and decoder
and keeps an exported student a drop-in diffusers folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.registry import SHIPPED_MODELS_DIR
from flashstep.training.export import export_servable, git_commit, hardware
from flashstep.training.shapes import sample_training_example

DEFAULT_TEACHER = SHIPPED_MODELS_DIR / "shapes-teacher"
# The teacher's step in a multi-step student's diversity hybrid runs without CFG: guidance there
# collapses the diversity the hybrid exists to add.
HYBRID_GUIDANCE_SCALE = 1.0


@dataclass
class Teacher:
    """A frozen float32 teacher on the CPU, and the schedule its timesteps index."""

    folder: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    config: FlashstepConfig
    alphas_cumprod: torch.Tensor  # (T,) float32, SD1.x scaled-linear

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.resolution // 8
        return (int(self.unet.config.in_channels), side, side)

    @cached_property
    def empty_prompt_embeds(self) -> torch.Tensor:
        """(1, L, C) states of the empty prompt, CFG's uncond: encoded once, since every guided call needs it."""
        return self.encode_prompts([""])

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, L, C) text-encoder states (the empty prompt is the CFG uncond)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)


def load_teacher(folder: str | Path = DEFAULT_TEACHER) -> Teacher:
    """Load a servable epsilon-prediction folder as a frozen float32 teacher."""
    from flashstep.models.schedule import NoiseSchedule

    folder = Path(folder)
    config = FlashstepConfig.load(folder)
    if config.prediction != "epsilon":
        raise ValueError(f"the teacher must predict epsilon but {folder} predicts {config.prediction!r}")

    def frozen(module):
        return module.float().eval().requires_grad_(False)

    return Teacher(
        folder=folder,
        unet=frozen(UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)),
        vae=frozen(AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)),
        text_encoder=frozen(CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32)),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        config=config,
        alphas_cumprod=NoiseSchedule.from_folder(folder).alphas_cumprod.float(),
    )


class PromptSampler:
    """Training captions as the teacher saw them: held-out (shape, color) pairs never appear.

    Each draw takes the caption of a fresh training scene (a random attribute subset in a
    random template), so prompts cover the same distribution the teacher was trained on;
    `dropout` of them are the empty prompt, which keeps the student usable without a prompt
    and, for CFG-capable students, trains the unconditional branch.
    """

    def __init__(self, seed: int, dropout: float = 0.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.dropout = dropout

    def draw(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            seed = int(self.rng.integers(0, 2**31 - 1))
            caption = sample_training_example(seed)[1]
            out.append("" if self.rng.random() < self.dropout else caption)
        return out


def autocast(module: torch.nn.Module, bf16: bool):
    """bfloat16 autocast on the module's device type, or a no-op context."""
    return torch.autocast(next(module.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16)


def unet_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """One UNet call: x (B, C, h, w), t (B,) timesteps, embeds (B, L, C) -> (B, C, h, w)."""
    return unet(x, t, encoder_hidden_states=embeds).sample


def cfg_eps(
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: torch.Tensor | float,
) -> torch.Tensor:
    """Classifier-free guidance in one batched UNet call: e_u + w (e_c - e_u), w per sample or scalar."""
    e_u, e_c = unet_eps(unet, torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
    w = scale.view(-1, 1, 1, 1) if torch.is_tensor(scale) else scale
    return e_u + w * (e_c - e_u)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4), abar_t (B,) per sample."""
    a = abar_t.view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_jump(x: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from t to s (Song et al. 2021, eq. 12, sigma = 0), abar per sample (B,).

    x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t); x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps.
    With s = 0 it is the x0 prediction at abar_0, as the served TCD sampler's last step.
    """
    a_t, a_s = abar_t.view(-1, 1, 1, 1), abar_s.view(-1, 1, 1, 1)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps


def student_unet(teacher: Teacher) -> UNet2DConditionModel:
    """A trainable float32 copy of the teacher's UNet: every student starts from the teacher."""
    import copy

    return copy.deepcopy(teacher.unet).train().requires_grad_(True)


def check_finite(step: int, **losses: torch.Tensor) -> None:
    """Stop a run at the first non-finite loss, naming it, rather than train on NaNs for hours."""
    bad = {k: v.item() for k, v in losses.items() if not torch.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {bad}")


def optimizer_step(
    opt: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], clip: float = 1.0
) -> None:
    """One update every recipe makes the same way: backward, clip the gradient norm at `clip`, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 10% of `lr`."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(step, total) / max(total, 1))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@dataclass
class Provenance:
    """How a distilled checkpoint was made; written into its flashstep.json."""

    recipe: str
    teacher: str
    steps: int
    batch_size: int
    seconds: float
    extra: dict = field(default_factory=dict)
    device: str = "cpu"  # where the run trained: `hardware` names the GPU of a CUDA run

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "teacher": self.teacher,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "train_seconds": round(self.seconds),
            "hardware": hardware(self.device),
            "commit": git_commit(),
            **self.extra,
        }


def export_student(folder: str | Path, teacher: Teacher, unet: UNet2DConditionModel, config: FlashstepConfig) -> Path:
    """A full diffusers folder: the student UNet with the teacher's frozen VAE, text encoder, tokenizer."""
    return export_servable(
        folder, unet=unet, vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, config=config
    )


class Timer:
    """Wall seconds of a run, carried across resumes through the run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "seconds.json"
        self.before = json.loads(self.path.read_text())["seconds"] if self.path.exists() else 0.0
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return self.before + time.time() - self.start

    def save(self) -> None:
        self.path.write_text(json.dumps({"seconds": self.seconds}))
