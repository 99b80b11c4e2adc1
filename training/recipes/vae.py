"""`flashstep train vae`: the VAE of the shapes world in two phases, joint training then decoder-only.

Loss: L1 + MSE reconstruction, weighted towards the object's pixels, and a KL term weighted 1e-6 as in
Stable Diffusion's VAE (`training/autoencoder.py`). After training the latent scaling factor is set
from the latents' standard deviation so the UNet sees unit-variance latents.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from diffusers import AutoencoderKL

from flashstep.training.architecture import ShapesArch
from flashstep.training.autoencoder import VAETrainConfig, train_vae

__all__ = ["VAETrainConfig", "train_vae_recipe", "vae_recipe"]


def vae_recipe(steps: int | None = None, arch: ShapesArch | None = None) -> tuple[VAETrainConfig, VAETrainConfig]:
    """The two phases that made the shipped VAE: joint training, then decoder-only fine-tuning.

    Phase one fixes the latent space early (800 steps), so the teacher can start on it while
    phase two keeps sharpening the decoder; `steps` scales both (smoke runs).
    """
    arch = arch or ShapesArch()
    joint = VAETrainConfig(steps=800, arch=arch, save_every=50)
    decoder = VAETrainConfig(steps=3000, lr=4e-4, decoder_only=True, n_train=40000, arch=arch, save_every=100)
    if steps is not None:
        joint = replace(joint, steps=max(1, steps // 4), n_train=min(joint.n_train, 64 * steps))
        decoder = replace(decoder, steps=max(1, steps - steps // 4), n_train=min(decoder.n_train, 64 * steps))
    return joint, decoder


def train_vae_recipe(
    run_dir: str | Path, joint: VAETrainConfig, decoder: VAETrainConfig, progress: bool = True
) -> tuple[AutoencoderKL, dict]:
    """Phase one in `run_dir/joint`, phase two in `run_dir/decoder`; the VAE lands in `run_dir/vae`."""
    run_dir = Path(run_dir)
    _, joint_report = train_vae(joint, run_dir / "joint", progress)
    vae, report = train_vae(decoder, run_dir / "decoder", progress, init_from=run_dir / "joint")
    vae.save_pretrained(run_dir / "vae")
    report = {**report, "seconds": joint_report["seconds"] + report["seconds"], "joint": joint_report}
    return vae, report

