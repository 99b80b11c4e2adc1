"""Public checkpoint shapes: an SDXL-structured folder (two text encoders, text_time added conditioning)
loads unchanged and matches vanilla diffusers; an AutoencoderTiny in vae_tiny/ decodes on request."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from flashstep.models.engine import Engine
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.models.schedule import cpu_generators, randn_per_sample


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory, teacher_dir):
    """SDXL's structure at toy scale: CLIPTextModel + CLIPTextModelWithProjection, a UNet with
    addition_embed_type="text_time" whose projection input is 6 * addition_time_embed_dim + the
    pooled width, linear projections, per-block transformer depth, VAE scaling 0.13025."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tokenizer = CLIPTokenizer.from_pretrained(teacher_dir / "tokenizer")
    torch.manual_seed(0)

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, projection_dim=hidden, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip

    text_encoder = CLIPTextModel(text_config(16))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(32))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=16 + 32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, sample_size=64,
        scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return Engine.load(sdxl_dir, family="teacher")  # a public folder: no flashstep.json


def test_sdxl_folder_loads_unchanged(sdxl, sdxl_dir):
    assert not (sdxl_dir / "flashstep.json").exists()
    assert sdxl.sdxl and len(sdxl.text_encoders) == 2
    assert sdxl.config.resolution == 64  # UNet sample_size 8 x VAE factor 8
    assert sdxl.force_zeros_for_empty_prompt


def test_sdxl_teacher_matches_vanilla_diffusers(sdxl, sdxl_dir):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    latents = randn_per_sample(cpu_generators([8]), (4, 8, 8), torch.device("cpu"), torch.float32)
    reference = pipe("a red circle", num_inference_steps=3, guidance_scale=6.0, latents=latents, height=64,
                     width=64, output_type="np").images[0] * 255  # fmt: skip
    ours = sdxl.generate([GenerationRequest("a red circle", seed=8, num_inference_steps=3, guidance_scale=6.0)])
    assert ours.unet_evals == 6
    assert np.abs(pixels(ours)[0] - reference).mean() <= 1.0  # within 1/255 on average


def test_sdxl_one_step_student_with_nasa(tmp_path, sdxl_dir):
    folder = shutil.copytree(sdxl_dir, tmp_path / "dmd2-sdxl-1step")
    FlashstepConfig(family="swiftbrush", conditioning_timestep=399, resolution=64, nasa_alpha=0.04).save(folder)
    engine = Engine.load(folder)
    plain = pixels(engine.generate([GenerationRequest("a star", seed=1)]))
    steered = pixels(engine.generate([GenerationRequest("a star", seed=1, negative_prompt="red", nasa_alpha=0.8)]))
    assert np.abs(steered - plain).mean() > 0.5


def test_sdxl_uses_zeros_for_an_absent_negative_prompt(sdxl):
    reqs = [GenerationRequest("a star", seed=1, nasa_alpha=0.0)]
    cond = sdxl._conditioning([sdxl.validate(r) for r in reqs], cfg=True)
    assert torch.count_nonzero(cond.uncond_embeds) == 0 and torch.count_nonzero(cond.uncond_pooled) == 0
    given = sdxl._conditioning([sdxl.validate(GenerationRequest("a star", seed=1, negative_prompt="red",
                                                                nasa_alpha=0.0))], cfg=True)  # fmt: skip
    assert torch.count_nonzero(given.uncond_embeds) > 0
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]


# ----- tiny decoder -----


@pytest.fixture(scope="module")
def tiny_vae_engine(tmp_path_factory, teacher_dir):
    from diffusers import AutoencoderTiny

    folder = shutil.copytree(teacher_dir, tmp_path_factory.mktemp("taesd") / "with-taesd")
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    ).save_pretrained(folder / "vae_tiny", safe_serialization=True)  # fmt: skip
    return Engine.load(folder)


def test_tiny_decoder_decodes_on_request(tiny_vae_engine):
    full = tiny_vae_engine.generate([GenerationRequest("a star", seed=2, num_inference_steps=1)])
    tiny = tiny_vae_engine.generate([GenerationRequest("a star", seed=2, num_inference_steps=1, tiny_decoder=True)])
    assert tiny.images[0].size == full.images[0].size == (64, 64)
    assert np.abs(pixels(tiny) - pixels(full)).mean() > 1.0
    key = tiny_vae_engine.batch_key
    assert key(GenerationRequest("a", seed=0, tiny_decoder=True)) != key(GenerationRequest("a", seed=0))
    assert tiny_vae_engine.memory_bytes() > sum(
        p.numel() * p.element_size() for m in (tiny_vae_engine.unet, tiny_vae_engine.vae) for p in m.parameters()
    )
