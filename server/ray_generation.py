"""The ingress's generation service on Ray: each image is one call to the model's engine deployment.

    route -> RayGenerationService.generate(model, requests)
               one handle call per image (Serve routes each to a replica; @serve.batch there
               gathers them into batches), all awaited under request_timeout_s
             <- ImageOutcome (encoded on the replica, served_by = the replica) or the replica's error

It has the methods and answers of `GenerationService` (server/generation.py), so the same routes
serve both. What Serve adds, and how it reaches the client:

- a caller's queue for the engine past `max_queued_requests` (Settings.queue_limit): Serve
  raises BackPressureError -> 429 with Retry-After (QueueFullError), as the one-process queue;
- no replica able to take work (the deployment failed): DeploymentUnavailableError -> 503;
- the replica dies while it holds the call (node lost, process killed): the call is sent again,
  to another replica, up to `MAX_ATTEMPTS` times within the request's deadline (a request is
  idempotent: its seed fixes its image); still failing -> 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from fastapi import Request
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from flashstep.models.contract import EngineProtocol
from flashstep.models.errors import InvalidRequestError
from flashstep.models.outputs import GenerationRequest
from flashstep.server.batcher import ImageOutcome
from flashstep.server.errors import (
    EngineFailure,
    NotReadyError,
    QueueFullError,
    RequestTimeoutError,
)
from flashstep.server.generation import (
    API_FIELD_NAMES,
    DISCONNECT_POLL_S,
    NO_MODEL_RETRY_AFTER_S,
    ClientGoneError,
    refuse_when_not_serving,
)
from flashstep.server.image_encoding import ImageEncoding
from flashstep.server.lifecycle import Lifecycle
from flashstep.server.metrics import Metrics
from flashstep.server.ray_models import RayModelManager
from flashstep.server.ray_protocol import RemoteError

logger = logging.getLogger("flashstep.server")

MAX_ATTEMPTS = 3  # per image: the first call and two resends after a replica died holding it
REPLICA_LOST = (RayActorError, ReplicaUnavailableError)
DEFAULT_RETRY_AFTER_S = 1


def retry_after(seconds: float | None) -> str:
    """A Retry-After value: whole seconds, at least one."""
    return str(max(DEFAULT_RETRY_AFTER_S, math.ceil(seconds or 0)))


def queue_full(exc: BackPressureError) -> QueueFullError:
    """Serve's per-caller queue limit, as the one-process server's full queue (429 + Retry-After)."""
    retry = retry_after(exc.retry_after_s)
    return QueueFullError(
        f"the model's queue is full (max_queued_requests reached); retry after {retry} s",
        headers={"Retry-After": retry},
    )


class RayQueue:
    """The ingress's `batcher` for /readyz and /metrics: images this replica awaits from engines."""

    def __init__(self, manager: RayModelManager, metrics: Metrics):
        self._manager = manager
        self._metrics = metrics
        self._waiting = 0  # touched on the event loop only

    @property
    def depth(self) -> int:
        return self._waiting

    def dead_workers(self) -> list[str]:
        """Models whose engine application Serve reports unhealthy (/readyz answers 503 meanwhile)."""
        return self._manager.unhealthy()

    def add(self, n: int) -> None:
        self._waiting += n
        self._metrics.queue_depth.set(self._waiting)


class RayGenerationService:
    """`GenerationService` over Serve handles: same methods, same errors, images from engine replicas."""

    def __init__(
        self,
        manager: RayModelManager,
        queue: RayQueue,
        lifecycle: Lifecycle,
        metrics: Metrics,
        *,
        request_timeout_s: float,
        queue_limit: int,
    ):
        self.manager = manager
        self.queue = queue
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.request_timeout_s = request_timeout_s
        self.queue_limit = queue_limit

    async def generate(
        self,
        model: str | None,
        requests: list[GenerationRequest],
        http_request: Request,
        *,
        encoding: ImageEncoding | None = None,
        check: Callable[[EngineProtocol], None] | None = None,
        field_names: dict[str, str] | None = None,
    ) -> list[ImageOutcome]:
        """Images for `requests` from `model` (the default when None), in request order.

        `check(engine)` and `engine.validate` run on the replica, beside the engine; a
        validation error names the route's field (`field_names`, e.g. height -> size).
        """
        refuse_when_not_serving(self.lifecycle, bool(self.manager.names()))
        if len(requests) > self.queue_limit:  # could never be queued at once: retrying would not help
            raise InvalidRequestError(
                "n",
                f"`n` must be at most the server's queue_limit ({self.queue_limit}) but is {len(requests)}",
            )
        names = {**API_FIELD_NAMES, **(field_names or {})}
        handle = self.manager.get(model)
        engine = self.manager.engine(handle.name)
        encoding = encoding or ImageEncoding()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        calls = [
            asyncio.ensure_future(self._call(engine, "generate", deadline, request, encoding, check))
            for request in requests
        ]
        outcomes = await self._wait(calls, deadline, http_request, names)
        self._record(outcomes)
        return outcomes

    async def count_tokens(self, model: str | None, texts: list[str]) -> int:
        """Tokens of `texts` by `model`'s tokenizer (for OpenAI's `usage`), counted on a replica."""
        handle = self.manager.get(model)
        deadline = asyncio.get_running_loop().time() + self.request_timeout_s
        return await self._call(self.manager.engine(handle.name), "count_tokens", deadline, texts)

    async def _wait(
        self, calls: list[asyncio.Future], deadline: float, http_request: Request, names
    ) -> list[ImageOutcome]:
        """Every call's outcome, or the first error (in request order); stops early on error, timeout or a gone client."""
        loop = asyncio.get_running_loop()
        try:
            pending = set(calls)
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RequestTimeoutError(
                        f"no image after request_timeout_s={self.request_timeout_s:g} s"
                    )
                done, pending = await asyncio.wait(
                    pending, timeout=min(remaining, DISCONNECT_POLL_S), return_when=asyncio.FIRST_EXCEPTION
                )
                if any(not f.cancelled() and f.exception() is not None for f in done):
                    break  # the request fails: the other images are not worth waiting for
                if pending and await http_request.is_disconnected():
                    logger.info("client gone: cancelling %d image calls", len(pending))
                    raise ClientGoneError("client closed the request")
        finally:
            for call in calls:
                if not call.done():
                    call.cancel()  # cancels the call on its replica too (it leaves the batch)
        errors = [call.exception() for call in calls if call.done() and not call.cancelled()]
        first_error = next((e for e in errors if e is not None), None)
        if first_error is not None:
            raise _renamed(first_error, names)
        return [call.result() for call in calls]

    async def _call(self, engine: DeploymentHandle, method: str, deadline: float, *args):
        """One handle call, resent to another replica if the one holding it dies; errors as HTTP errors."""
        loop = asyncio.get_running_loop()
        self.queue.add(1)
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                response = getattr(engine, method).remote(*args)
                try:
                    reply = await response
                except asyncio.CancelledError:
                    response.cancel()
                    raise
                except BackPressureError as exc:
                    raise queue_full(exc) from None
                except DeploymentUnavailableError:
                    raise NotReadyError(
                        "the model's replicas are unavailable (its deployment failed); retry later",
                        headers={"Retry-After": str(NO_MODEL_RETRY_AFTER_S)},
                    ) from None
                except REPLICA_LOST as exc:
                    if attempt == MAX_ATTEMPTS or loop.time() >= deadline:
                        raise NotReadyError(
                            "the model replica serving this request stopped and no other answered; retry",
                            headers={"Retry-After": retry_after(None)},
                        ) from None
                    logger.warning(
                        "engine replica lost mid-request, sending again: method=%s attempt=%d error=%s",
                        method, attempt, type(exc).__name__,
                    )  # fmt: skip
                    continue
                except RayTaskError as exc:  # a bug on the replica: logged with its traceback, never sent
                    logger.error("engine replica raised: method=%s", method, exc_info=exc)
                    raise EngineFailure("the model replica failed while serving this request") from None
                if isinstance(reply, RemoteError):
                    raise reply.rebuild()
                return reply
        finally:
            self.queue.add(-1)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _record(self, outcomes: list[ImageOutcome]) -> None:
        m = self.metrics
        m.images.labels(outcomes[0].model).inc(len(outcomes))
        for o in outcomes:
            m.stage_seconds.labels("queue").observe(o.queue_wait_s)
            for stage in ("encode", "denoise", "decode", "total"):
                m.stage_seconds.labels(stage).observe(getattr(o.timings, stage))


def _renamed(exc: BaseException, names: dict[str, str]) -> BaseException:
    """A validation error about an engine field, renamed to the route's field (as GenerationService does)."""
    if isinstance(exc, InvalidRequestError):
        field = names.get(exc.field, exc.field)
        if field != exc.field:
            return InvalidRequestError(field, str(exc))
    return exc
