"""A diffusers attention processor that runs `dispatch.attention`, and its installer for a UNet.

`FlashstepAttnProcessor` follows diffusers' `AttnProcessor2_0` step for step (spatial norm, 4-D
hidden states, group norm, cross-attention norm, q/k norms, output projection, residual,
rescale) and swaps only the attention product for `dispatch.attention` with the chosen backend.
The steps before and after that product are `attention_prologue` / `attention_epilogue`, which
`models.nasa.NasaAttnProcessor` uses too.

Limits: calls that carry an `attention_mask` run SDPA with the mask, because the Triton and
xformers paths take none (SD UNets pass no mask). Modules with added key/value projections
(`added_kv_proj_dim`) and processors that own weights (`nn.Module` processors such as IP-Adapter)
are left alone, as are NASA processors (`is_nasa_processor = True`, from `models/nasa.py`).
diffusers is imported only inside `install_attention_backend`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flashstep.kernels.backends import AttentionBackend, resolve_backend
from flashstep.kernels.dispatch import attention

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

logger = logging.getLogger("flashstep.kernels")


@dataclass(frozen=True)
class AttentionInputs:
    """What `attention_prologue` hands to the attention product, and what `attention_epilogue` needs back.

    Shared by `FlashstepAttnProcessor` and `models.nasa.NasaAttnProcessor`, which differ only in
    the attention product between the two.
    """

    query: torch.Tensor  # (B, H, Lq, D)
    key: torch.Tensor  # (B, H, Lk, D)
    value: torch.Tensor  # (B, H, Lk, D)
    attention_mask: torch.Tensor | None  # (B, H, Lq or 1, Lk), prepared for SDPA
    residual: torch.Tensor  # the processor's input, before any norm
    image_shape: torch.Size | None  # (B, C, H, W) when the (normed) input was 4-D, else None
    batch_size: int


def attention_prologue(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
) -> AttentionInputs:
    """Steps 1-2 of diffusers' `AttnProcessor2_0`: norms, (B, C, H, W) -> (B, HW, C), mask, projections.

    Self-attention (`encoder_hidden_states is None`) projects keys and values from
    `hidden_states`, cross-attention from the prompt's states. Kept in one place so every
    processor here matches diffusers the same way.
    """
    # 1. Norms that act before the projections, and the (B, C, H, W) -> (B, HW, C) flattening.
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
    if image_shape is not None:
        batch_size, channel, height, width = image_shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, key_len, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    # 2. Projections: self-attention reads its own states, cross-attention the prompt's.
    query = attn.to_q(hidden_states)  # (B, Lq, H*D)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)  # (B, Lk, H*D)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lq, D)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Lk, D)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return AttentionInputs(query, key, value, attention_mask, residual, image_shape, batch_size)


def attention_epilogue(attn: Attention, hidden_states: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """Steps 4-5 of diffusers' `AttnProcessor2_0`: merge heads, to_out, back to 4-D, residual, rescale.

    `hidden_states` is the attention product (B, H, Lq, D) of `inputs`; the result has the
    processor input's shape. The counterpart of `attention_prologue`.
    """
    query = inputs.query
    hidden_states = hidden_states.transpose(1, 2).reshape(inputs.batch_size, -1, attn.heads * query.shape[-1])
    hidden_states = hidden_states.to(query.dtype)  # (B, Lq, H*D)
    hidden_states = attn.to_out[0](hidden_states)  # output projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout
    if inputs.image_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(inputs.image_shape)  # (B, C, H, W)
    if attn.residual_connection:
        hidden_states = hidden_states + inputs.residual
    return hidden_states / attn.rescale_output_factor


class FlashstepAttnProcessor:
    """Attention processor (self- and cross-attention) that runs `dispatch.attention` on `backend`."""

    def __init__(self, backend: AttentionBackend) -> None:
        self.backend = backend

    def __repr__(self) -> str:
        return f"FlashstepAttnProcessor(backend={self.backend.value!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = attention_prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        # The attention product on the chosen backend (masked calls need SDPA's mask support).
        if inputs.attention_mask is not None:
            out = F.scaled_dot_product_attention(
                inputs.query, inputs.key, inputs.value, attn_mask=inputs.attention_mask, scale=attn.scale
            )
        else:
            out = attention(inputs.query, inputs.key, inputs.value, backend=self.backend, scale=attn.scale)
        return attention_epilogue(attn, out, inputs)


def install_attention_backend(unet: torch.nn.Module, backend: str | AttentionBackend | None = None) -> int:
    """Give every diffusers `Attention` module in `unet` a processor on `backend`; return how many changed.

    `backend` is resolved once (`resolve_backend`: argument, context, $FLASHSTEP_ATTN_BACKEND,
    default sdpa; an unavailable one falls back to sdpa with one WARNING). Skipped: NASA
    processors (`is_nasa_processor`), processors that own weights, modules with added KV
    projections, and modules already on this backend.
    """
    from diffusers.models.attention_processor import Attention

    chosen = resolve_backend(backend)
    changed = skipped = 0
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        current = module.processor
        if getattr(current, "is_nasa_processor", False):
            skipped += 1
            continue
        if isinstance(current, torch.nn.Module) or module.added_kv_proj_dim is not None:
            logger.info(
                "attention processor left unchanged: module=%s processor=%s", name, type(current).__name__
            )
            skipped += 1
            continue
        if isinstance(current, FlashstepAttnProcessor) and current.backend is chosen:
            continue
        module.set_processor(FlashstepAttnProcessor(chosen))
        changed += 1
    logger.info(
        "attention backend installed: backend=%s changed=%d skipped=%d", chosen.value, changed, skipped
    )
    return changed
