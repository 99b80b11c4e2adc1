"""Stable Diffusion 1.5 at full size with random weights, from the public config values (no download).

    unet, vae, text_encoder, tiny = build_sd15()            # float32, CPU, random weights
    counts = parameter_counts()                             # on the meta device: no memory, no init
    export_random_sd15(folder, dtype=torch.float16)         # a servable folder (GPU benchmarks)

The values are those of the public SD1.5 `unet/`, `vae/` and `text_encoder/` configs (CLIP ViT-L/14's
text tower) and of TAESD (diffusers' `AutoencoderTiny` defaults), written out here so nothing is
fetched. Random weights cost exactly what trained ones cost: the benchmarks time the architecture.
Parameter counts, for reference: UNet 859,520,964; VAE 83,653,863; text encoder 123,060,480.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

RESOLUTION = 512
LATENT_SIZE = RESOLUTION // 8  # 64x64x4 latents
TEXT_TOKENS = 77

SD15_UNET = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)

SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=RESOLUTION,
    scaling_factor=0.18215,
)

# CLIP ViT-L/14 text tower, as SD1.5's text_encoder/config.json gives it.
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=TEXT_TOKENS,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)

# TAESD: diffusers' AutoencoderTiny defaults are TAESD's (madebyollin/taesd) config.
TAESD = dict(
    in_channels=3,
    out_channels=3,
    encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64),
    num_encoder_blocks=(1, 3, 3, 3),
    num_decoder_blocks=(3, 3, 3, 1),
    latent_channels=4,
    upsampling_scaling_factor=2,
    act_fn="relu",
    scaling_factor=1.0,
)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**SD15_UNET)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**SD15_VAE)


def build_text_encoder(bos_token_id: int = 49406, eos_token_id: int = 49407):
    """CLIP's text tower; bos/eos ids are CLIP's (a custom tokenizer passes its own)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**SD15_TEXT, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    return CLIPTextModel(config)


def build_tiny_decoder():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(**TAESD)


def build_sd15(seed: int = 0):
    """(unet, vae, text_encoder, tiny_decoder), float32 on the CPU, random weights, eval mode."""
    torch.manual_seed(seed)
    modules = (build_unet(), build_vae(), build_text_encoder(), build_tiny_decoder())
    for module in modules:
        module.eval().requires_grad_(False)
    return modules


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts() -> dict[str, int]:
    """Parameters of each module, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        vae = build_vae()
        return {
            "unet": count_parameters(build_unet()),
            "vae": count_parameters(vae),
            "vae_decoder": count_parameters(vae.decoder) + count_parameters(vae.post_quant_conv),
            "text_encoder": count_parameters(build_text_encoder()),
            "tiny_decoder": count_parameters(build_tiny_decoder().decoder),
        }


def export_random_sd15(folder: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A servable SD1.5-size folder (teacher family: 1 or 25 steps, CFG 7.5, 512 px) with random weights.

    The tokenizer is the shapes world's BPE (CLIP's vocabulary cannot be downloaded) saved for 77
    tokens; its ids index the 49,408-row embedding like CLIP's would. `vae_tiny/` holds TAESD, so the
    engine's tiny-decoder path is timed too.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from flashstep.models.flashstep_config import FlashstepConfig
    from flashstep.training.export import SD_SCHEDULE
    from flashstep.training.tokenizer import build_tokenizer

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tokenizer = build_tokenizer(folder / "_tokenizer_build", model_max_length=TEXT_TOKENS)
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(tokenizer.bos_token_id, tokenizer.eos_token_id)
    pipe = StableDiffusionPipeline(
        vae=build_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=build_unet(),
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    build_tiny_decoder().to(dtype).save_pretrained(folder / "vae_tiny", safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_build")
    FlashstepConfig(
        family="teacher", default_steps=25, allowed_steps=(1, 25), default_guidance_scale=7.5,
        resolution=RESOLUTION, provenance={"weights": "random", "arch": "SD1.5 public config"},
    ).save(folder)  # fmt: skip
    return folder
