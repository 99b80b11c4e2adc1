"""Prompt encoding for SD1.x- and SDXL-class checkpoints, behind byte-bounded, thread-safe LRU caches.

SD1.x: the CLIP text encoder's last hidden state (B, L, C). SDXL: the penultimate hidden states
of both text encoders concatenated (B, L, C1 + C2), plus text_encoder_2's pooled projection
(B, P) for the UNet's added conditioning, as `StableDiffusionXLPipeline.encode_prompt` does.
Prompts are padded to the tokenizer's `model_max_length` and never truncated: a prompt longer
than `max_tokens` is refused by the engine before it gets here.

Both caches (embeddings, token counts) are bounded by bytes, not entries: request text is client
input, so an entry bound lets a few large prompts pin unbounded memory. A prompt whose token count
is over the limit is never cached, and no entry larger than a fraction of its cache's budget is kept.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

DEFAULT_EMBEDDING_CACHE_BYTES = 64 * 2**20
DEFAULT_TOKEN_COUNT_CACHE_BYTES = 4 * 2**20
# An entry larger than budget / MAX_ENTRY_SHARE is not kept: one huge prompt must not flush
# the hundreds of ordinary ones that make the cache worth having.
MAX_ENTRY_SHARE = 16
# Bookkeeping per entry beyond key and value (OrderedDict node, dataclass, tensor object headers).
ENTRY_OVERHEAD_BYTES = 256

V = TypeVar("V")


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's text-encoder output (on the engine's device, in its dtype)."""

    hidden: torch.Tensor  # (L, C)
    pooled: torch.Tensor | None = None  # (P,) SDXL only


def text_bytes(text: str) -> int:
    """Memory a str key holds (CPython's compact layout: 1, 2 or 4 bytes per character)."""
    return sys.getsizeof(text)


def embedding_bytes(text: str, embedding: PromptEmbedding) -> int:
    """What caching `embedding` under `text` costs: key, tensors (on whichever device) and bookkeeping."""
    tensors = [embedding.hidden] if embedding.pooled is None else [embedding.hidden, embedding.pooled]
    return text_bytes(text) + sum(t.numel() * t.element_size() for t in tensors) + ENTRY_OVERHEAD_BYTES


class ByteBoundedLRU(Generic[V]):
    """Least-recently-used map bounded to `max_bytes` in total, as `size(key, value)` reckons it.

    A value bigger than `max_bytes / MAX_ENTRY_SHARE` is not stored (`put` returns False).
    Not locked: the owner holds its own lock.
    """

    def __init__(self, max_bytes: int, size: Callable[[Hashable, V], int], *, name: str) -> None:
        if max_bytes < 1:
            raise ValueError(f"`{name}` must be >= 1 byte but is {max_bytes}")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_bytes // MAX_ENTRY_SHARE
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.nbytes = 0

    def get(self, key: Hashable) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store `value` (evicting the least recently used); False when it is too large to keep."""
        nbytes = self._size(key, value)
        if nbytes > self.max_entry_bytes:
            self.pop(key)
            return False
        self.pop(key)
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.nbytes -= evicted
        return True

    def pop(self, key: Hashable) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.nbytes -= found[1]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries


class PromptCache:
    """Least-recently-used map text -> PromptEmbedding, bounded to `max_bytes` (keys and tensors).

    The empty prompt (CFG's unconditional input) is pinned: it never counts against the bound
    and is never evicted.
    """

    def __init__(self, max_bytes: int = DEFAULT_EMBEDDING_CACHE_BYTES) -> None:
        self._entries: ByteBoundedLRU[PromptEmbedding] = ByteBoundedLRU(max_bytes, embedding_bytes, name="max_bytes")
        self._pinned: dict[str, PromptEmbedding] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def nbytes(self) -> int:
        """Bytes the unpinned entries take, as `embedding_bytes` reckons them (<= `max_bytes`)."""
        with self._lock:
            return self._entries.nbytes

    def get(self, text: str) -> PromptEmbedding | None:
        with self._lock:
            if text in self._pinned:
                self.hits += 1
                return self._pinned[text]
            entry = self._entries.get(text)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            return entry

    def put(self, text: str, embedding: PromptEmbedding) -> None:
        with self._lock:
            if text == "":
                self._pinned[text] = embedding
                return
            self._entries.put(text, embedding)

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


class TokenCounter:
    """Token counts of texts by one checkpoint's tokenizer(s), behind a byte-bounded LRU.

    Needs the tokenizers only, not the text encoders, so a process that validates requests
    without running the model (the HTTP process in front of engine worker processes) counts
    tokens exactly as the engine does.
    """

    def __init__(
        self, tokenizers: Sequence, cache_bytes: int = DEFAULT_TOKEN_COUNT_CACHE_BYTES, *, lock: threading.Lock | None = None
    ) -> None:
        self.tokenizers = tokenizers if isinstance(tokenizers, list) else list(tokenizers)  # shared with the encoder
        # LRU-bounded like the embedding cache: a served prompt is counted when the request is
        # validated, again when its batch is built and again in `Engine.generate`; tokenizing it
        # each time cost a batch about 5% of its time (py-spy, batch 8, one-step model).
        # Only prompts within `max_tokens` are kept: a refused prompt is never seen again.
        self.counts: ByteBoundedLRU[int] = ByteBoundedLRU(
            cache_bytes, lambda text, n: text_bytes(text) + ENTRY_OVERHEAD_BYTES, name="token_cache_bytes"
        )
        self._lock = lock or threading.Lock()
        # Tokens a prompt may use besides the start and end tokens.
        self.max_tokens = min(int(tok.model_max_length) for tok in self.tokenizers) - 2

    def count(self, text: str) -> int:
        """Tokens of `text` without the start/end tokens (the longest count over the tokenizers)."""
        with self._lock:
            n = self.counts.get(text)
            if n is None:
                n = max(len(tok(text, add_special_tokens=False).input_ids) for tok in self.tokenizers)
                if n <= self.max_tokens:
                    self.counts.put(text, n)
            return n


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
        cache_bytes: int = DEFAULT_EMBEDDING_CACHE_BYTES,
        token_cache_bytes: int = DEFAULT_TOKEN_COUNT_CACHE_BYTES,
    ) -> None:
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.sdxl = sdxl
        self.device = device
        self.cache = PromptCache(cache_bytes)
        # Fast tokenizers reconfigure padding/truncation per call and are not safe across threads.
        self._tokenizer_lock = threading.Lock()
        self.counter = TokenCounter(self.tokenizers, token_cache_bytes, lock=self._tokenizer_lock)
        self.token_counts = self.counter.counts
        self.max_tokens = self.counter.max_tokens  # tokens a prompt may use besides start and end

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without the start/end tokens (the longest count over the tokenizers)."""
        return self.counter.count(text)

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
