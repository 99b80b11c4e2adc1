"""Kernel tests run the Triton kernels on the CPU interpreter unless TRITON_INTERPRET is set
already (tests/conftest.py); on a GPU machine `TRITON_INTERPRET=0 pytest tests/kernels` compiles them.
"""

import pytest
import torch


@pytest.fixture
def tiny_unet():
    """A seeded ~0.8M-parameter SD-style UNet2DConditionModel: 8x8x4 latents, 32-d text states.

    Attention modules: self- and cross-attention at 32 channels (64 tokens) and 64 channels (16
    tokens); `attention_head_dim=8` means 8 heads in diffusers' naming, so head dims 4 and 8.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


@pytest.fixture
def unet_inputs():
    """Seeded (sample (2, 4, 8, 8), timestep, encoder_hidden_states (2, 7, 32)) for `tiny_unet`."""
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    encoder_hidden_states = torch.randn(2, 7, 32, generator=gen)
    return sample, torch.tensor([999, 500]), encoder_hidden_states
