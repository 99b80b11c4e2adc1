"""`flashstep train teacher`: the multi-step epsilon-prediction teacher, `shapes-teacher`.

Stable Diffusion's recipe at toy scale: a frozen VAE (trained by `training/recipes/vae.py`), a CLIP
text encoder and a cross-attention UNet trained on the SD1.x noise schedule with epsilon MSE.
Three departures, all because nothing here is pretrained: the text encoder is trained jointly with
the UNet (no CLIP weights can be downloaded), with attribute heads of its own
(`training/text_attributes.py`) so that words the epsilon loss barely rewards, position above all,
still get distinct embeddings; and the loss uses Min-SNR-gamma weighting (Hang et al. 2023), which
reaches a given quality in fewer steps, and steps are what a CPU run lacks. Captions are re-sampled
every time an image is drawn, so one image teaches many ways of describing it; 10% of them are
dropped to the empty string for classifier-free guidance.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm
from transformers import CLIPTokenizer

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.training.architecture import ShapesArch, build_text_encoder, build_unet
from flashstep.training.checkpointing import EMA, TRAIN_STATE, config_dict, load_train_state, save_train_state
from flashstep.training.data import captions_for_labels, encode_latents, render_dataset
from flashstep.training.export import export_servable, git_commit, hardware, training_scheduler
from flashstep.training.text_attributes import AttributeHeads, attribute_loss
from flashstep.training.tokenizer import build_tokenizer

TEACHER_STEPS = (1, 2, 4, 8, 10, 15, 20, 25, 30, 40, 50)
# Smoke-run sizes (`flashstep train teacher --tiny`): seconds, not the full render set.
TINY = dict(n_train=64, batch_size=4, save_every=2)


@dataclass(frozen=True)
class TeacherTrainConfig:
    """The teacher recipe's settings; they travel with the checkpoint (`export_teacher_run` rebuilds them)."""

    steps: int = 5000
    batch_size: int = 64
    lr: float = 6e-4
    warmup: int = 200
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    n_train: int = 50000
    seed: int = 3000
    save_every: int = 250
    default_guidance_scale: float = 4.0
    text_attribute_weight: float = 1.0  # the text encoder's attribute loss; 0 trains it by epsilon alone
    arch: ShapesArch = ShapesArch()


def build_teacher_modules(arch: ShapesArch, tokenizer: CLIPTokenizer) -> torch.nn.ModuleDict:
    """UNet, text encoder and the encoder's training-only attribute heads as one module (one optimizer, one EMA)."""
    text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    return torch.nn.ModuleDict(
        {"unet": build_unet(arch), "text_encoder": text_encoder, "text_heads": AttributeHeads(arch.text_hidden)}
    )


def load_or_build_tokenizer(folder: Path, max_length: int) -> CLIPTokenizer:
    """The run's own tokenizer when it has one (ids must match its text encoder), else a new one."""
    if (folder / "tokenizer.json").exists():
        return CLIPTokenizer.from_pretrained(folder)
    return build_tokenizer(folder, model_max_length=max_length)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR."""
    abar = alphas_cumprod[t]
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


def train_teacher(
    cfg: TeacherTrainConfig,
    vae_dir: str | Path,
    run_dir: str | Path,
    export_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train (resuming from `run_dir`), export the EMA weights to `export_dir`, return a report."""
    t0 = time.time()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
    tokenizer = load_or_build_tokenizer(run_dir / "tokenizer", cfg.arch.text_max_length)
    model = build_teacher_modules(cfg.arch, tokenizer)
    unet, text_encoder = model["unet"], model["text_encoder"]
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-2)
    start = load_train_state(run_dir, {"model": model, "ema": ema.module}, {"model": opt}) or 0

    data = render_dataset(cfg.n_train, cfg.seed, progress=progress)
    latents = encode_latents(vae, data.images, progress=progress)  # (N, 4, 8, 8)
    scheduler = training_scheduler()
    abar = scheduler.alphas_cumprod
    rng = np.random.default_rng(cfg.seed + start)

    bar = tqdm(range(start, cfg.steps), desc="teacher", disable=not progress, mininterval=5.0, initial=start, total=cfg.steps)
    loss = torch.tensor(float("nan"))
    model.train()
    for step in bar:
        warm = min(1.0, (step + 1) / cfg.warmup)
        lr = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.integers(0, len(latents), cfg.batch_size)
        x0 = latents[idx]
        captions = captions_for_labels(data.labels[idx], rng, cfg.cond_dropout)
        tokens = tokenizer(
            captions, padding="max_length", max_length=cfg.arch.text_max_length, truncation=True, return_tensors="pt"
        )
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        hidden = text_encoder(tokens.input_ids).last_hidden_state
        eps = unet(xt, t, hidden).sample
        per_sample = F.mse_loss(eps, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(abar, t, cfg.min_snr_gamma)).mean()
        total = loss
        if cfg.text_attribute_weight > 0:
            total = total + cfg.text_attribute_weight * attribute_loss(
                model["text_heads"], hidden, tokens.attention_mask, captions
            )
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_train_state(run_dir, step + 1, {"model": model, "ema": ema.module}, {"model": opt}, config_dict(cfg))

    report = {"final_loss": float(loss.item()), "seconds": time.time() - t0, "steps": cfg.steps, "config": config_dict(cfg)}
    if export_dir is not None:
        export_teacher(ema.module, vae, tokenizer, cfg, export_dir, seconds=report["seconds"])
    (run_dir / "teacher_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def export_teacher_run(run_dir: str | Path, vae_dir: str | Path, export_dir: str | Path) -> Path:
    """Export the EMA weights held in a teacher run's training state, with the VAE in `vae_dir`.

    Used when the VAE's decoder was fine-tuned after the teacher started (its encoder, hence the
    latent space and scaling factor, unchanged): the export pairs the UNet with the best decoder.
    """
    from safetensors import safe_open

    run_dir = Path(run_dir)
    with safe_open(str(run_dir / TRAIN_STATE), framework="pt") as f:
        meta = f.metadata()
    data = json.loads(meta["config"])
    data["arch"] = ShapesArch.from_dict(data["arch"])
    cfg = TeacherTrainConfig(**data)
    tokenizer = load_or_build_tokenizer(run_dir / "tokenizer", cfg.arch.text_max_length)
    ema = build_teacher_modules(cfg.arch, tokenizer)
    step = load_train_state(run_dir, {"ema": ema}, {})  # only the EMA weights are exported
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    report_path = run_dir / "teacher_report.json"
    seconds = json.loads(report_path.read_text())["seconds"] if report_path.exists() else None
    return export_teacher(ema.eval(), vae, tokenizer, cfg, export_dir, seconds=seconds, steps_done=step)


def export_teacher(
    model: torch.nn.ModuleDict,
    vae,
    tokenizer,
    cfg: TeacherTrainConfig,
    export_dir,
    seconds: float | None,
    steps_done: int | None = None,
) -> Path:
    config = FlashstepConfig(
        family="teacher",
        default_steps=25,
        allowed_steps=TEACHER_STEPS,
        prediction="epsilon",
        default_guidance_scale=cfg.default_guidance_scale,
        nasa_alpha=0.1,
        resolution=cfg.arch.image_size,
        provenance={
            "recipe": "epsilon-mse+min-snr",
            "steps": cfg.steps if steps_done is None else steps_done,
            "batch_size": cfg.batch_size,
            "train_seconds": None if seconds is None else round(seconds),
            "hardware": hardware(),
            "commit": git_commit(),
            "arch": cfg.arch.to_dict(),
        },
    )
    return export_servable(
        export_dir, unet=model["unet"], vae=vae, text_encoder=model["text_encoder"], tokenizer=tokenizer, config=config
    )

