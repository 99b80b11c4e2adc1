"""Flash-attention forward pass in Triton (online softmax, no materialised score matrix).

Computes `O = softmax(Q K^T * scale) V` for q (B, H, Lq, D) and k/v (B, H, Lk, D); one program per
(BLOCK_M query rows, batch x head). Algorithm: FlashAttention-2 (Dao 2023, Alg. 1), forward only.

Limits:
- forward only (no autograd); no attention mask, no causal mask, no dropout;
- dtypes float16, bfloat16, float32 (q, k and v share one dtype); the output has q's dtype;
  float16/bfloat16 inputs use tensor-core dots with float32 accumulation, float32 inputs use IEEE
  float32 dots (no TF32), so float32 is exact-ish but slow;
- head dim 1..256, padded inside the kernel to the next power of two >= 16 (`tl.dot` needs it) and
  masked, so 40 -> 64, 80 -> 128, 160 -> 256 costs the padded FLOPs;
- any Lq >= 0 and Lk >= 1 (tails are masked); self- and cross-attention (Lq != Lk);
- q, k, v must be contiguous in the head dim (stride(-1) == 1); other strides are free, so the
  (B, L, H, D).transpose(1, 2) views that attention processors build need no copy;
- bfloat16 needs CUDA: the Triton 3.x interpreter's `tl.dot` multiplies bf16 bit patterns;
- runs on CUDA, or on the CPU when TRITON_INTERPRET=1 is set before this module is first imported
  (the interpreter decides at decoration time; it then uses a single small config, no autotuning).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashstep.kernels.layout import check_layout, default_scale

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e)), and exp2 is the fast path


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


# Per-block shared memory every config must fit: A100's opt-in limit (163 KB) less headroom, so one
# config set serves sm80 and sm90 (227 KB). Checked against compiled kernels in test_triton_compile.
SHARED_MEMORY_BUDGET = 160 * 1024


def autotune_configs() -> list[triton.Config]:
    """Launch configs to tune over; a single small one under the CPU interpreter (tests stay fast)."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return autotune_configs_for_gpu()


def autotune_configs_for_gpu() -> list[triton.Config]:
    """The compiled-mode configs, whatever mode this process is in (the compile tests read them)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3),
            (128, 32, 8, 3),
            (128, 128, 8, 2),
            (64, 64, 4, 3),
            (64, 64, 8, 2),  # 8 warps spread the (64, 256) fp32 accumulator of head dim 160
            (64, 32, 4, 4),
            (64, 32, 8, 2),
            (32, 64, 4, 3),
            (32, 32, 4, 1),  # last: fits every dtype and head dim; the fallback when pruning leaves nothing
        ]
    ]


def shared_memory_estimate(config: triton.Config, head_dim_pad: int, element_size: int) -> int:
    """Upper bound on the shared memory (bytes) a config takes: the Q tile plus pipelined K and V tiles.

    Triton's software pipeline keeps `num_stages - 1` K and V tiles in flight (at least one of each),
    and Q's tile is staged once; float32 also stages the (BLOCK_M, BLOCK_N) probabilities for the
    P @ V dot (the compiler's figures: 4 * BLOCK_M * BLOCK_N plus at most 512 bytes). float32 at
    head dim 256 (160 padded) is what overflowed: the (32, 64, 4, 3) config asked for 303,232 bytes on
    an H200 (limit 232,448) before this check.
    """
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    buffers = max(config.num_stages - 1, 1)
    tiles = element_size * head_dim_pad * (bm + 2 * buffers * bn)
    return tiles + (4 * bm * bn + 1024 if element_size == 4 else 0)


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose tiles cannot fit shared memory or only waste work for this shape bucket."""
    head_dim_pad = kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD"))
    element_size = named_args["Q"].element_size()
    fitting = [
        c for c in configs if shared_memory_estimate(c, head_dim_pad, element_size) <= SHARED_MEMORY_BUDGET
    ]
    kept = []
    for config in fitting:
        bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if bn > max(named_args["LK_BUCKET"], 32) or bm > max(named_args["LQ_BUCKET"], 32):
            continue  # a tile wider than the whole (bucketed) sequence is pure padding
        kept.append(config)
    return kept or fitting[-1:] or configs[-1:]


def shape_bucket(length: int) -> int:
    """Autotune key for a sequence length: next power of two, so 77 and 100 share a tuned config."""
    return min(triton.next_power_of_2(max(length, 1)), 16384)


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to a power of two >= 16, the smallest extent `tl.dot` accepts."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use IEEE dots (TF32 would lose ~3 digits); half types ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attn_fwd_inner(
    q,  # (BLOCK_M, HEAD_DIM_PAD)
    qk_scale,  # sm_scale * log2(e): scores live in the log2 domain so the loop can use exp2
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    LK,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Online-softmax sweep over all key/value tiles; returns (acc, l) with O = acc / l[:, None]."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM  # (HEAD_DIM_PAD,) padding columns load as 0 and add nothing to q.k
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=tl.float32)  # running unnormalised output
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        kv_mask = d_mask[None, :]
        if not EVEN_N:
            kv_mask = kv_mask & (cols[:, None] < LK)
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        if not EVEN_N:
            qk = tl.where(cols[None, :] < LK, qk, float("-inf"))
        # Every tile holds >= 1 valid column (LK >= 1), so m_new is finite and exp2 never sees nan.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        correction = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i


# fmt: off
@triton.autotune(
    configs=autotune_configs(),
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM_PAD"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.heuristics({"EVEN_N": lambda args: args["LK"] % args["BLOCK_N"] == 0})
@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    H,
    LQ,
    LK,
    LQ_BUCKET,  # autotune key only
    LK_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16, "BLOCK_M must be >= 16 for tl.dot")
    tl.static_assert(BLOCK_N >= 16, "BLOCK_N must be >= 16 for tl.dot")
    tl.static_assert(HEAD_DIM_PAD >= 16, "HEAD_DIM_PAD must be >= 16 for tl.dot")
    tl.static_assert(HEAD_DIM <= HEAD_DIM_PAD, "HEAD_DIM must fit in HEAD_DIM_PAD")
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # batch x head
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = Out + b * stride_ob + h * stride_oh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    io_mask = (rows[:, None] < LQ) & (offs_d[None, :] < HEAD_DIM)  # (BLOCK_M, HEAD_DIM_PAD)
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=io_mask, other=0.0)

    acc, l_i = _attn_fwd_inner(
        q, qk_scale, k_base, v_base, stride_kn, stride_vn, LK,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, EVEN_N, INPUT_PRECISION,
    )
    out = acc / l_i[:, None]
    tl.store(o_base + rows[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty), mask=io_mask)
# fmt: on


def check_attention_inputs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Raise a ValueError naming the argument when q/k/v cannot go to the Triton kernels.

    `names[0]`/`tensors[0]` is the query; the rest are key/value tensors, in (key, value) pairs.
    """
    check_layout(names, tensors)
    q_name, q = names[0], tensors[0]
    for name, t in zip(names, tensors, strict=True):
        if t.stride(-1) != 1:
            raise ValueError(
                f"`{name}` must be contiguous in its last (head) dim, i.e. stride(-1) == 1, "
                f"but has strides {t.stride()}"
            )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"`{q_name}` dtype must be one of {SUPPORTED_DTYPES} but is {q.dtype}")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (`{q_name}`.shape[3]) must be in [1, {MAX_HEAD_DIM}] but is {q.shape[3]}")
    if q.dtype == torch.bfloat16 and _interpreting():
        raise ValueError(
            f"`{q_name}` dtype torch.bfloat16 is not supported under TRITON_INTERPRET=1: the interpreter's "
            "tl.dot multiplies bf16 bit patterns as integers (float16 and float32 work)"
        )
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"`{q_name}` is on {q.device}; the Triton kernels need a CUDA tensor, "
            "or TRITON_INTERPRET=1 set before `kernels` first loads them (CPU interpreter)"
        )


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v with the Triton kernel; q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D).

    `scale` defaults to 1/sqrt(D). See the module docstring for the limits.
    """
    check_attention_inputs(("q", "k", "v"), (q, k, v))
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    out = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)  # (B, H, Lq, D)
    if len_q == 0 or batch * heads == 0:
        return out
    sm_scale = default_scale(head_dim, scale)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(len_q, meta["BLOCK_M"]), batch * heads)

    # fmt: off
    _attn_fwd[grid](
        q, k, v, out, sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, len_q, len_k, shape_bucket(len_q), shape_bucket(len_k),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        INPUT_PRECISION=dot_precision(q.dtype),
    )
    # fmt: on
    return out
