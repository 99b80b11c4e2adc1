"""Decoder refinement of an exported VAE: the latent space (encoder, scaling factor) stays
bit-identical, so every UNet trained on it keeps working, while the decoder learns."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from flashstep.training.architecture import ShapesArch
from flashstep.training.autoencoder import VAETrainConfig, train_vae, vae_loss
from flashstep.training.data import render_dataset
from flashstep.training.recipes.decoder import DECODER_LEGS, decoder_recipe, train_decoder_recipe

TINY = ShapesArch.tiny()


@pytest.fixture(scope="module")
def exported_vae(tmp_path_factory):
    runs = tmp_path_factory.mktemp("vae")
    train_vae(VAETrainConfig(steps=2, batch_size=4, n_train=16, arch=TINY), runs / "joint", progress=False)
    return runs / "joint" / "vae"


def _renders(n: int) -> torch.Tensor:
    return render_dataset(n, seed=50, progress=False).batch(np.arange(n))[0]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_refining_an_exported_vae_keeps_its_latent_space_and_changes_its_decoder(exported_vae, tmp_path):
    cfg = VAETrainConfig(steps=3, batch_size=4, n_train=16, lr=1e-2, decoder_only=True, decoder_latent="mean", arch=TINY)
    train_vae(cfg, tmp_path / "refine", progress=False, init_vae=exported_vae)
    before = AutoencoderKL.from_pretrained(exported_vae)
    after = AutoencoderKL.from_pretrained(tmp_path / "refine" / "vae")
    x = _renders(4)
    with torch.no_grad():
        assert torch.equal(before.encode(x).latent_dist.mean, after.encode(x).latent_dist.mean)
        z = before.encode(x).latent_dist.mean
        assert not torch.allclose(before.decode(z).sample, after.decode(z).sample)
    scale = json.loads((exported_vae / "config.json").read_text())["scaling_factor"]
    assert after.config.scaling_factor == scale


def test_decoding_the_posterior_mean_makes_the_loss_deterministic(exported_vae):
    vae = AutoencoderKL.from_pretrained(exported_vae)
    x = _renders(2)
    with torch.no_grad():
        draws = [vae_loss(vae, x, 1e-6, gen=torch.Generator().manual_seed(s), decoder_only=True) for s in (0, 1)]
        means = [vae_loss(vae, x, 1e-6, gen=torch.Generator().manual_seed(s), decoder_only=True, latent="mean") for s in (0, 1)]
    assert draws[0] != draws[1]
    assert means[0] == means[1]


def test_decoding_means_is_refused_for_joint_training():
    with pytest.raises(ValueError, match="decoder_only"):
        VAETrainConfig(decoder_latent="mean")
    with pytest.raises(ValueError, match="decoder_latent"):
        VAETrainConfig(decoder_only=True, decoder_latent="median")


def test_the_decoder_recipe_shares_its_steps_over_its_legs():
    legs = decoder_recipe(arch=TINY)
    assert [(leg.steps, leg.lr) for leg in legs] == list(DECODER_LEGS)
    assert all(leg.decoder_only and leg.decoder_latent == "mean" for leg in legs)
    smoke = decoder_recipe(steps=14, arch=TINY)
    assert sum(leg.steps for leg in smoke) == 14 and all(leg.steps >= 1 for leg in smoke)


@pytest.mark.slow
def test_each_leg_starts_from_the_previous_legs_decoder(exported_vae, tmp_path):
    """Legs two and three at lr 0 leave leg one's decoder as the result, not the exported one."""
    first, *rest = decoder_recipe(steps=3, arch=TINY)
    legs = (replace(first, lr=1e-2, batch_size=4), *(replace(leg, lr=0.0, batch_size=4) for leg in rest))
    result, report = train_decoder_recipe(tmp_path, exported_vae, legs, progress=False)
    leg_one = AutoencoderKL.from_pretrained(tmp_path / "leg1" / "vae")
    exported = AutoencoderKL.from_pretrained(exported_vae)
    assert len(report["legs"]) == 3
    assert _same_weights(result.decoder, leg_one.decoder)
    assert not _same_weights(result.decoder, exported.decoder)
