"""Prompt encoding for SD1.x- and SDXL-class checkpoints, behind a bounded, thread-safe LRU cache.

SD1.x: the CLIP text encoder's last hidden state (B, L, C). SDXL: the penultimate hidden states
of both text encoders concatenated (B, L, C1 + C2), plus text_encoder_2's pooled projection
(B, P) for the UNet's added conditioning, as `StableDiffusionXLPipeline.encode_prompt` does.
Prompts are padded to the tokenizer's `model_max_length` and never truncated: a prompt longer
than `max_tokens` is refused by the engine before it gets here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's text-encoder output (on the engine's device, in its dtype)."""

    hidden: torch.Tensor  # (L, C)
    pooled: torch.Tensor | None = None  # (P,) SDXL only


class PromptCache:
    """Least-recently-used map text -> PromptEmbedding, bounded to `capacity` entries.

    The empty prompt (CFG's unconditional input) is pinned: it never counts against the bound
    and is never evicted.
    """

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"`capacity` must be >= 1 but is {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, PromptEmbedding] = OrderedDict()
        self._pinned: dict[str, PromptEmbedding] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, text: str) -> PromptEmbedding | None:
        with self._lock:
            if text in self._pinned:
                self.hits += 1
                return self._pinned[text]
            entry = self._entries.get(text)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(text)
            self.hits += 1
            return entry

    def put(self, text: str, embedding: PromptEmbedding) -> None:
        with self._lock:
            if text == "":
                self._pinned[text] = embedding
                return
            self._entries[text] = embedding
            self._entries.move_to_end(text)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries) + len(self._pinned)

    def __contains__(self, text: str) -> bool:
        with self._lock:
            return text in self._pinned or text in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._pinned.clear()


class PromptEncoder:
    """Tokenizer(s) and text encoder(s) of one checkpoint; `encode` serves from the cache first.

    sdxl: two encoders, penultimate hidden states, pooled output of the second.
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence[torch.nn.Module],
        *,
        sdxl: bool,
        device: torch.device,
        cache_size: int = 1024,
    ) -> None:
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.sdxl = sdxl
        self.device = device
        self.cache = PromptCache(cache_size)
        # Token counts, LRU-bounded like the cache: a served prompt is counted when the request is
        # validated, again when its batch is built and again in `Engine.generate`; tokenizing it
        # each time cost a batch about 5% of its time (py-spy, batch 8, one-step model).
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._counts_capacity = cache_size
        # Fast tokenizers reconfigure padding/truncation per call and are not safe across threads.
        self._tokenizer_lock = threading.Lock()
        # Tokens a prompt may use besides the start and end tokens.
        self.max_tokens = min(int(tok.model_max_length) for tok in self.tokenizers) - 2

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without the start/end tokens (the longest count over the tokenizers)."""
        with self._tokenizer_lock:
            n = self._counts.get(text)
            if n is None:
                n = max(len(tok(text, add_special_tokens=False).input_ids) for tok in self.tokenizers)
                self._counts[text] = n
                if len(self._counts) > self._counts_capacity:
                    self._counts.popitem(last=False)
            else:
                self._counts.move_to_end(text)
            return n

    def encode(self, texts: Sequence[str]) -> list[PromptEmbedding]:
        """One embedding per text; texts not yet cached are encoded together and cached."""
        found = {text: self.cache.get(text) for text in dict.fromkeys(texts)}
        missing = [text for text, emb in found.items() if emb is None]
        if missing:
            for text, emb in zip(missing, self._encode(missing), strict=True):
                self.cache.put(text, emb)
                found[text] = emb
        return [found[text] for text in texts]

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> list[PromptEmbedding]:
        hidden_parts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            with self._tokenizer_lock:
                ids = tokenizer(
                    texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)  # fmt: skip
            if self.sdxl:
                out = encoder(ids, output_hidden_states=True)
                hidden_parts.append(out.hidden_states[-2])  # (B, L, Ci)
                pooled = out[0]  # (B, P): text_embeds of the projection model (the last encoder's wins)
            else:
                hidden_parts.append(encoder(ids)[0])  # (B, L, C) last_hidden_state
        hidden = torch.cat(hidden_parts, dim=-1)
        return [
            PromptEmbedding(hidden[i].clone(), None if pooled is None else pooled[i].clone())
            for i in range(len(texts))
        ]
