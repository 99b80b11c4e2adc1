"""Fused NASA attention in Triton: both prompts' attention and their difference in one launch.

NASA (SNOOPI, "negative-away steer attention") replaces every cross-attention output with
`Z = softmax(Q K+^T * scale) V+ - alpha * softmax(Q K-^T * scale) V-`, where K+/V+ come from the
positive prompt and K-/V- from the negative prompt (same projections, possibly different lengths).
Two plain attention calls read Q twice and write two (B, H, Lq, D) outputs before subtracting; this
kernel loads each Q tile once, sweeps K+/V+ and then K-/V- with the online softmax of
`triton_attention._attn_fwd_inner`, and writes Z once.

Limits: those of `kernels.triton_attention` (forward only, no masks, float16/bfloat16/float32,
head dim <= 256 padded to a power of two >= 16, stride(-1) == 1, CUDA or TRITON_INTERPRET=1),
and Lk+ >= 1, Lk- >= 1. `alpha` is any float (0 still runs both sweeps; the dispatcher in
`kernels.dispatch` skips the negative branch for alpha == 0).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flashstep.kernels.layout import default_scale
from flashstep.kernels.triton_attention import (
    LOG2E,
    _attn_fwd_inner,
    autotune_configs,
    check_attention_inputs,
    dot_precision,
    padded_head_dim,
    prune_configs,
    shape_bucket,
)


# fmt: off
@triton.autotune(
    configs=autotune_configs(),
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM_PAD"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.heuristics(
    {
        "EVEN_N_POS": lambda args: args["LK_POS"] % args["BLOCK_N"] == 0,
        "EVEN_N_NEG": lambda args: args["LK_NEG"] % args["BLOCK_N"] == 0,
    }
)
@triton.jit
def _nasa_fwd(
    Q,
    KP,
    VP,
    KN,
    VN,
    Out,
    qk_scale,  # softmax scale * log2(e)
    alpha,  # weight of the negative branch
    stride_qb, stride_qh, stride_qm,
    stride_kpb, stride_kph, stride_kpn,
    stride_vpb, stride_vph, stride_vpn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_ob, stride_oh, stride_om,
    H,
    LQ,
    LK_POS,
    LK_NEG,
    LQ_BUCKET,  # autotune key only
    LK_BUCKET,  # autotune key only: bucket of max(LK_POS, LK_NEG)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N_POS: tl.constexpr,
    EVEN_N_NEG: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M must be >= 16 for tl.dot")
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N must be >= 16 for tl.dot")
    tl.static_assert(HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD must be >= 16 for tl.dot")
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PAD, "HEAD_DIM must fit in HEAD_DIM_PAD")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # batch x head
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    io_mask = (rows[:, None] < LQ) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, HEAD_DIM_PAD)
    q_base = Q + b * stride_qb + h * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=io_mask, other=0.0)  # read once

    acc_pos, l_pos = _attn_fwd_inner(
        q, qk_scale, KP + b * stride_kpb + h * stride_kph, VP + b * stride_vpb + h * stride_vph,
        stride_kpn, stride_vpn, LK_POS,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, EVEN_N_POS, INPUT_PRECISION,
    )
    out = acc_pos / l_pos[:, None]  # (BLOCK_M, HEAD_DIM_PAD) fp32, softmax(Q K+^T) V+
    acc_neg, l_neg = _attn_fwd_inner(
        q, qk_scale, KN + b * stride_knb + h * stride_knh, VN + b * stride_vnb + h * stride_vnh,
        stride_knn, stride_vnn, LK_NEG,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, EVEN_N_NEG, INPUT_PRECISION,
    )
    out = out - alpha * (acc_neg / l_neg[:, None])  # subtract in fp32, round once on store

    o_base = Out + b * stride_ob + h * stride_oh
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty), mask=io_mask)
# fmt: on


def nasa_flash_attention(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    v_pos: torch.Tensor,
    k_neg: torch.Tensor,
    v_neg: torch.Tensor,
    alpha: float,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k_pos^T s) v_pos - alpha * softmax(q k_neg^T s) v_neg in one kernel launch.

    q (B, H, Lq, D), k_pos/v_pos (B, H, Lk+, D), k_neg/v_neg (B, H, Lk-, D) -> (B, H, Lq, D);
    `scale` s defaults to 1/sqrt(D).
    """
    check_attention_inputs(("q", "k_pos", "v_pos", "k_neg", "v_neg"), (q, k_pos, v_pos, k_neg, v_neg))
    if not math.isfinite(alpha):
        raise ValueError(f"`alpha` must be a finite float but is {alpha}")
    batch, heads, len_q, head_dim = q.shape
    len_pos, len_neg = k_pos.shape[2], k_neg.shape[2]
    out = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)  # (B, H, Lq, D)
    if len_q == 0 or batch * heads == 0:
        return out
    sm_scale = default_scale(head_dim, scale)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)

    # fmt: off
    _nasa_fwd[grid](
        q, k_pos, v_pos, k_neg, v_neg, out, sm_scale * LOG2E, float(alpha),
        q.stride(0), q.stride(1), q.stride(2),
        k_pos.stride(0), k_pos.stride(1), k_pos.stride(2),
        v_pos.stride(0), v_pos.stride(1), v_pos.stride(2),
        k_neg.stride(0), k_neg.stride(1), k_neg.stride(2),
        v_neg.stride(0), v_neg.stride(1), v_neg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, len_q, len_pos, len_neg, shape_bucket(len_q), shape_bucket(max(len_pos, len_neg)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        INPUT_PRECISION=dot_precision(q.dtype),
    )
    # fmt: on
    return out
