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

from kernels.backends import AttentionBackend, backend_for_call, backend_for_inputs


def check_layout(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Raise naming the argument unless q, then (key, value) pairs, are 4-D and agree in B, H, D.

    `names[0]`/`tensors[0]` is the query; every key/value pair must share its length Lk >= 1, and
    all tensors share one dtype and device.
    """
    q_name, q = names[0], tensors[0]
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor but is {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"`{name}` must be 4-D (B, H, L, D) but has shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"`{name}` has dtype {t.dtype} but `{q_name}` has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"`{name}` is on {t.device} but `{q_name}` is on {q.device}; they must match")
        if (t.shape[0], t.shape[1], t.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
            raise ValueError(
                f"`{name}` has shape {tuple(t.shape)}, which does not match `{q_name}` "
                f"{tuple(q.shape)} in batch, heads or head dim (B, H, _, D)"
            )
    for k_name, k, v_name, v in zip(names[1::2], tensors[1::2], names[2::2], tensors[2::2], strict=True):
        if k.shape != v.shape:
            raise ValueError(f"`{k_name}` has shape {tuple(k.shape)} but `{v_name}` has {tuple(v.shape)}")
        if k.shape[2] < 1:
            raise ValueError(
                f"`{k_name}` must hold at least one key (Lk >= 1) but has shape {tuple(k.shape)}"
            )


def default_scale(head_dim: int, scale: float | None) -> float:
    """`scale`, or 1/sqrt(head_dim) when it is None (Vaswani et al. 2017, eq. 1)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


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
    from kernels.triton_attention import flash_attention

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
        from kernels.triton_nasa import nasa_flash_attention

        return nasa_flash_attention(q, k_pos, v_pos, k_neg, v_neg, alpha, scale)
    positive = ATTENTION_IMPLS[chosen](q, k_pos, v_pos, scale)
    negative = ATTENTION_IMPLS[chosen](q, k_neg, v_neg, scale)
    return positive - alpha * negative
