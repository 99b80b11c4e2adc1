"""`flashstep train decoder --vae FOLDER`: refine the decoder of an exported VAE.

The latent space stays as it was, so the refined folder replaces `vae/` in every model folder and
a sharper decoder ships without retraining the teacher or its students.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from diffusers import AutoencoderKL

from flashstep.training.architecture import ShapesArch
from flashstep.training.autoencoder import VAETrainConfig, stored_dtype, train_vae

__all__ = ["DECODER_LEGS", "decoder_recipe", "stored_dtype", "train_decoder_recipe"]

# The legs of the decoder refinement: (steps, peak lr), each a fresh cosine schedule from the
# previous leg's weights; the decoder keeps improving long after the latent space is fixed.
DECODER_LEGS = ((3000, 4e-4), (5000, 2e-4), (6000, 2e-4))


def decoder_recipe(steps: int | None = None, arch: ShapesArch | None = None) -> tuple[VAETrainConfig, ...]:
    """The legs of refining an exported VAE's decoder on posterior means (`flashstep train decoder`).

    The encoder, hence every UNet trained on its latents, is untouched, so a sharper decoder
    ships into every model folder without retraining the teacher or its students. `steps`
    shares that many steps out over the legs in proportion (smoke runs).
    """
    base = VAETrainConfig(decoder_only=True, decoder_latent="mean", n_train=30000, seed=2100, arch=arch or ShapesArch())
    legs = tuple(replace(base, steps=n, lr=lr) for n, lr in DECODER_LEGS)
    if steps is not None:
        total = sum(n for n, _ in DECODER_LEGS)
        n_train = min(base.n_train, 64 * steps)
        legs = tuple(replace(leg, steps=max(1, round(steps * leg.steps / total)), n_train=n_train) for leg in legs)
    return legs


def train_decoder_recipe(
    run_dir: str | Path, vae_dir: str | Path, legs: tuple[VAETrainConfig, ...], progress: bool = True
) -> tuple[AutoencoderKL, dict]:
    """Leg i in `run_dir/leg{i}`, from the previous leg's VAE (the first from `vae_dir`); resumable
    like every stage. Returns the last leg's VAE and a report whose seconds cover every leg."""
    init, reports = Path(vae_dir), []
    for i, cfg in enumerate(legs, start=1):
        vae, report = train_vae(cfg, Path(run_dir) / f"leg{i}", progress, init_vae=init)
        init = Path(run_dir) / f"leg{i}" / "vae"
        reports.append(report)
    legs_report = [{k: r[k] for k in ("final_loss", "recon_mae_255", "seconds")} for r in reports]
    return vae, {**reports[-1], "seconds": sum(r["seconds"] for r in reports), "legs": legs_report}


