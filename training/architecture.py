"""The Stable Diffusion architecture at toy scale, as typed configs that travel with checkpoints.

`ShapesArch` names every size knob of the three modules (VAE, CLIP text encoder, UNet). The
`default` sizes make the shipped `shapes-*` models; `tiny` sizes build in milliseconds and keep
the test suite fast. Both produce ordinary diffusers / transformers modules, so a folder saved
from them loads in vanilla `StableDiffusionPipeline` too.

Why these sizes (chosen for CPU training): the VAE follows
DESIGN.md's hint to go leaner than (32, 64, 64, 64) — the first 64x64 stage dominates its cost,
so it gets 16 channels and one ResNet per block; the UNet works on 8x8x4 latents, so three
levels (8 -> 4 -> 2) with cross-attention on the first two are enough.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


@dataclass(frozen=True)
class ShapesArch:
    """Sizes of the toy SD modules. Saved in training checkpoints and export provenance."""

    image_size: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 32
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_layers_per_block: int = 1
    unet_head_dim: int = 4  # SD1.5-style `attention_head_dim`: the number of heads
    unet_norm_groups: int = 16

    @classmethod
    def tiny(cls) -> ShapesArch:
        """Smallest sizes that still exercise every code path (tests, smoke runs)."""
        return cls(
            vae_channels=(8, 16, 16, 16),
            vae_norm_groups=4,
            text_hidden=32,
            text_layers=1,
            text_heads=2,
            unet_channels=(32, 32, 64),
            unet_head_dim=2,
            unet_norm_groups=8,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShapesArch:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(arch: ShapesArch) -> AutoencoderKL:
    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=arch.vae_layers_per_block,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.vae_norm_groups,
        sample_size=arch.image_size,
    )


def build_text_encoder(arch: ShapesArch, vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_hidden * 4,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.text_max_length,
        projection_dim=arch.text_hidden,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def build_unet(arch: ShapesArch) -> UNet2DConditionModel:
    n = len(arch.unet_channels)
    down = tuple("CrossAttnDownBlock2D" if i < n - 1 else "DownBlock2D" for i in range(n))
    up = tuple("UpBlock2D" if i == 0 else "CrossAttnUpBlock2D" for i in range(n))
    return UNet2DConditionModel(
        sample_size=arch.latent_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=arch.unet_channels,
        layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_hidden,
        attention_head_dim=arch.unet_head_dim,
        norm_num_groups=arch.unet_norm_groups,
    )
