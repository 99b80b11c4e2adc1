"""Faults stay with the request that caused them: one engine call per batch, split on failure.

Both batchers -- the one-process batcher (server/batcher.py) and a Ray Serve engine replica
(server/ray_engine.py) -- run a batch through `run_isolated`:

- a call that raises is run again on each half of its batch, down to single requests, so only a
  request that fails alone fails (about 2 log2(n) extra calls for one bad request in n; halves
  that succeed never run twice);
- a call that reports NaN or Inf images (`NonFiniteOutputError` with the batch's result) fails
  those requests and serves the rest from the same call;

and `request_failure` says which HTTP error a request that failed alone gets.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from flashstep.models.errors import FlashstepError, NonFiniteOutputError
from flashstep.models.outputs import GenerationResult
from flashstep.server.errors import EngineFailure, NonFiniteOutputFailure, OutOfMemoryFailure, ServerError

logger = logging.getLogger("flashstep.server")

T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's CUDA OOM, or any error whose message says the device ran out of memory."""
    torch = sys.modules.get("torch")  # no import: an OOM can only come from a torch already loaded
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return "out of memory" in str(exc).lower()


def empty_device_cache() -> None:
    """Hand cached, unused device memory back after an OOM, so a smaller retry can fit."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_isolated(
    group: list[T],
    call: Callable[[list[T]], GenerationResult],
    deliver: Callable[[list[T], GenerationResult, Sequence[int], float], None],
    fail: Callable[[T, Exception], None],
    *,
    on_error: Callable[[Exception, int], None] | None = None,
) -> None:
    """Run `call(group)`; `deliver(group, result, served positions, started)` what it made and
    `fail(item, exc)` each request that fails by itself.

    `on_error(exc, batch size)` sees every failed call (metrics, logs, freeing device memory).
    """
    started = time.monotonic()
    try:
        result = call(group)
        if len(result.images) != len(group):
            raise RuntimeError(f"engine returned {len(result.images)} images for {len(group)} requests")
    except NonFiniteOutputError as exc:
        if on_error is not None:
            on_error(exc, len(group))
        bad = set(exc.indices)
        usable = isinstance(exc.result, GenerationResult) and len(exc.result.images) == len(group)
        if usable and bad and bad <= set(range(len(group))):
            for i in sorted(bad):
                fail(group[i], exc)
            deliver(group, exc.result, [i for i in range(len(group)) if i not in bad], started)
            return
        _split(group, exc, call, deliver, fail, on_error)
        return
    except Exception as exc:
        if on_error is not None:
            on_error(exc, len(group))
        if is_out_of_memory(exc):
            empty_device_cache()
        _split(group, exc, call, deliver, fail, on_error)
        return
    deliver(group, result, range(len(group)), started)


def _split(group, exc, call, deliver, fail, on_error) -> None:
    if len(group) == 1:
        fail(group[0], exc)
        return
    logger.warning("batch failed, retrying its halves: size=%d error=%s", len(group), type(exc).__name__)
    middle = len(group) // 2
    run_isolated(group[:middle], call, deliver, fail, on_error=on_error)
    run_isolated(group[middle:], call, deliver, fail, on_error=on_error)


def request_failure(exc: Exception, *, seed: int, retry_after_s: float) -> Exception:
    """The error a request that failed alone gets; anything unexpected stays in the log, not the body.

    `retry_after_s`: when a retry may fit, for the Retry-After of an out-of-memory answer.
    """
    if isinstance(exc, NonFiniteOutputError):
        return NonFiniteOutputFailure(
            f"the model produced an image with NaN or Inf values for this request (seed {seed}); it was not returned"
        )
    if isinstance(exc, (FlashstepError, ServerError)):  # a request error found late (4xx), a lost worker (503)
        return exc
    if is_out_of_memory(exc):
        retry = str(max(1, math.ceil(retry_after_s)))
        return OutOfMemoryFailure(
            f"the device ran out of memory for this request; retry after {retry} s", headers={"Retry-After": retry}
        )
    logger.error("request failed alone: seed=%d", seed, exc_info=exc)
    return EngineFailure("the model failed while generating this request; other requests are unaffected")
