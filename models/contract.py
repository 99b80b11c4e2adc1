"""`EngineProtocol`: everything the server may ask of an engine, and nothing more.

The server (model manager, batcher, generation service, routes) holds engines only through this
type, so it never depends on how an engine samples; `models.engine.Engine` implements it, and so
do the server tests' fake engines (tests/server/test_engine_contract.py checks both).

Lifecycle, as the server drives it:

    engine = load_engine(...)              # models.engine: weights read, modules on the device
    engine.warmup()                        # before the model reports ready
    request = engine.validate(raw)         # defaults filled in; InvalidRequestError names the field
    key = engine.batch_key(request)        # equal keys may share one generate() call
    result = engine.generate([request, ...])
    engine.close()                         # after the last batch that leased it
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest, GenerationResult


@runtime_checkable
class EngineProtocol(Protocol):
    """A loaded checkpoint that turns batches of `GenerationRequest`s into images.

    name: the name it serves under; path: its checkpoint folder; version: name plus a weights
    fingerprint (changes when the weights do); family: its sampler family; config: its
    flashstep.json (allowed steps, sizes, default guidance); device/dtype: where and how it runs
    (reported by the admin routes, `str()` of a torch.device/dtype or a plain string).
    """

    name: str
    path: Path
    version: str
    family: str
    config: FlashstepConfig
    device: Any
    dtype: Any

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with the model's defaults filled in; InvalidRequestError naming the field otherwise."""
        ...

    def batch_key(self, request: GenerationRequest) -> Hashable:
        """Requests with equal keys can share one `generate` call (one forward pass)."""
        ...

    def generate(self, requests: list[GenerationRequest]) -> GenerationResult:
        """Images for `requests` (one batch key), in order; thread-safe across calls."""
        ...

    def warmup(self) -> None:
        """One small generation so the first real request does not pay for compilation and allocation."""
        ...

    def memory_bytes(self) -> int:
        """Bytes of weights and buffers the engine holds."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` by the model's tokenizer, without special tokens (OpenAI's `usage`)."""
        ...

    def close(self) -> None:
        """Release the weights; the engine cannot generate afterwards."""
        ...
