"""install_attention_backend: a whole UNet on triton matches sdpa; processors match diffusers'."""

import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from kernel_testing import DEVICE, needs_triton_device

import flashstep.kernels.backends as backends
import flashstep.kernels.dispatch as dispatch
from flashstep.kernels.backends import AttentionBackend
from flashstep.kernels.processors import FlashstepAttnProcessor, install_attention_backend

# fp32 UNet outputs after 8 attention layers plus convs; the kernels differ only in summation order.
UNET_ATOL, UNET_RTOL = 1e-4, 1e-4
MODULE_ATOL, MODULE_RTOL = 1e-5, 1e-5


def attention_modules(unet: torch.nn.Module) -> list[Attention]:
    return [m for m in unet.modules() if isinstance(m, Attention)]


def count_calls(monkeypatch, backend: AttentionBackend) -> list[tuple[int, ...]]:
    """Wrap `backend`'s implementation to record the q shapes it really ran on."""
    shapes: list[tuple[int, ...]] = []
    real = dispatch.ATTENTION_IMPLS[backend]

    def counted(q, *args):
        shapes.append(tuple(q.shape))
        return real(q, *args)

    monkeypatch.setitem(dispatch.ATTENTION_IMPLS, backend, counted)
    return shapes


class FakeNasaProcessor(AttnProcessor2_0):
    """Stands in for models/nasa.py's processor: only the marker attribute matters here."""

    is_nasa_processor = True


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    sample, timestep, encoder_hidden_states = inputs
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


def test_sdpa_processor_reproduces_stock_diffusers_unet(tiny_unet, unet_inputs):
    stock = run(tiny_unet, unet_inputs)
    assert install_attention_backend(tiny_unet, "sdpa") == len(attention_modules(tiny_unet)) == 8
    assert all(isinstance(m.processor, FlashstepAttnProcessor) for m in attention_modules(tiny_unet))
    torch.testing.assert_close(run(tiny_unet, unet_inputs), stock, atol=MODULE_ATOL, rtol=MODULE_RTOL)


@needs_triton_device
@pytest.mark.slow
def test_unet_on_triton_matches_unet_on_sdpa(tiny_unet, unet_inputs, monkeypatch):
    # On CUDA, float32 convolutions default to TF32, which rounds inputs to 10 mantissa bits: a 1e-6
    # difference between two attention kernels then flips roundings and grows to ~6e-4 (seen on an
    # H200). Compare the kernels, not TF32's rounding (matmuls already default to IEEE float32).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    unet = tiny_unet.to(DEVICE)
    inputs = tuple(t.to(DEVICE) for t in unet_inputs)
    install_attention_backend(unet, "sdpa")
    expected = run(unet, inputs)
    triton_calls = count_calls(monkeypatch, AttentionBackend.TRITON)
    assert install_attention_backend(unet, "triton") == 8
    out = run(unet, inputs)
    # Self + cross attention per transformer: 1 down and 2 up at 32 channels (8x8 = 64 tokens, 8 heads
    # of dim 4), 1 in the mid block at 64 channels (4x4 = 16 tokens, dim 8); q shapes (B, H, Lq, D).
    assert sorted(triton_calls) == sorted([(2, 8, 64, 4)] * 6 + [(2, 8, 16, 8)] * 2)
    torch.testing.assert_close(out, expected, atol=UNET_ATOL, rtol=UNET_RTOL)


def test_install_skips_nasa_processors_and_unchanged_modules(tiny_unet):
    cross = [m for m in attention_modules(tiny_unet) if m.is_cross_attention]
    nasa = FakeNasaProcessor()
    cross[0].set_processor(nasa)
    assert install_attention_backend(tiny_unet, "math") == 7
    assert cross[0].processor is nasa
    assert install_attention_backend(tiny_unet, "math") == 0  # already there
    assert install_attention_backend(tiny_unet, "sdpa") == 7


def test_install_with_unavailable_backend_falls_back_with_one_warning(tiny_unet, caplog):
    if not backends.unmet_requirements(AttentionBackend.XFORMERS):
        pytest.skip("xformers is usable here")
    with caplog.at_level(logging.WARNING, logger="flashstep.kernels"):
        assert install_attention_backend(tiny_unet, "xformers") == 8
    warnings = [r for r in caplog.records if r.name == "flashstep.kernels" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "requested=xformers" in warnings[0].getMessage()
    assert {m.processor.backend for m in attention_modules(tiny_unet)} == {AttentionBackend.SDPA}


def vae_style_attention() -> Attention:
    """4-D input, group norm, residual and rescale, as in diffusers' VAE mid-block attention."""
    return Attention(
        query_dim=32,
        heads=2,
        dim_head=16,
        norm_num_groups=8,
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )


MODULE_CASES = {
    "4d-groupnorm-residual-rescale": (
        vae_style_attention,
        lambda g: {"hidden_states": torch.randn(2, 32, 5, 7, generator=g)},
    ),
    "4d-spatial-norm": (
        lambda: Attention(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True),
        lambda g: {
            "hidden_states": torch.randn(2, 32, 4, 4, generator=g),
            "temb": torch.randn(2, 4, 2, 2, generator=g),
        },
    ),
    "3d-cross-layernorm": (
        lambda: Attention(
            query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, cross_attention_norm="layer_norm"
        ),
        lambda g: {
            "hidden_states": torch.randn(2, 19, 32, generator=g),
            "encoder_hidden_states": torch.randn(2, 11, 24, generator=g),
        },
    ),
    "3d-self-qk-norm": (
        lambda: Attention(query_dim=40, heads=1, dim_head=40, qk_norm="layer_norm"),
        lambda g: {"hidden_states": torch.randn(1, 23, 40, generator=g)},
    ),
    "3d-cross-with-mask": (
        lambda: Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8),
        lambda g: {
            "hidden_states": torch.randn(2, 9, 32, generator=g),
            "encoder_hidden_states": torch.randn(2, 6, 24, generator=g),
            "attention_mask": torch.tensor([[0.0] * 4 + [-1e4] * 2, [0.0] * 6]),
        },
    ),
}


@needs_triton_device
@pytest.mark.parametrize("backend", [AttentionBackend.TRITON, AttentionBackend.MATH])
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_processor_matches_diffusers_attn_processor2_0(case, backend, monkeypatch):
    make_module, make_inputs = MODULE_CASES[case]
    torch.manual_seed(0)
    module = make_module().eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs(torch.Generator().manual_seed(1)).items()}
    with torch.no_grad():
        module.set_processor(AttnProcessor2_0())
        expected = module(**inputs)
        calls = count_calls(monkeypatch, backend)
        module.set_processor(FlashstepAttnProcessor(backend))
        out = module(**inputs)
    assert len(calls) == (0 if "mask" in case else 1)  # masked calls run SDPA with the mask
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=MODULE_ATOL, rtol=MODULE_RTOL)
