"""Dynamic batching: requests that can share a forward pass run as one `Engine.generate` call.

One worker thread per device owns that device: it takes the group whose oldest request has
waited longest, lets it fill up to `max_batch_size` images or `max_wait_ms`, and runs it. Groups
are keyed by (model name, `engine.batch_key(request)`) -- family, steps, size, guidance mode --
so one batch never mixes what the engine cannot share. Each image has its own future and its
own seed; the engine's batch invariance makes an image independent of its batch-mates.

The queue is bounded (`queue_limit` images): `submit` past it raises QueueFullError (429). A
request whose future was cancelled (client gone, timeout) is dropped before its batch runs;
one whose deadline passed fails with RequestTimeoutError. An engine error fails only the
requests of its batch. GPU/CPU work never touches the event loop: callers await the futures.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL import Image

from flashstep.models.errors import FlashstepError, InvalidRequestError
from flashstep.models.outputs import GenerationRequest, StageTimings
from flashstep.server.errors import EngineFailure, QueueFullError, RequestTimeoutError, ShuttingDownError
from flashstep.server.metrics import Metrics
from flashstep.server.model_manager import LoadedModel, ModelManager

logger = logging.getLogger("flashstep.server")


@dataclass
class ImageOutcome:
    """One generated image and how it was made."""

    image: Image.Image
    seed: int
    model: str
    model_version: str
    queue_wait_s: float
    batch_size: int
    timings: StageTimings
    unet_evals: int


@dataclass(eq=False)
class WorkItem:
    """One image waiting for a batch.

    `raw` is the request as the client sent it, `request` the one `engine.validate` filled in;
    `serial` names the engine that validated it, so a swap in between triggers a re-validation.
    """

    model: str
    raw: GenerationRequest
    request: GenerationRequest
    serial: int
    key: Hashable
    deadline: float
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set by the worker on arrival: waiting `max_wait_ms` for batch-mates would only add latency.
    dispatch_at_once: bool = False


class _DeviceWorker:
    """The thread that owns one device and the groups of work queued for it."""

    def __init__(self, device: str, batcher: Batcher):
        self.device = device
        self._batcher = batcher
        self._groups: dict[Hashable, deque[WorkItem]] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._running = False  # a batch is on the device now
        self._last_arrival = -math.inf
        self.thread = threading.Thread(target=self._run, name=f"flashstep-batcher-{device}", daemon=True)

    def put(self, items: list[WorkItem]) -> None:
        """Queue items. Two arrivals skip the fill wait, because waiting cannot help them:

        - one arriving while a batch runs has already waited for the device, so when it frees
          the worker takes whatever has queued by then (up to `max_batch_size`) at once;
        - a lone request into a quiet server (nothing queued, no arrival within `max_wait_ms`)
          runs at once: at low load the wait buys no batch-mates, only latency.
        Under load requests queue behind running batches, so batches still fill.
        """
        with self._cond:
            now = time.monotonic()
            quiet = not self._groups and now - self._last_arrival > self._batcher.max_wait_s
            for item in items:
                item.dispatch_at_once = self._running or (quiet and len(items) == 1)
                self._groups.setdefault((item.model, item.key), deque()).append(item)
            self._last_arrival = now
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def _next_batch(self) -> list[WorkItem] | None:
        """Block until a batch is due; None once stopping and drained."""
        max_batch = self._batcher.max_batch_size
        max_wait = self._batcher.max_wait_s
        with self._cond:
            while True:
                if not self._groups:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                # FIFO across groups: the group holding the oldest request goes next.
                key, queue = min(self._groups.items(), key=lambda kv: kv[1][0].enqueued_at)
                waited = time.monotonic() - queue[0].enqueued_at
                due = len(queue) >= max_batch or waited >= max_wait or queue[0].dispatch_at_once
                if due or self._stopping:
                    batch = [queue.popleft() for _ in range(min(max_batch, len(queue)))]
                    if not queue:
                        del self._groups[key]
                    self._batcher._dequeued(len(batch))
                    self._running = True
                    return batch
                self._cond.wait(timeout=max_wait - waited)

    def _finish_batch(self) -> None:
        with self._cond:
            self._running = False

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._batcher._execute(batch)
            except BaseException:
                # A bug in the batcher itself: keep the worker alive, fail only this batch.
                logger.exception("batch worker error: device=%s size=%d", self.device, len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(EngineFailure("internal error while running this batch"))
            finally:
                self._finish_batch()


class Batcher:
    """Groups compatible requests into batches; one worker thread per device runs them."""

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_limit: int,
    ):
        self.manager = manager
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self._workers: dict[str, _DeviceWorker] = {}
        self._lock = threading.Lock()  # guards _workers, _pending, _stopping, _batch_seconds
        self._pending = 0
        self._stopping = False
        self._batch_seconds = 0.0  # moving average, for Retry-After

    @property
    def depth(self) -> int:
        """Images queued and not yet taken by a worker."""
        with self._lock:
            return self._pending

    def submit(
        self, handle: LoadedModel, raws: list[GenerationRequest], requests: list[GenerationRequest], timeout_s: float
    ) -> list[Future]:
        """Queue validated `requests` (one image each) for `handle`'s model; one future per image.

        Raises QueueFullError when they would take the queue past `queue_limit`, and
        ShuttingDownError once `stop` was called.
        """
        engine = handle.engine
        deadline = time.monotonic() + timeout_s
        items = [
            WorkItem(handle.name, raw, req, handle.serial, engine.batch_key(req), deadline)
            for raw, req in zip(raws, requests, strict=True)
        ]
        if len(items) > self.queue_limit:  # could never fit: retrying would not help
            raise InvalidRequestError(
                "n", f"`n` must be at most the server's queue_limit ({self.queue_limit}) but is {len(items)}"
            )
        device = str(engine.device)
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down and takes no new requests")
            if self._pending + len(items) > self.queue_limit:
                retry = self._retry_after_locked()
                raise QueueFullError(
                    f"the queue is full ({self._pending} of {self.queue_limit} images waiting); retry after {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            self._pending += len(items)
            self.metrics.queue_depth.set(self._pending)
            worker = self._workers.get(device)
            if worker is None:
                worker = self._workers[device] = _DeviceWorker(device, self)
                worker.thread.start()
        worker.put(items)
        return [item.future for item in items]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, run what is queued, and join the workers."""
        with self._lock:
            self._stopping = True
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                logger.warning("batch worker still running at shutdown: device=%s", worker.device)

    # ----- called from worker threads -----

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.queue_depth.set(self._pending)

    def _retry_after_locked(self) -> int:
        batches_ahead = math.ceil(self._pending / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def _execute(self, batch: list[WorkItem]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled: the client went away or stopped waiting
            if now > item.deadline:
                item.future.set_exception(RequestTimeoutError("the request timed out waiting in the queue"))
                continue
            live.append(item)
        if not live:
            return
        try:
            with self.manager.lease(live[0].model) as handle:
                for group in self._regroup(handle, live):
                    self._generate(handle, group)
        except FlashstepError as exc:  # the model was unloaded while these waited
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)

    def _regroup(self, handle: LoadedModel, items: list[WorkItem]) -> list[list[WorkItem]]:
        """Items validated by another engine (a swap happened meanwhile) are validated again."""
        if all(item.serial == handle.serial for item in items):
            return [items]
        groups: dict[Hashable, list[WorkItem]] = {}
        for item in items:
            try:
                item.request = handle.engine.validate(item.raw)
            except FlashstepError as exc:
                item.future.set_exception(exc)
                continue
            item.serial = handle.serial
            groups.setdefault(handle.engine.batch_key(item.request), []).append(item)
        return list(groups.values())

    def _generate(self, handle: LoadedModel, group: list[WorkItem]) -> None:
        started = time.monotonic()
        try:
            result = handle.engine.generate([item.request for item in group])
            if len(result.images) != len(group):
                raise RuntimeError(f"engine returned {len(result.images)} images for {len(group)} requests")
        except FlashstepError as exc:  # e.g. InvalidRequestError found late: the client's fault (4xx)
            for item in group:
                item.future.set_exception(exc)
            return
        except Exception:
            logger.exception("batch failed: model=%s serial=%d size=%d", handle.name, handle.serial, len(group))
            self.metrics.batch_failures.labels(handle.name).inc()
            for item in group:
                item.future.set_exception(
                    EngineFailure("the model failed while generating this request's batch; other requests are unaffected")
                )
            return
        elapsed = time.monotonic() - started
        with self._lock:
            self._batch_seconds = elapsed if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * elapsed
        self._record(handle, group, result.timings, started)
        for item, image in zip(group, result.images, strict=True):
            item.future.set_result(
                ImageOutcome(
                    image=image,
                    seed=item.request.seed,
                    model=handle.name,
                    model_version=result.model_version or handle.version,
                    queue_wait_s=started - item.enqueued_at,
                    batch_size=len(group),
                    timings=result.timings,
                    unet_evals=result.unet_evals,
                )
            )

    def _record(self, handle: LoadedModel, group: list[WorkItem], timings: StageTimings, started: float) -> None:
        m = self.metrics
        m.batch_size.observe(len(group))
        m.images.labels(handle.name).inc(len(group))
        for stage in ("encode", "denoise", "decode", "total"):
            m.stage_seconds.labels(stage).observe(getattr(timings, stage))
        for item in group:
            m.stage_seconds.labels("queue").observe(started - item.enqueued_at)
