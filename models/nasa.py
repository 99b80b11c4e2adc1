"""NASA: negative-away steer attention, the training-free negative prompt of SNOOPI (Nguyen et al. 2024, Sec. 4).

In every cross-attention layer the positive prompt's attention output loses alpha times the
negative prompt's, both computed with the layer's own projections, before the output projection:

    Z = softmax(Q K+^T / sqrt d) V+ - alpha * softmax(Q K-^T / sqrt d) V-

`NasaAttnProcessor` is installed once, at load, on cross-attention modules only (self-attention
is left to `processors.install_attention_backend`). Without an active `nasa_context` it computes
plain attention, so a UNet that carries it serves ordinary requests unchanged.

The negative embeddings and per-image alphas of one UNet call travel in a `ContextVar` set by
`nasa_context` around that call: a module's processor is shared by every thread, and diffusers
would pass `cross_attention_kwargs` to the self-attention processors too (which warn and drop
them). Each thread has its own context, so concurrent batches never see each other's negatives.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from flashstep.kernels.dispatch import attention, nasa_attention
from flashstep.kernels.processors import attention_epilogue, attention_prologue

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class NasaInputs:
    """The negative side of one UNet call: one row per row of the UNet batch."""

    negative_embeds: torch.Tensor  # (B, L-, C) text-encoder states of the negative prompts
    alphas: tuple[float, ...]  # (B,) 0.0 for rows that get plain attention (e.g. CFG's uncond half)


_NASA_INPUTS: contextvars.ContextVar[NasaInputs | None] = contextvars.ContextVar("flashstep_nasa", default=None)


@contextlib.contextmanager
def nasa_context(negative_embeds: torch.Tensor, alphas: Sequence[float]) -> Iterator[None]:
    """Within this block, NASA processors subtract `alphas[i]` x the attention to `negative_embeds[i]`."""
    if negative_embeds.shape[0] != len(alphas):
        raise ValueError(
            f"`alphas` needs one value per negative embedding: {len(alphas)} for {negative_embeds.shape[0]}"
        )
    token = _NASA_INPUTS.set(NasaInputs(negative_embeds, tuple(float(a) for a in alphas)))
    try:
        yield
    finally:
        _NASA_INPUTS.reset(token)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D)."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


class NasaAttnProcessor:
    """Cross-attention processor: plain attention, or NASA inside a `nasa_context`.

    Follows diffusers' `AttnProcessor2_0` step for step (`kernels.processors.attention_prologue` /
    `attention_epilogue`) and runs the attention product through `dispatch.attention` /
    `dispatch.nasa_attention` (fused Triton kernel when that backend is chosen).
    """

    is_nasa_processor = True  # processors.install_attention_backend leaves these alone

    def __init__(self, backend: str | None = None) -> None:
        self.backend = backend  # None: the active kernels backend at call time

    def __repr__(self) -> str:
        return f"NasaAttnProcessor(backend={self.backend!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        nasa = _NASA_INPUTS.get()
        cross = encoder_hidden_states is not None
        if attention_mask is not None and nasa is not None and cross:
            raise ValueError("NASA attention takes no attention mask; SD UNets pass none")
        # The negative prompt goes through the same to_k / to_v, in `_nasa`.
        inputs = attention_prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query, key, value = inputs.query, inputs.key, inputs.value  # (B, H, L, D)

        # The attention product: NASA where a row has alpha > 0, plain attention elsewhere.
        if inputs.attention_mask is not None:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=inputs.attention_mask, scale=attn.scale
            )
        elif nasa is None or not cross or not any(nasa.alphas):
            out = attention(query, key, value, backend=self.backend, scale=attn.scale)
        else:
            out = self._nasa(attn, query, key, value, nasa)
        return attention_epilogue(attn, out, inputs)

    def _nasa(
        self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, nasa: NasaInputs
    ) -> torch.Tensor:
        batch = query.shape[0]
        if nasa.negative_embeds.shape[0] != batch:
            raise ValueError(f"NASA context holds {nasa.negative_embeds.shape[0]} negatives for a batch of {batch}")
        negative = nasa.negative_embeds.to(dtype=query.dtype)
        if attn.norm_cross:
            negative = attn.norm_encoder_hidden_states(negative)
        key_neg = _heads(attn.to_k(negative), attn.heads)  # (B, H, Lk-, D)
        value_neg = _heads(attn.to_v(negative), attn.heads)
        if attn.norm_k is not None:
            key_neg = attn.norm_k(key_neg)
        # Rows sharing an alpha run as one call (usually the whole batch, or CFG's two halves).
        groups: dict[float, list[int]] = {}
        for row, alpha in enumerate(nasa.alphas):
            groups.setdefault(alpha, []).append(row)
        if len(groups) == 1:
            alpha = nasa.alphas[0]
            return nasa_attention(
                query, key, value, key_neg, value_neg, alpha, backend=self.backend, scale=attn.scale
            )
        out = torch.empty_like(query)
        for alpha, rows in groups.items():
            idx = torch.tensor(rows, device=query.device)
            out[idx] = nasa_attention(
                query[idx], key[idx], value[idx], key_neg[idx], value_neg[idx], alpha,
                backend=self.backend, scale=attn.scale,
            )  # fmt: skip
        return out


def install_nasa_processors(unet: torch.nn.Module, backend: str | None = None) -> int:
    """Put a `NasaAttnProcessor` on every cross-attention module of `unet`; return how many.

    Self-attention modules (no `cross_attention_dim`) keep their processor.
    """
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(NasaAttnProcessor(backend))
            count += 1
    return count
