"""Training the toy AutoencoderKL (64x64x3 <-> 8x8x4) of the shapes world: the loop and loss that
`flashstep train vae` and `flashstep train decoder` (training/recipes/) run in legs.

Loss: L1 + MSE reconstruction, weighted towards the object's pixels, and a KL term weighted 1e-6 as in Stable Diffusion's VAE, which
keeps the latent close to a Gaussian without blurring. No adversarial term: the images are flat
colours on flat backgrounds, where pixel losses already converge to sharp edges. After training
the latent scaling factor is set from the latents' standard deviation (SD's 0.18215 was found
the same way) so the UNet sees unit-variance latents.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from tqdm import tqdm

from flashstep.training.architecture import ShapesArch, build_vae
from flashstep.training.checkpointing import config_dict, load_train_state, save_train_state
from flashstep.training.data import render_dataset


@dataclass(frozen=True)
class VAETrainConfig:
    """One leg of VAE training; `__post_init__` names a field that is out of range or needs another."""

    steps: int = 1500
    batch_size: int = 24
    lr: float = 1e-3
    kl_weight: float = 1e-6
    object_weight: float = 10.0
    # Decoder-only fine-tuning (as SD's ft-MSE decoder): the encoder, hence the latent space the
    # UNet was trained on, stays bit-identical while the decoder keeps improving.
    decoder_only: bool = False
    # The latent the decoder learns to decode: "sample" (a posterior draw, as joint training must)
    # or "mean", what the teacher trains on (training/recipes/teacher.py) and so generates.
    decoder_latent: str = "sample"
    n_train: int = 30000
    seed: int = 2000
    save_every: int = 250
    arch: ShapesArch = ShapesArch()

    def __post_init__(self) -> None:
        if self.decoder_latent not in ("sample", "mean"):
            raise ValueError(f"decoder_latent must be 'sample' or 'mean' but is {self.decoder_latent!r}")
        if self.decoder_latent == "mean" and not self.decoder_only:
            # Joint training on means would drop the KL term's only path to the encoder's std.
            raise ValueError("decoder_latent='mean' needs decoder_only=True")


def object_weights(x: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 on the background, `object_weight` on the object.

    The object covers 3-15% of a 64x64 image, so an unweighted pixel loss learns the background
    first and the object's colour and shape only after thousands of steps (seen here: blurred
    brown blobs after 250 steps). The background is the corner colour of each render.
    """
    corner = x[:, :, :1, :1]
    mask = ((x - corner).abs().amax(dim=1, keepdim=True) > 0.05).float()
    return 1.0 + (object_weight - 1.0) * mask


def vae_loss(
    vae: AutoencoderKL,
    x: torch.Tensor,
    kl_weight: float,
    object_weight: float = 1.0,
    gen: torch.Generator | None = None,
    decoder_only: bool = False,
    latent: str = "sample",
) -> torch.Tensor:
    with torch.set_grad_enabled(not decoder_only and torch.is_grad_enabled()):
        posterior = vae.encode(x).latent_dist
    z = posterior.mean
    if latent == "sample":
        z = z + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    recon = vae.decode(z).sample
    w = object_weights(x, object_weight)
    err = recon - x
    rec = (w * (err.abs() + err.pow(2))).mean() / w.mean()
    kl = posterior.kl().mean() / x[0].numel()
    return rec + kl_weight * kl


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """1 / std of the posterior means, as SD measured its 0.18215."""
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


def train_vae(
    cfg: VAETrainConfig,
    run_dir: str | Path,
    progress: bool = True,
    init_from: str | Path | None = None,
    init_vae: str | Path | None = None,
) -> tuple[AutoencoderKL, dict]:
    """Train (resuming from `run_dir` when it holds state, else starting from the weights of the
    run in `init_from`, or of the exported VAE folder `init_vae`, when given); return the VAE and
    a report."""
    t0 = time.time()
    run_dir = Path(run_dir)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = render_dataset(cfg.n_train, cfg.seed, progress=progress)
    vae = build_vae(cfg.arch)
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    start = load_train_state(run_dir, {"vae": vae}, {"vae": opt})
    if start is None and init_from is not None:
        load_train_state(init_from, {"vae": vae}, {})
    if start is None and init_vae is not None:
        vae.load_state_dict(AutoencoderKL.from_pretrained(init_vae).state_dict())
    start = start or 0
    rng = np.random.default_rng(cfg.seed + start)
    bar = tqdm(range(start, cfg.steps), desc="vae", disable=not progress, mininterval=5.0, initial=start, total=cfg.steps)
    loss = torch.tensor(float("nan"))
    for step in bar:
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))  # cosine to zero
        for group in opt.param_groups:
            group["lr"] = lr
        x, _, _ = data.batch(rng.integers(0, len(data), cfg.batch_size))
        loss = vae_loss(vae, x, cfg.kl_weight, cfg.object_weight, gen, cfg.decoder_only, cfg.decoder_latent)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_train_state(run_dir, step + 1, {"vae": vae}, {"vae": opt}, config_dict(cfg))
    vae.eval()
    x, _, _ = data.batch(np.arange(min(512, len(data))))
    inherited = Path(init_vae, "config.json") if init_vae is not None else Path(init_from or "", "vae", "config.json")
    if cfg.decoder_only and inherited.is_file():
        # Same encoder, same latent space: keep the factor the UNet was trained with, bit for bit.
        vae.register_to_config(scaling_factor=json.loads(inherited.read_text())["scaling_factor"])
    else:
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, x))
    with torch.no_grad():
        recon = vae.decode(vae.encode(x[:256]).latent_dist.mean).sample.clamp(-1, 1)
    report = {
        "final_loss": float(loss.item()),
        "recon_mae_255": float((recon - x[:256]).abs().mean() * 127.5),
        "scaling_factor": vae.config.scaling_factor,
        "seconds": time.time() - t0,
        "config": config_dict(cfg),
    }
    (run_dir / "vae_report.json").write_text(json.dumps(report, indent=2) + "\n")
    vae.save_pretrained(run_dir / "vae")
    return vae, report


def stored_dtype(vae_dir: str | Path) -> torch.dtype:
    """The dtype an exported VAE folder stores its weights in (diffusers upcasts them on load)."""
    with safe_open(next(Path(vae_dir).glob("*.safetensors")), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype
