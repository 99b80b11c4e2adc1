"""Shape checks and the default softmax scale that every attention backend shares.

Kept below `kernels.dispatch` and the Triton modules so both can use them: the dispatcher checks
inputs before it picks a backend, and the Triton host wrappers check them again when called
directly.
"""

from __future__ import annotations

import math

import torch


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
