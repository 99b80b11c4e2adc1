"""The prompt caches are bounded by bytes and never keep what validation refuses.

A word-per-token tokenizer and a constant text encoder stand in for CLIP: the caches, not the
encoders, are under test. One spec runs a real tiny checkpoint's engine end to end.
"""

from __future__ import annotations

import pytest
import torch

from flashstep.models.errors import InvalidRequestError
from flashstep.models.outputs import GenerationRequest
from flashstep.models.prompts import (
    MAX_ENTRY_SHARE,
    PromptCache,
    PromptEmbedding,
    PromptEncoder,
    embedding_bytes,
)

MAX_LENGTH = 16  # model_max_length: 14 tokens besides start and end
WIDTH = 8  # hidden size C


class WordTokenizer:
    """One token per whitespace-separated word; ids are word lengths."""

    model_max_length = MAX_LENGTH

    class _Out:
        def __init__(self, input_ids):
            self.input_ids = input_ids

    def __call__(self, text, add_special_tokens=True, padding=None, max_length=None, truncation=False, return_tensors=None):
        if isinstance(text, str):
            return self._Out([len(w) for w in text.split()])
        rows = [([len(w) for w in t.split()] + [0] * MAX_LENGTH)[:MAX_LENGTH] for t in text]
        return self._Out(torch.tensor(rows))


class ConstantEncoder(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (ids[..., None].float().expand(*ids.shape, WIDTH).clone(),)  # (B, L, C)


def make_encoder(**budgets: int) -> PromptEncoder:
    return PromptEncoder([WordTokenizer()], [ConstantEncoder()], sdxl=False, device=torch.device("cpu"), **budgets)


def test_a_prompt_over_the_token_limit_leaves_no_count_behind():
    encoder = make_encoder()
    refused = "word " * 200_000  # 1 MB of text, far past 14 tokens
    assert encoder.count_tokens(refused) > encoder.max_tokens
    assert refused not in encoder.token_counts and encoder.token_counts.nbytes == 0
    assert encoder.count_tokens("a red circle") == 3
    assert "a red circle" in encoder.token_counts


def test_many_refused_prompts_grow_no_cache():
    encoder = make_encoder()
    for i in range(150):
        encoder.count_tokens(f"negative {i} " * 1000)
    assert len(encoder.token_counts) == 0 and len(encoder.cache) == 0


def test_token_counts_stay_within_their_byte_budget():
    budget = 64 * 1024
    encoder = make_encoder(token_cache_bytes=budget)
    for i in range(2000):
        encoder.count_tokens(f"prompt {i} " + "x" * 500)  # 2 tokens, ~500 bytes of key each
        assert encoder.token_counts.nbytes <= budget
    assert 0 < len(encoder.token_counts) < 2000


def test_an_entry_larger_than_its_share_of_the_budget_is_not_kept():
    budget = 64 * 1024
    encoder = make_encoder(token_cache_bytes=budget)
    huge = "y" * (budget // MAX_ENTRY_SHARE + 1)  # one token, but a key too big to keep
    assert encoder.count_tokens(huge) == 1
    assert huge not in encoder.token_counts


def test_embeddings_stay_within_their_byte_budget():
    one = embedding_bytes("prompt 0000", PromptEmbedding(torch.zeros(MAX_LENGTH, WIDTH)))
    budget = 20 * one
    encoder = make_encoder(cache_bytes=budget)
    for start in range(0, 400, 8):
        encoder.encode([f"prompt {i:04d}" for i in range(start, start + 8)])
        assert encoder.cache.nbytes <= budget
    assert len(encoder.cache) == budget // one
    assert "prompt 0399" in encoder.cache and "prompt 0000" not in encoder.cache  # least recently used went


def test_the_empty_prompt_stays_pinned_outside_the_budget():
    cache = PromptCache(max_bytes=embedding_bytes("", PromptEmbedding(torch.zeros(4, 4))) * MAX_ENTRY_SHARE)
    cache.put("", PromptEmbedding(torch.zeros(4, 4)))
    for i in range(100):
        cache.put(f"p{i}", PromptEmbedding(torch.zeros(4, 4)))
    assert "" in cache and cache.nbytes <= cache.max_bytes


def test_an_engine_refusing_a_long_negative_prompt_caches_nothing(teacher_dir):
    from flashstep.models.engine import Engine

    engine = Engine.load(teacher_dir, device="cpu")
    prompts = engine.prompts
    long_negative = "blurry " * 4000  # under MAX_PROMPT_CHARS, over the tokenizer's limit
    with pytest.raises(InvalidRequestError, match="negative_prompt"):
        engine.validate(GenerationRequest(prompt="a red circle", negative_prompt=long_negative, seed=0))
    assert long_negative not in prompts.token_counts and long_negative not in prompts.cache
    engine.validate(GenerationRequest(prompt="a red circle", negative_prompt="blurry", seed=0))
    assert "blurry" in prompts.token_counts
