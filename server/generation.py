"""The generation service both generation routes share: validate, queue, wait, encode.

    route -> build_requests (HTTP names -> engine names)
          -> GenerationService.generate(model, requests)
               in a worker thread: lease the model, check size, engine.validate, Batcher.submit
               on the event loop: await the futures (timeout, client gone)
          -> encode_images (a thread; a no-op for images a worker process encoded) -> response

Validation and submission happen under one lease, so a hot swap cannot slip between them.
The pydantic schemas check a body's shape with the bounds of models/validation.py; the engine's
`validate` (that module's `validate_request`) is the one check of a request's values.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import replace

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from flashstep.models.contract import EngineProtocol
from flashstep.models.errors import InvalidRequestError
from flashstep.models.outputs import GenerationRequest
from flashstep.models.validation import MAX_SEED
from flashstep.server.batcher import Batcher, ImageOutcome
from flashstep.server.errors import NotReadyError, RequestTimeoutError, ServerError, ShuttingDownError
from flashstep.server.image_encoding import EncodedImage, ImageEncoding, encode_image
from flashstep.server.lifecycle import Lifecycle, Phase
from flashstep.server.model_manager import ModelManager
from flashstep.server.schemas import GenerationOptions

logger = logging.getLogger("flashstep.server")

DISCONNECT_POLL_S = 0.25
NO_MODEL_RETRY_AFTER_S = 5  # while no model serves: loading, or all unloaded until an admin loads one
# The one field whose HTTP name differs from the engine's: GenerationRequest field -> route field.
# `build_requests` maps HTTP -> engine; `GenerationService` maps engine errors back with this.
API_FIELD_NAMES = {"num_inference_steps": "steps"}


class ClientGoneError(ServerError):
    """The client disconnected before its images were ready (nginx's 499; nobody reads it)."""

    status_code = 499
    error_type = "client_closed_request"


def first_seed(seed: int | None, n: int) -> int:
    """The client's seed, or a random one that leaves room for seeds seed .. seed + n - 1."""
    if seed is not None:
        return seed
    return secrets.randbelow(MAX_SEED - n + 2)


def build_requests(prompt: str, options: GenerationOptions, n: int, **size: int | None) -> list[GenerationRequest]:
    """One `GenerationRequest` per image; image i gets seed + i, so each is reproducible alone.

    The one place HTTP fields become engine fields: `steps` (alias `num_inference_steps`) becomes
    `GenerationRequest.num_inference_steps`; every other field keeps its name. Errors about
    engine fields are renamed back by `API_FIELD_NAMES`.
    """
    seed = first_seed(options.seed, n)
    if seed + n - 1 > MAX_SEED:
        raise InvalidRequestError("seed", f"`seed` + n - 1 must be at most {MAX_SEED} but is {seed + n - 1}")
    base = GenerationRequest(
        prompt=prompt,
        seed=seed,
        negative_prompt=options.negative_prompt,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance_scale,
        nasa_alpha=options.nasa_alpha,
        hybrid=options.hybrid,
        height=size.get("height"),
        width=size.get("width"),
    )
    return [replace(base, seed=seed + i) for i in range(n)]


async def encode_images(outcomes: list[ImageOutcome], encoding: ImageEncoding) -> list[bytes]:
    """Each outcome's bytes. Images a worker process or replica made arrive encoded as the request
    asked (its encoding travelled with it); PIL images from an in-process engine are encoded here."""
    if all(isinstance(o.image, EncodedImage) for o in outcomes):
        return [o.image.data for o in outcomes]
    return await run_in_threadpool(lambda: [encode_image(o.image, encoding) for o in outcomes])


def refuse_when_not_serving(lifecycle: Lifecycle, has_models: bool) -> None:
    """503 (with Retry-After when waiting helps) while shutting down, or while no model serves."""
    phase = lifecycle.phase
    if phase is Phase.SHUTTING_DOWN:
        raise ShuttingDownError("the server is shutting down and takes no new requests")
    if has_models:
        return
    retry = {"Retry-After": str(NO_MODEL_RETRY_AFTER_S)}
    if phase in (Phase.STARTING, Phase.LOADING):
        raise NotReadyError("models are still loading; retry shortly", headers=retry)
    if phase is Phase.FAILED:
        raise NotReadyError("no model is serving: start-up loading failed (see GET /readyz)", headers=retry)
    # Ready, but every model was unloaded: a condition of the server, not a wrong model name.
    raise NotReadyError("no model is loaded; an operator can load one with POST /admin/models", headers=retry)


class GenerationService:
    """Turns validated API requests into images through the model manager and the batcher."""

    def __init__(self, manager: ModelManager, batcher: Batcher, lifecycle: Lifecycle, request_timeout_s: float):
        self.manager = manager
        self.batcher = batcher
        self.lifecycle = lifecycle
        self.request_timeout_s = request_timeout_s

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

        `encoding` is how the client wants the images, so an engine in another process can encode
        them there; `check(engine)` runs first, for route-level checks against the model (e.g.
        `size`); `field_names` renames engine fields in validation errors to the route's names.
        """
        refuse_when_not_serving(self.lifecycle, bool(self.manager.names()))
        names = {**API_FIELD_NAMES, **(field_names or {})}
        futures = await run_in_threadpool(self._submit, model, requests, encoding or ImageEncoding(), check, names)
        return await self._wait(futures, http_request)

    async def count_tokens(self, model: str | None, texts: list[str]) -> int:
        """Tokens of `texts` by `model`'s tokenizer (for OpenAI's `usage`), counted in a worker thread."""

        def count() -> int:
            with self.manager.lease(model) as handle:
                return sum(handle.engine.count_tokens(text) for text in texts)

        return await run_in_threadpool(count)

    def _submit(self, model, requests, encoding, check, names):
        with self.manager.lease(model) as handle:
            engine = handle.engine
            try:
                if check is not None:
                    check(engine)
                validated = [engine.validate(r) for r in requests]
            except InvalidRequestError as exc:
                field = names.get(exc.field, exc.field)
                if field == exc.field:
                    raise
                raise InvalidRequestError(field, str(exc)) from exc
            return self.batcher.submit(handle, requests, validated, self.request_timeout_s, encoding)

    async def _wait(self, futures, http_request: Request) -> list[ImageOutcome]:
        waiting = [asyncio.wrap_future(f) for f in futures]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s
        try:
            pending = set(waiting)
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RequestTimeoutError(f"no image after request_timeout_s={self.request_timeout_s:g} s")
                _, pending = await asyncio.wait(pending, timeout=min(remaining, DISCONNECT_POLL_S))
                if pending and await http_request.is_disconnected():
                    logger.info("client gone: dropping %d queued images", len(pending))
                    raise ClientGoneError("client closed the request")
        finally:
            for f in waiting:
                if not f.done():
                    f.cancel()  # the batcher skips cancelled items
        errors = [f.exception() for f in waiting]  # retrieve every one: no "never retrieved" warnings
        first_error = next((e for e in errors if e is not None), None)
        if first_error is not None:
            raise first_error
        return [f.result() for f in waiting]


def timing_headers(outcomes: list[ImageOutcome]) -> dict[str, str]:
    """How each image was made, as response headers; one comma-separated value per image.

    Also a `Server-Timing` header (per first image) so browser dev tools show the stages.
    """

    def join(values) -> str:
        return ", ".join(str(v) for v in values)

    def secs(values) -> str:
        return join(f"{v:.6f}" for v in values)

    first = outcomes[0]
    server_timing = ", ".join(
        f"{stage};dur={seconds * 1000:.3f}"
        for stage, seconds in (
            ("queue", first.queue_wait_s),
            ("encode", first.timings.encode),
            ("denoise", first.timings.denoise),
            ("decode", first.timings.decode),
        )
    )
    headers = {
        "X-Flashstep-Model": first.model,
        "X-Flashstep-Model-Version": join(o.model_version for o in outcomes),
        "X-Flashstep-Seed": join(o.seed for o in outcomes),
        "X-Flashstep-Batch-Size": join(o.batch_size for o in outcomes),
        "X-Flashstep-Unet-Evals": join(o.unet_evals for o in outcomes),
        "X-Flashstep-Queue-Wait": secs(o.queue_wait_s for o in outcomes),
        "X-Flashstep-Encode-Time": secs(o.timings.encode for o in outcomes),
        "X-Flashstep-Denoise-Time": secs(o.timings.denoise for o in outcomes),
        "X-Flashstep-Decode-Time": secs(o.timings.decode for o in outcomes),
        "Server-Timing": server_timing,
    }
    if any(o.served_by for o in outcomes):  # which worker process or replica made each image
        headers["X-Flashstep-Worker"] = join(o.served_by or "-" for o in outcomes)
    return headers
