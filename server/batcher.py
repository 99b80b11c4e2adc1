"""Dynamic batching: requests that can share a forward pass run as one `Engine.generate` call.

Worker threads per device own that device: one takes the group whose oldest request has
waited longest, lets it fill up to `max_batch_size` images or `max_wait_ms`, and runs it. A
device runs one batch at a time, except a pool of engine worker processes
(server/worker_pool.py), which runs one batch per process: its engines say how many
(`max_concurrent_batches`), and that many threads take batches for it. Groups
are keyed by (model name, `engine.batch_key(request)`) -- family, steps, size, guidance mode --
so one batch never mixes what the engine cannot share. Each image has its own future and its
own seed; the engine's batch invariance makes an image independent of its batch-mates.

The queue is bounded (`queue_limit` images): `submit` past it raises QueueFullError (429). A
request whose future was cancelled (client gone, timeout) is dropped before its batch runs;
one whose deadline passed fails with RequestTimeoutError. GPU/CPU work never touches the event
loop: callers await the futures.

Faults stay with the request that caused them:

- an `engine.generate` that raises is retried on each half of its batch, down to single
  requests, so only the request that fails alone fails (EngineFailure 500, or the engine's
  own 4xx for a request error); out of memory frees the device cache first and answers
  503 + Retry-After for a request that does not fit even alone;
- an image with NaN or Inf values fails its request (NonFiniteOutputFailure 500) and the rest
  of the batch is served from the same call;
- a request keeps its engine open from admission (`ModelManager.admit`): after an unload it
  still runs on that engine, while new requests for the name get 404;
- a device worker thread that dies from a bug of the batcher is restarted (at once by the next
  submit, else after `worker_restart_delay_s`) and counted; /readyz is 503 while it is dead.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Hashable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field

from PIL import Image

from flashstep.models.errors import (
    FlashstepError,
    InvalidRequestError,
    ModelNotFoundError,
    NonFiniteOutputError,
)
from flashstep.models.outputs import GenerationRequest, GenerationResult, StageTimings
from flashstep.server.errors import (
    EngineFailure,
    QueueFullError,
    RequestTimeoutError,
    ServerError,
    ShuttingDownError,
)
from flashstep.server.fault_isolation import is_out_of_memory, request_failure, run_isolated
from flashstep.server.image_encoding import EncodedImage, ImageEncoding
from flashstep.server.metrics import Metrics
from flashstep.server.model_manager import LoadedModel, ModelManager

logger = logging.getLogger("flashstep.server")

# A worker that keeps dying is restarted at most this often when no request arrives to restart it.
WORKER_RESTART_DELAY_S = 1.0


def _run_engine(engine, group: list[WorkItem]) -> GenerationResult:
    """One engine call for `group`; an engine in another process also gets each image's encoding."""
    requests = [item.request for item in group]
    if getattr(engine, "encodes_images", False):
        return engine.generate(requests, encodings=[item.encoding for item in group])
    return engine.generate(requests)


@dataclass
class ImageOutcome:
    """One generated image and how it was made.

    `image` is a PIL image from an in-process engine, or bytes already encoded by the worker
    process that made it; `served_by` names that worker ("" in-process).
    """

    image: Image.Image | EncodedImage
    seed: int
    model: str
    model_version: str
    queue_wait_s: float
    batch_size: int
    timings: StageTimings
    unet_evals: int
    served_by: str = ""


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
    admitted: LoadedModel | None = None  # the engine it was queued for; runs there after an unload
    encoding: ImageEncoding = field(default_factory=ImageEncoding)  # for engines that encode where they run
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set by the worker on arrival: waiting `max_wait_ms` for batch-mates would only add latency.
    dispatch_at_once: bool = False


class _DeviceWorker:
    """The threads that own one device and the groups of work queued for it.

    `concurrency` threads take batches from the same groups: 1 for a device, one per process
    for a pool of engine worker processes.
    """

    def __init__(self, device: str, batcher: Batcher, concurrency: int = 1):
        self.device = device
        self.concurrency = concurrency
        self._batcher = batcher
        self._groups: dict[Hashable, deque[WorkItem]] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._running = 0  # batches on the device now
        self._last_arrival = -math.inf
        self.restarts = 0
        self.threads = [self._new_thread(slot) for slot in range(concurrency)]

    def _new_thread(self, slot: int) -> threading.Thread:
        suffix = "" if self.concurrency == 1 else f"-{slot}"
        return threading.Thread(target=self._run, name=f"flashstep-batcher-{self.device}{suffix}", daemon=True)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def dead_slots(self) -> list[int]:
        """Threads that were started and ended though nobody asked them to stop."""
        if self._stopping:
            return []
        return [i for i, t in enumerate(self.threads) if t.ident is not None and not t.is_alive()]

    @property
    def dead(self) -> bool:
        return bool(self.dead_slots())

    def join(self, timeout: float) -> bool:
        """Wait for every thread to end; False if one still runs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)

    def put(self, items: list[WorkItem]) -> None:
        """Queue items. Two arrivals skip the fill wait, because waiting cannot help them:

        - one arriving while every slot runs a batch has already waited for the device, so when
          one frees the worker takes whatever has queued by then (up to `max_batch_size`) at once;
        - a lone request into a quiet server (nothing queued, no arrival within `max_wait_ms`)
          runs at once: at low load the wait buys no batch-mates, only latency.
        Under load requests queue behind running batches, so batches still fill.
        """
        with self._cond:
            now = time.monotonic()
            quiet = not self._groups and now - self._last_arrival > self._batcher.max_wait_s
            for item in items:
                item.dispatch_at_once = self._running >= self.concurrency or (quiet and len(items) == 1)
                self._groups.setdefault((item.model, item.key), deque()).append(item)
            self._last_arrival = now
            self._cond.notify_all()  # every slot thread re-checks the groups

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()  # every slot thread re-checks the groups

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
                    self._running += 1
                    return batch
                self._cond.wait(timeout=max_wait - waited)

    def _finish_batch(self) -> None:
        with self._cond:
            self._running -= 1

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            # A bug outside any one batch (taking work, bookkeeping): this thread ends; what is
            # still queued waits for the restart (Batcher._revive), which keeps the queue.
            logger.exception("device worker died: device=%s", self.device)
            self._batcher._worker_died(self)

    def _loop(self) -> None:
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
        worker_restart_delay_s: float = WORKER_RESTART_DELAY_S,
    ):
        self.manager = manager
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.worker_restart_delay_s = worker_restart_delay_s
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
        self,
        handle: LoadedModel,
        raws: list[GenerationRequest],
        requests: list[GenerationRequest],
        timeout_s: float,
        encoding: ImageEncoding | None = None,
    ) -> list[Future]:
        """Queue validated `requests` (one image each) for `handle`'s model; one future per image.

        `encoding` travels with each image to engines that encode where they run (worker processes).

        Raises QueueFullError when they would take the queue past `queue_limit`, and
        ShuttingDownError once `stop` was called.
        """
        engine = handle.engine
        deadline = time.monotonic() + timeout_s
        items = [
            WorkItem(
                handle.name, raw, req, handle.serial, engine.batch_key(req), deadline, admitted=handle,
                encoding=encoding or ImageEncoding(),
            )  # fmt: skip
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
                concurrency = int(getattr(engine, "max_concurrent_batches", 1))
                worker = self._workers[device] = _DeviceWorker(device, self, concurrency)
                worker.start()
            elif worker.dead:
                self._revive_locked(worker)
            # Admitted: the engine stays open until each of these is done, even if unloaded meanwhile.
            self.manager.admit(handle, len(items))
        for item in items:
            item.future.add_done_callback(lambda _, h=handle: self.manager.discharge(h))
        worker.put(items)
        return [item.future for item in items]

    def dead_workers(self) -> list[str]:
        """Devices whose worker thread died and was not restarted yet (for /readyz)."""
        with self._lock:
            return [device for device, worker in self._workers.items() if worker.dead]

    def _worker_died(self, worker: _DeviceWorker) -> None:
        with self._lock:
            if self._stopping:
                return
        timer = threading.Timer(self.worker_restart_delay_s, self._revive, args=(worker,))
        timer.daemon = True
        timer.start()

    def _revive(self, worker: _DeviceWorker) -> None:
        with self._lock:
            if worker.dead and not self._stopping:
                self._revive_locked(worker)

    def _revive_locked(self, worker: _DeviceWorker) -> None:
        for slot in worker.dead_slots():
            worker.restarts += 1
            worker.threads[slot] = worker._new_thread(slot)
            worker.threads[slot].start()
            self.metrics.worker_restarts.labels(worker.device).inc()
        logger.warning("device worker restarted: device=%s restarts=%d", worker.device, worker.restarts)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, run what is queued, and join the workers."""
        with self._lock:
            self._stopping = True
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            if not worker.join(max(0.0, deadline - time.monotonic())):
                logger.warning("batch worker still running at shutdown: device=%s", worker.device)

    # ----- called from worker threads -----

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.queue_depth.set(self._pending)

    def _retry_after(self) -> int:
        with self._lock:
            return self._retry_after_locked()

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
        with ExitStack() as stack:
            try:
                handle = stack.enter_context(self.manager.lease(live[0].model))
            except ModelNotFoundError:  # unloaded while these waited: they run where they were admitted
                handle = None
            if handle is not None:
                for group in self._regroup(handle, live):
                    self._generate(handle, group)
                return
        self._execute_admitted(live)

    def _execute_admitted(self, items: list[WorkItem]) -> None:
        by_handle: dict[int, list[WorkItem]] = {}
        for item in items:
            by_handle.setdefault(id(item.admitted), []).append(item)
        for group in by_handle.values():
            try:
                with self.manager.lease_handle(group[0].admitted) as handle:
                    for part in self._regroup(handle, group):
                        self._generate(handle, part)
            except FlashstepError as exc:  # closed already: nothing admitted was holding it
                for item in group:
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
        """Run `group` in one engine call; on an error, isolate the requests that cause it."""

        def failed_call(exc: Exception, size: int) -> None:
            if is_out_of_memory(exc):
                self.metrics.out_of_memory.labels(handle.name).inc()
            if not isinstance(exc, FlashstepError):
                self.metrics.batch_failures.labels(handle.name).inc()
            if size > 1:
                logger.warning("batch failed: model=%s serial=%d size=%d", handle.name, handle.serial, size)

        run_isolated(
            group,
            lambda items: _run_engine(handle.engine, items),
            lambda items, result, served, started: self._deliver(handle, items, result, started, served),
            lambda item, exc: self._fail_alone(handle, item, exc),
            on_error=failed_call,
        )

    def _fail_alone(self, handle: LoadedModel, item: WorkItem, exc: Exception) -> None:
        """Fail one request with the HTTP error its failure means; the exception itself stays in the log."""
        if isinstance(exc, NonFiniteOutputError):
            self.metrics.non_finite_outputs.labels(handle.name).inc()
        elif is_out_of_memory(exc):
            logger.warning("out of memory for a single request: model=%s serial=%d", handle.name, handle.serial)
        elif not isinstance(exc, (FlashstepError, ServerError)):
            logger.error("request failed alone: model=%s serial=%d", handle.name, handle.serial)
        item.future.set_exception(request_failure(exc, seed=item.request.seed, retry_after_s=self._retry_after()))

    def _deliver(
        self, handle: LoadedModel, group: list[WorkItem], result: GenerationResult, started: float, served
    ) -> None:
        served = list(served)
        if not served:
            return
        elapsed = time.monotonic() - started
        with self._lock:
            self._batch_seconds = elapsed if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * elapsed
        self._record(handle, [group[i] for i in served], len(group), result.timings, started)
        for i in served:
            item = group[i]
            item.future.set_result(
                ImageOutcome(
                    image=result.images[i],
                    seed=item.request.seed,
                    model=handle.name,
                    model_version=result.model_version or handle.version,
                    queue_wait_s=started - item.enqueued_at,
                    batch_size=len(group),
                    timings=result.timings,
                    unet_evals=result.unet_evals,
                    served_by=result.served_by,
                )
            )

    def _record(
        self, handle: LoadedModel, group: list[WorkItem], batch_size: int, timings: StageTimings, started: float
    ) -> None:
        m = self.metrics
        m.batch_size.observe(batch_size)
        m.images.labels(handle.name).inc(len(group))
        for stage in ("encode", "denoise", "decode", "total"):
            m.stage_seconds.labels(stage).observe(getattr(timings, stage))
        for item in group:
            m.stage_seconds.labels("queue").observe(started - item.enqueued_at)
