"""Shared constants and helpers for the kernel tests (a unique name: `conftest` is not importable).

`conftest.py` in this folder sets TRITON_INTERPRET before this module is imported.
"""

import pytest
import torch

from flashstep.kernels.backends import triton_interpreter_enabled

INTERPRETED = triton_interpreter_enabled()
# Interpreted kernels take CPU tensors; compiled ones need CUDA (their tests skip without it).
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
# (atol, rtol) of a Triton kernel against the fp32/fp64 `math` reference, per input dtype:
# fp32 uses IEEE dots, so only summation order differs; half types round p and v to 10 (fp16)
# or 7 (bf16) mantissa bits before the second dot and round the output once.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

needs_triton_device = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED,
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (compiled mode on a machine without CUDA)",
)
needs_cuda = pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a CUDA device and compiled Triton (TRITON_INTERPRET=0)"
)


def kernel_dtypes() -> list:
    """float32 and float16 everywhere; bfloat16 only compiled (the interpreter's tl.dot mistreats it)."""
    bf16 = pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            INTERPRETED, reason="Triton interpreter tl.dot multiplies bf16 bits as ints"
        ),
    )
    return [torch.float32, torch.float16, bf16]


def random_qkv(
    batch: int, heads: int, len_q: int, len_k: int, head_dim: int, dtype: torch.dtype, seed: int = 0
):
    """Seeded q (B, H, Lq, D), k/v (B, H, Lk, D) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, len_q, head_dim, generator=gen)
    k = torch.randn(batch, heads, len_k, head_dim, generator=gen)
    v = torch.randn(batch, heads, len_k, head_dim, generator=gen)
    return (t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))
