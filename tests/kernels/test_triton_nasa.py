"""The fused NASA kernel matches two math-reference attentions minus, and dispatch uses it."""

import pytest
import torch
from kernel_testing import DEVICE, TOLERANCES, kernel_dtypes, needs_cuda, needs_triton_device, random_qkv

import flashstep.kernels.triton_nasa as triton_nasa
from flashstep.kernels.backends import AttentionBackend
from flashstep.kernels.dispatch import attention, nasa_attention

# (B, H, Lq, Lk+, Lk-, D): positive and negative prompts of different lengths, tails everywhere.
SHAPES = [
    pytest.param((1, 2, 16, 16, 32, 16), id="block-multiples"),
    pytest.param((2, 2, 37, 77, 5, 8), id="cross-77-vs-5-d8"),
    pytest.param((1, 2, 40, 9, 30, 40), id="d40-pad64"),
    pytest.param((1, 1, 19, 24, 11, 80), id="d80-pad128"),
]


def negative_kv(batch: int, heads: int, len_k: int, head_dim: int, dtype: torch.dtype):
    _, k, v = random_qkv(batch, heads, 1, len_k, head_dim, dtype=dtype, seed=7)
    return k, v


def reference(q, k_pos, v_pos, k_neg, v_neg, alpha: float) -> torch.Tensor:
    """NASA from two float64 `math` attentions on the very same inputs."""
    d = [t.double() for t in (q, k_pos, v_pos, k_neg, v_neg)]
    return attention(d[0], d[1], d[2], backend="math") - alpha * attention(d[0], d[3], d[4], backend="math")


@needs_triton_device
@pytest.mark.parametrize("alpha", [0.1, 1.0, -0.5])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_nasa_matches_two_reference_attentions(shape, dtype, alpha):
    batch, heads, len_q, len_pos, len_neg, head_dim = shape
    q, k_pos, v_pos = random_qkv(batch, heads, len_q, len_pos, head_dim, dtype=dtype)
    k_neg, v_neg = negative_kv(batch, heads, len_neg, head_dim, dtype)
    out = triton_nasa.nasa_flash_attention(q, k_pos, v_pos, k_neg, v_neg, alpha)
    atol, rtol = TOLERANCES[dtype]
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(
        out.double(), reference(q, k_pos, v_pos, k_neg, v_neg, alpha), atol=atol * (1 + abs(alpha)), rtol=rtol
    )


@needs_triton_device
def test_fused_nasa_honours_explicit_scale():
    q, k_pos, v_pos = random_qkv(1, 2, 20, 17, 16, dtype=torch.float32)
    k_neg, v_neg = negative_kv(1, 2, 23, 16, torch.float32)
    out = triton_nasa.nasa_flash_attention(q, k_pos, v_pos, k_neg, v_neg, 0.3, scale=0.07)
    d = [t.double() for t in (q, k_pos, v_pos, k_neg, v_neg)]
    ref = attention(d[0], d[1], d[2], backend="math", scale=0.07) - 0.3 * attention(
        d[0], d[3], d[4], backend="math", scale=0.07
    )
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@needs_triton_device
def test_nasa_attention_on_triton_runs_the_fused_kernel_once(monkeypatch):
    calls = []
    fused = triton_nasa.nasa_flash_attention

    def counting(*args, **kwargs):
        calls.append(args[5])
        return fused(*args, **kwargs)

    monkeypatch.setattr(triton_nasa, "nasa_flash_attention", counting)
    q, k_pos, v_pos = random_qkv(1, 2, 18, 7, 16, dtype=torch.float32)
    k_neg, v_neg = negative_kv(1, 2, 12, 16, torch.float32)
    out = nasa_attention(q, k_pos, v_pos, k_neg, v_neg, 0.2, backend="triton")
    assert calls == [0.2]
    torch.testing.assert_close(
        out.double(), reference(q, k_pos, v_pos, k_neg, v_neg, 0.2), atol=2e-5, rtol=2e-5
    )


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_nasa_attention_unfused_backends_match_reference(backend):
    q, k_pos, v_pos = random_qkv(2, 2, 11, 7, 16, dtype=torch.float32)
    k_neg, v_neg = negative_kv(2, 2, 5, 16, torch.float32)
    out = nasa_attention(q, k_pos, v_pos, k_neg, v_neg, 0.1, backend=backend)
    torch.testing.assert_close(
        out.double(), reference(q, k_pos, v_pos, k_neg, v_neg, 0.1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_nasa_with_alpha_zero_is_exactly_plain_attention(backend, dtype):
    q, k_pos, v_pos = random_qkv(1, 2, 9, 6, 16, dtype=dtype)
    k_neg, v_neg = negative_kv(1, 2, 4, 16, dtype)
    plain = attention(q, k_pos, v_pos, backend=backend)
    assert torch.equal(nasa_attention(q, k_pos, v_pos, k_neg, v_neg, 0.0, backend=backend), plain)


def test_nasa_rejects_non_finite_alpha_and_mismatched_negative_prompt():
    q, k_pos, v_pos = random_qkv(1, 2, 9, 6, 16, dtype=torch.float32)
    k_neg, v_neg = negative_kv(1, 2, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="`alpha` must be a finite float but is nan"):
        nasa_attention(q, k_pos, v_pos, k_neg, v_neg, float("nan"))
    with pytest.raises(ValueError, match="`k_neg` has shape"):
        nasa_attention(q, k_pos, v_pos, k_neg[:, :1], v_neg[:, :1], 0.1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_nasa_matches_reference_at_sd15_cross_attention_on_gpu(dtype):
    q, k_pos, v_pos = random_qkv(2, 8, 4096, 77, 40, dtype=dtype)
    k_neg, v_neg = negative_kv(2, 8, 77, 40, dtype)
    out = nasa_attention(q, k_pos, v_pos, k_neg, v_neg, 0.1, backend=AttentionBackend.TRITON)
    atol, rtol = TOLERANCES[dtype]
    assert out.device.type == DEVICE
    torch.testing.assert_close(
        out.double(), reference(q, k_pos, v_pos, k_neg, v_neg, 0.1), atol=atol, rtol=rtol
    )
