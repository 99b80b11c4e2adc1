"""The Triton flash-attention kernel matches the math reference (interpreter on CPU, or CUDA)."""

import pytest
import torch
from kernel_testing import (
    DEVICE,
    INTERPRETED,
    TOLERANCES,
    kernel_dtypes,
    needs_cuda,
    needs_triton_device,
    random_qkv,
)

from flashstep.kernels.dispatch import attention

pytestmark = needs_triton_device

# (B, H, Lq, Lk, D): interpreter blocks are 16x16, so most lengths leave masked tails.
SHAPES = [
    pytest.param((1, 2, 16, 32, 16), id="block-multiples"),
    pytest.param((2, 2, 37, 77, 8), id="cross-77-d8-pad16"),
    pytest.param((1, 2, 50, 50, 40), id="self-50-d40-pad64"),
    pytest.param((1, 1, 33, 20, 80), id="cross-Lq>Lk-d80-pad128"),
    pytest.param((1, 1, 18, 9, 160), id="cross-d160-pad256"),
    pytest.param((1, 3, 1, 1, 4), id="single-token-d4"),
]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The `math` backend in float64 on the very same (already rounded) inputs."""
    return attention(q.double(), k.double(), v.double(), backend="math", scale=scale)


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_attention_matches_math_reference(shape, dtype):
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(*shape, dtype=dtype)
    out = flash_attention(q, k, v)
    assert out.shape == q.shape
    assert_matches_reference(out, reference(q, k, v), dtype)


def test_flash_attention_honours_explicit_scale():
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(1, 2, 20, 24, 16, dtype=torch.float32)
    out = flash_attention(q, k, v, scale=0.05)
    assert_matches_reference(out, reference(q, k, v, scale=0.05), torch.float32)
    assert not torch.allclose(out, flash_attention(q, k, v), atol=1e-3)


def test_flash_attention_is_stable_for_large_scores():
    """Scores of +-100s would overflow a naive exp; the running max keeps the softmax finite."""
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(1, 1, 24, 40, 16, dtype=torch.float32)
    out = flash_attention(q * 30.0, k * 30.0, v)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, reference(q * 30.0, k * 30.0, v), torch.float32)


def test_flash_attention_takes_head_transposed_views_without_copies():
    """Processors pass (B, L, H, D).transpose(1, 2) views: strided, but contiguous in D."""
    from flashstep.kernels.triton_attention import flash_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 21, 3, 16, generator=gen).to(DEVICE).transpose(1, 2)  # (B, H, Lq, D) view
    kv = torch.randn(2, 2, 19, 3, 16, generator=gen).to(DEVICE)
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    assert not q.is_contiguous()
    assert_matches_reference(flash_attention(q, k, v), reference(q, k, v), torch.float32)


def test_flash_attention_with_empty_query_returns_empty():
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(1, 2, 0, 5, 16, dtype=torch.float32)
    assert flash_attention(q, k, v).shape == (1, 2, 0, 16)


@pytest.mark.parametrize(
    ("make_inputs", "message"),
    [
        pytest.param(
            lambda q, k, v: (q.double(), k.double(), v.double()), "`q` dtype must be one of", id="float64"
        ),
        pytest.param(lambda q, k, v: (q, k.half(), v), "`k` has dtype torch.float16", id="dtype-mismatch"),
        pytest.param(
            lambda q, k, v: (q, k.transpose(2, 3).contiguous().transpose(2, 3), v),
            "`k` must be contiguous in its last",
            id="strided-head-dim",
        ),
        pytest.param(
            lambda q, k, v: (q, k, v[:, :, :3]),
            "`k` has shape (1, 2, 5, 16) but `v` has",
            id="kv-length-mismatch",
        ),
        pytest.param(
            lambda q, k, v: (q, k[:1, :1], v[:1, :1]), "`k` has shape (1, 1, 5, 16)", id="head-mismatch"
        ),
        pytest.param(lambda q, k, v: (q[0], k, v), "`q` must be 4-D", id="3d-query"),
        pytest.param(lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "at least one key", id="no-keys"),
    ],
)
def test_flash_attention_rejects_bad_inputs_naming_the_argument(make_inputs, message):
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(1, 2, 6, 5, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flash_attention(*make_inputs(q, k, v))


def test_flash_attention_rejects_head_dims_over_256():
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(1, 1, 4, 4, 257, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"head dim .* must be in \[1, 256\] but is 257"):
        flash_attention(q, k, v)


@pytest.mark.skipif(not INTERPRETED, reason="documents an interpreter-only limitation")
def test_interpreter_refuses_bfloat16_with_a_reason():
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(1, 1, 4, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 is not supported under TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 4096, 4096, 40), (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160), (1, 8, 4096, 77, 40)],
    ids=["sd15-self-4096-d40", "sd15-cross-1024-d80", "sd15-self-256-d160", "sd15-cross-4096-d40"],
)
def test_flash_attention_matches_reference_at_sd15_shapes_on_gpu(shape, dtype):
    from flashstep.kernels.triton_attention import flash_attention

    q, k, v = random_qkv(*shape, dtype=dtype)
    ref = attention(q.float(), k.float(), v.float(), backend="math").double()
    assert_matches_reference(flash_attention(q, k, v), ref, dtype)
