"""`attention` and `nasa_attention`: one call that runs on whichever backend is chosen.

Layout everywhere: q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D), output in q's dtype; no
masks (callers that need one use SDPA directly, as `kernels.processors` does). The `math` backend
is the reference the others are tested against. Triton and xformers load on first use only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashstep.kernels.backends import AttentionBackend, backend_for_call, backend_for_inputs
from flashstep.kernels.layout import check_layout, default_scale


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    compute = torch.promote_types(q.dtype, torch.float32)  # at least fp32, fp64 stays fp64
    scores = (
        q.to(compute) @ k.to(compute).transpose(-1, -2) * default_scale(q.shape[-1], scale)
    )  # (B, H, Lq, Lk)
    return (torch.softmax(scores, dim=-1) @ v.to(compute)).to(q.dtype)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _xformers_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> torch.Tensor:
    import xformers.ops as xops

    # xformers wants (B, L, H, D); transposed views keep the head dim contiguous, so no copy.
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2)


def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    from flashstep.kernels.triton_attention import flash_attention

    return flash_attention(q, k, v, scale)


ATTENTION_IMPLS: dict[AttentionBackend, Callable[..., torch.Tensor]] = {
    AttentionBackend.SDPA: _sdpa_attention,
    AttentionBackend.MATH: _math_attention,
    AttentionBackend.XFORMERS: _xformers_attention,
    AttentionBackend.TRITON: _triton_attention,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | AttentionBackend | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v; q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D).

    `backend` overrides the active choice (context manager, $FLASHSTEP_ATTN_BACKEND, default sdpa);
    an unavailable one, or one that cannot take these inputs (e.g. triton with float64), falls
    back to sdpa with a WARNING logged once. `scale` defaults to 1/sqrt(D).
    """
    check_layout(("q", "k", "v"), (q, k, v))
    chosen = backend_for_inputs(backend_for_call(backend), q)
    return ATTENTION_IMPLS[chosen](q, k, v, scale)


def nasa_attention(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    v_pos: torch.Tensor,
    k_neg: torch.Tensor,
    v_neg: torch.Tensor,
    alpha: float,
    *,
    backend: str | AttentionBackend | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """NASA attention: softmax(q k_pos^T s) v_pos - alpha * softmax(q k_neg^T s) v_neg (SNOOPI, Sec. 4).

    q (B, H, Lq, D), k_pos/v_pos (B, H, Lk+, D), k_neg/v_neg (B, H, Lk-, D) -> (B, H, Lq, D).
    The triton backend runs one fused kernel that reads q once; the others run two attention calls
    and subtract. alpha == 0 returns exactly `attention(q, k_pos, v_pos)` (the negative branch is
    skipped). Backend choice and fallback as in `attention`.
    """
    check_layout(("q", "k_pos", "v_pos", "k_neg", "v_neg"), (q, k_pos, v_pos, k_neg, v_neg))
    if not math.isfinite(alpha):
        raise ValueError(f"`alpha` must be a finite float but is {alpha}")
    chosen = backend_for_inputs(backend_for_call(backend), q)
    if alpha == 0:
        return ATTENTION_IMPLS[chosen](q, k_pos, v_pos, scale)
    if chosen is AttentionBackend.TRITON:
        from flashstep.kernels.triton_nasa import nasa_flash_attention

        return nasa_flash_attention(q, k_pos, v_pos, k_neg, v_neg, alpha, scale)
    positive = ATTENTION_IMPLS[chosen](q, k_pos, v_pos, scale)
    negative = ATTENTION_IMPLS[chosen](q, k_neg, v_neg, scale)
    return positive - alpha * negative
