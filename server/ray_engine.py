"""The engine deployment: replicas of one model's checkpoint, each batching with `@serve.batch`.

    ingress --handle.generate(request, encoding, check)--> FlashstepEngine replica
        validate with the engine (InvalidRequestError comes back as a RemoteError naming the field)
        @serve.batch collects calls (max_batch_size, max_wait_ms), then in a thread:
            group by engine.batch_key -> one engine.generate per group -> encode each image here
        -> ImageOutcome(served_by=<app>#<deployment>#<replica id>) or RemoteError

`@serve.batch` gathers calls whatever their options; only calls whose validated requests have
equal `engine.batch_key` share one `engine.generate` (steps, size, guidance mode...), as in the
one-process batcher. A failing group is split in halves down to the request that fails alone;
NaN images fail only their own request.

Each replica holds its model in a `ModelManager`, the same as the one-process server, so a hot
swap keeps its guarantees: `reconfigure` (Serve's in-place `user_config` update) loads and
warms the new folder in a thread while the replica keeps serving, switches, and closes the old
engine once its last batch ends. A swap that fails to load keeps the old engine and reports why
in `describe()`, so the admin deployment can roll the config back; only the first load (replica
start) raises, which fails the replica rather than serving nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ray import serve

from flashstep.models.contract import EngineProtocol
from flashstep.models.errors import CheckpointError, FlashstepError
from flashstep.models.outputs import GenerationRequest, GenerationResult
from flashstep.server import allocator
from flashstep.server.batcher import ImageOutcome
from flashstep.server.errors import (
    NotReadyError,
    ServerError,
)
from flashstep.server.fault_isolation import request_failure, run_isolated
from flashstep.server.image_encoding import ImageEncoding, encoded
from flashstep.server.metrics import Metrics
from flashstep.server.model_manager import LoadedModel, ModelManager, registry_loader
from flashstep.server.ray_config import ENGINE_DEPLOYMENT, send_logs_to_serve
from flashstep.server.ray_protocol import EngineUserConfig, ModelDescription, RemoteError
from flashstep.server.settings import Settings

logger = logging.getLogger("flashstep.server")

Reply = ImageOutcome | RemoteError
# Placeholders until the constructor applies the settings (set_max_batch_size, set_batch_wait_timeout_s).
DEFAULT_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.01


@dataclass(eq=False)
class _Item:
    """One image in a replica's batch: the request as sent, as validated, and its reply once made."""

    raw: GenerationRequest
    request: GenerationRequest
    serial: int  # the engine that validated it; a swap in between triggers a re-validation
    key: Hashable
    encoding: ImageEncoding
    enqueued_at: float = field(default_factory=time.monotonic)
    reply: Reply | None = None


def swap_failure(exc: BaseException, path: str, served_by: str) -> RemoteError:
    """What an admin is told when `path` failed to load on a replica (the traceback stays in its log)."""
    if isinstance(exc, FlashstepError | ServerError):
        return RemoteError.of(exc)
    return RemoteError(
        CheckpointError,
        f"`path` {path!r} failed to load on replica {served_by}: {type(exc).__name__} (see its log)",
        "path",
    )


@serve.deployment(name=ENGINE_DEPLOYMENT)
class FlashstepEngine:
    """One replica serving one model; `user_config` ({"path", "revision"}) says from which folder."""

    def __init__(self, model: str, settings: Settings):
        send_logs_to_serve(settings.log_level)
        context = serve.get_replica_context()
        self.model = model
        # The replica actor's name without Serve's prefix: findable with ray.util.list_named_actors.
        self.served_by = f"{context.app_name}#{context.deployment}#{context.replica_tag}"
        allocator.configure(settings.malloc_mmap_threshold_bytes)  # before any weights are allocated
        if settings.worker_threads:
            import torch  # only to size its thread pool; the engine imports it anyway

            torch.set_num_threads(settings.worker_threads)
        self.manager = ModelManager(
            models_root=settings.models_root,
            metrics=Metrics(settings.max_batch_size),  # load and swap counters; the ingress serves /metrics
            loader=registry_loader,
            device=settings.device,
            dtype=settings.dtype,
            attention_backend=settings.attention_backend,
            warmup=settings.warmup,
        )
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        # @serve.batch waits its whole timeout after a batch's first call, even into an idle
        # replica. As the native batcher does, a call into an idle replica runs at once (0 s), and
        # only while a batch runs do the next ones wait `max_wait_ms` for batch-mates.
        self._max_wait_s = settings.max_wait_ms / 1000.0
        self._running_batches = 0
        self._run_batch.set_batch_wait_timeout_s(0.0)
        self.config: EngineUserConfig | None = None
        self.swap_error: RemoteError | None = None
        self._reconfiguring = asyncio.Lock()
        self._batch_seconds = 0.0  # moving average, for Retry-After after an out-of-memory
        self._engine_calls = self._failed_engine_calls = 0  # one batch at a time: no lock needed

    # ----- configuration (Serve calls this at start and on every user_config change) -----

    async def reconfigure(self, user_config: dict) -> None:
        """Serve the model from `user_config["path"]`: load at start, else hot-swap in place."""
        config = EngineUserConfig.parse(user_config)
        async with self._reconfiguring:
            if self.config is None:
                # At start: a failure fails the replica (Serve retries it a few times, then reports it).
                await asyncio.to_thread(self.manager.load, config.path, name=self.model)
                self.config = config
                logger.info(
                    "engine replica ready: model=%s path=%s replica=%s",
                    self.model,
                    config.path,
                    self.served_by,
                )
                return
            if config == self.config:
                return
            started = time.monotonic()
            try:
                # In a thread: the replica keeps answering the batches it holds while the new engine warms.
                old, new = await asyncio.to_thread(self.manager.swap, self.model, config.path)
            except Exception as exc:
                self.swap_error = swap_failure(exc, config.path, self.served_by)
                logger.error(
                    "swap failed, still serving the previous engine: model=%s path=%s revision=%d replica=%s",
                    self.model, config.path, config.revision, self.served_by, exc_info=exc,
                )  # fmt: skip
                return
            self.config, self.swap_error = config, None
            logger.info(
                "engine swapped: model=%s old_version=%s new_version=%s seconds=%.2f replica=%s",
                self.model, old.version, new.version, time.monotonic() - started, self.served_by,
            )  # fmt: skip

    # ----- requests -----

    async def generate(
        self,
        request: GenerationRequest,
        encoding: ImageEncoding,
        check: Callable[[EngineProtocol], None] | None = None,
    ) -> Reply:
        """One image for `request`, encoded as `encoding`; `check(engine)` runs first (route checks)."""
        try:
            item = self._admit(request, encoding, check)
        except (FlashstepError, ServerError) as exc:
            return RemoteError.of(exc)
        return await self._run_batch(item)

    async def count_tokens(self, texts: list[str]) -> int | RemoteError:
        """Tokens of `texts` by the model's tokenizer (OpenAI's `usage`)."""

        def count() -> int:
            with self.manager.lease(self.model) as handle:
                return sum(handle.engine.count_tokens(text) for text in texts)

        try:
            return await asyncio.to_thread(count)
        except FlashstepError as exc:
            return RemoteError.of(exc)

    async def describe(self) -> ModelDescription | RemoteError:
        """The model this replica serves now, and how its last swap went."""

        def read() -> ModelDescription:
            with self.manager.lease(self.model) as handle:
                engine = handle.engine
                return ModelDescription(
                    name=handle.name,
                    path=self.config.path,
                    family=engine.family,
                    version=handle.version,
                    device=str(engine.device),
                    dtype=str(engine.dtype),
                    memory_bytes=int(engine.memory_bytes()),
                    config=engine.config,
                    loaded_at=handle.loaded_at,
                    in_flight=handle.in_flight - 1,  # less this lease
                    served_by=self.served_by,
                    revision=self.config.revision,
                    swap_error=self.swap_error,
                    engine_calls=self._engine_calls,
                    failed_engine_calls=self._failed_engine_calls,
                )

        if self.config is None:
            return RemoteError.of(NotReadyError(f"replica {self.served_by} has loaded no model yet"))
        try:
            return await asyncio.to_thread(read)
        except FlashstepError as exc:
            return RemoteError.of(exc)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: engines close once their last batch ends."""
        manager = getattr(self, "manager", None)
        if manager is not None:
            manager.close_all()

    def _admit(self, request: GenerationRequest, encoding: ImageEncoding, check) -> _Item:
        if self.config is None:
            raise NotReadyError(
                f"replica {self.served_by} has loaded no model yet", headers={"Retry-After": "1"}
            )
        with self.manager.lease(self.model) as handle:
            engine = handle.engine
            if check is not None:
                check(engine)
            validated = engine.validate(request)
            return _Item(request, validated, handle.serial, engine.batch_key(validated), encoding)

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _run_batch(self, items: list[_Item]) -> list[Reply]:
        """The calls @serve.batch gathered; the device work runs in a thread, off the event loop."""
        self._running_batches += 1  # the event loop's thread only: no lock
        self._run_batch.set_batch_wait_timeout_s(self._max_wait_s)
        try:
            return await asyncio.to_thread(self._execute, items)
        finally:
            self._running_batches -= 1
            if self._running_batches == 0:
                self._run_batch.set_batch_wait_timeout_s(0.0)

    # ----- in a worker thread -----

    def _execute(self, items: list[_Item]) -> list[Reply]:
        with self.manager.lease(self.model) as handle:
            for group in self._regroup(handle, items):
                self._generate(handle, group)
        return [item.reply for item in items]

    def _regroup(self, handle: LoadedModel, items: list[_Item]) -> list[list[_Item]]:
        """Split the gathered calls by batch key; calls validated before a swap are validated again."""
        groups: dict[Hashable, list[_Item]] = {}
        for item in items:
            if item.serial != handle.serial:
                try:
                    item.request = handle.engine.validate(item.raw)
                    item.key = handle.engine.batch_key(item.request)
                except FlashstepError as exc:
                    item.reply = RemoteError.of(exc)
                    continue
                item.serial = handle.serial
            groups.setdefault(item.key, []).append(item)
        return list(groups.values())

    def _generate(self, handle: LoadedModel, group: list[_Item]) -> None:
        """One engine call for `group`; on an error, isolate the requests that cause it (server/fault_isolation.py)."""

        def call(items: list[_Item]) -> GenerationResult:
            self._engine_calls += 1
            return handle.engine.generate([item.request for item in items])

        def failed_call(exc: Exception, size: int) -> None:
            self._failed_engine_calls += 1

        def fail(item: _Item, exc: Exception) -> None:
            error = request_failure(exc, seed=item.request.seed, retry_after_s=self._batch_seconds)
            item.reply = RemoteError.of(error)

        run_isolated(
            group,
            call,
            lambda items, result, served, started: self._deliver(handle, items, result, started, served),
            fail,
            on_error=failed_call,
        )

    def _deliver(
        self, handle: LoadedModel, group: list[_Item], result: GenerationResult, started: float, served
    ) -> None:
        elapsed = time.monotonic() - started
        self._batch_seconds = (
            elapsed if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * elapsed
        )
        for i in served:
            item = group[i]
            item.reply = ImageOutcome(
                image=encoded(result.images[i], item.encoding),  # here, beside the model: not in the ingress
                seed=item.request.seed,
                model=handle.name,
                model_version=result.model_version or handle.version,
                queue_wait_s=started - item.enqueued_at,
                batch_size=len(group),
                timings=result.timings,
                unet_evals=result.unet_evals,
                served_by=self.served_by,
            )
