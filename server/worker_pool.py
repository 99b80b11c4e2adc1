"""Engine worker processes: inference outside the HTTP process, one process per device.

    HTTP process: routes, validation, batcher queue and admission, model manager
        | RemoteEngine.generate(batch)  -- a batcher thread per worker process
        v
    WorkerPool: borrow an idle worker, send the batch down its pipe, wait for the encoded images
        |
    worker process (server/worker_process.py): engine.generate + PNG/JPEG encoding

HTTP parsing, validation and the batcher never wait on the model's GIL, and image encoding runs
beside the model. Every worker holds every loaded model: a load or swap runs on the workers one
after another, each loading in a thread of its own while its batches keep running.

A worker that dies (killed, crashed, out of host memory) is found by the thread waiting on it
(within `POLL_S`) or by its pipe's reader; its batch runs once more on another worker, and if
that worker dies too it fails with `WorkerLostError`, which the batcher treats like any failed
batch: split and run again, so admitted requests are served, or answered 503 when no worker can
take them in time. The dead worker is
replaced by a new process that loads every model the pool holds before it takes work.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from flashstep.models.errors import NonFiniteOutputError
from flashstep.models.outputs import GenerationRequest, GenerationResult
from flashstep.models.prompts import TokenCounter
from flashstep.models.validation import batch_key, validate_request
from flashstep.server.errors import ServerError
from flashstep.server.image_encoding import ImageEncoding
from flashstep.server.worker_process import WorkerOptions, worker_main
from flashstep.server.worker_protocol import (
    CloseCommand,
    EngineSpec,
    Fault,
    GenerateCommand,
    GenerateReply,
    LoadCommand,
)

logger = logging.getLogger("flashstep.server")

POLL_S = 0.1  # how often a waiting thread checks that its worker still lives
START_TIMEOUT_S = 300.0  # a spawned worker imports torch before it answers
STOP_GRACE_S = 10.0
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)  # between failed restarts of one worker
RETRY_AFTER_S = 5


class WorkerLostError(ServerError):
    """The worker process running this batch died (HTTP 503 when a request cannot be run elsewhere)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "worker_lost"


class NoWorkerError(ServerError):
    """No worker process could take the batch in time: all dead or restarting (HTTP 503)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "no_worker"


class _Worker:
    """One worker process and the pipe to it.

    Calls are numbered: a reader thread hands each reply to the call waiting for it, so a model
    can load in the worker (in a thread there) while batches keep running on it. Batches
    themselves are exclusive: the pool lends a worker to one batch at a time (`state` busy).
    """

    def __init__(self, index: int):
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn = None
        self.pid: int | None = None
        self.state = "starting"  # starting | idle | busy | dead | stopped
        self.serials: set[int] = set()  # engines this process holds
        self.restarts = 0
        self._pending: dict[int, Future] = {}
        self._calls = itertools.count(1)
        self._lock = threading.Lock()  # guards conn, generation, _pending, _closed and sending on conn
        self._closed = True
        self.generation = 0  # one per process started: replies and losses of an older one are ignored

    @property
    def name(self) -> str:
        return f"worker-{self.index}"

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def attach(self, conn, on_lost: Callable[[_Worker], None]) -> None:
        """Start reading replies from a freshly started process's pipe."""
        with self._lock:
            self.generation += 1
            self.conn, self._closed, self._pending = conn, False, {}
            generation = self.generation
        threading.Thread(
            target=self._read, args=(conn, generation, on_lost), name=f"flashstep-{self.name}-replies", daemon=True
        ).start()

    def _read(self, conn, generation: int, on_lost: Callable[[_Worker], None]) -> None:
        while True:
            try:
                call_id, status, payload = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(call_id, None)
            if future is not None:
                future.set_result((status, payload))
        with self._lock:  # the process is gone (or was told to stop): nothing more will answer
            if generation != self.generation:
                return  # the pipe of a process already replaced
            self._closed = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(EOFError(f"{self.name} closed its pipe"))
        on_lost(self)

    def call(self, command: Any, timeout_s: float | None = None) -> Any:
        """Send `command`, wait for its reply; raise what the worker raised, or WorkerLostError."""
        future: Future = Future()
        try:
            with self._lock:
                if self._closed:
                    raise EOFError(f"{self.name} is not running")
                call_id = next(self._calls)
                self._pending[call_id] = future
                self.conn.send((call_id, command))
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                try:
                    status, payload = future.result(timeout=POLL_S)
                    break
                except FutureTimeout:
                    if not self.alive():
                        raise EOFError(f"{self.name} exited") from None
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{self.name} did not answer {type(command).__name__} within {timeout_s:g} s"
                        ) from None
        except TimeoutError:
            raise  # alive but slow: not a lost worker (TimeoutError is an OSError)
        except (EOFError, OSError) as exc:
            raise WorkerLostError(
                f"the worker process running this request died ({self.name}); retry",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from exc
        if status == "fault":
            raise payload.rebuild() if isinstance(payload, Fault) else RuntimeError(str(payload))
        return payload

    def stop(self) -> None:
        """Ask the process to exit once its current work is done."""
        with self._lock:
            if self.conn is not None and not self._closed:
                try:
                    self.conn.send(None)
                except OSError:
                    pass


class WorkerPool:
    """N engine worker processes, every one holding every loaded model."""

    def __init__(self, size: int, options: WorkerOptions, *, metrics=None, acquire_timeout_s: float = 120.0):
        if size < 1:
            raise ValueError(f"`workers` must be >= 1 but is {size}")
        self.size = size
        self.options = options
        self.metrics = metrics
        self.acquire_timeout_s = acquire_timeout_s
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(i) for i in range(size)]
        self._cond = threading.Condition()  # guards every worker's state and serials, and _specs
        self._specs: OrderedDict[int, LoadCommand] = OrderedDict()  # models every worker must hold
        self._engine_specs: dict[int, EngineSpec] = {}  # what the first worker to load each reported
        self._serials = itertools.count(1)
        self._stopping = False

    # ----- life -----

    def start(self) -> None:
        """Spawn every worker and wait until each answers (they import torch in parallel)."""
        pipes = [self._spawn(worker) for worker in self._workers]
        for worker, conn in zip(self._workers, pipes, strict=True):
            self._await_ready(worker, conn)
            with self._cond:
                worker.state = "idle"
                self._cond.notify_all()
        logger.info("engine workers started: %s", ", ".join(f"{w.name}=pid {w.pid}" for w in self._workers))

    def stop(self, timeout_s: float = STOP_GRACE_S) -> None:
        """Tell every worker to exit (after the batcher drained), then make sure it did."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for worker in self._workers:
            worker.stop()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            if worker.process is None:
                continue
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                logger.warning("worker did not exit, killing it: %s pid=%s", worker.name, worker.pid)
                worker.process.kill()
                worker.process.join(timeout=STOP_GRACE_S)
            worker.state = "stopped"

    def status(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, state, restarts (for /readyz and metrics)."""
        with self._cond:
            return [
                {"worker": w.name, "pid": w.pid, "state": w.state, "restarts": w.restarts} for w in self._workers
            ]

    def pids(self) -> list[tuple[str, int]]:
        with self._cond:
            return [(w.name, w.pid) for w in self._workers if w.pid is not None and w.state != "stopped"]

    @property
    def serving(self) -> int:
        """Workers able to take a batch now or after the current one."""
        with self._cond:
            return sum(w.state in ("idle", "busy") for w in self._workers)

    # ----- engines -----

    def load_engine(self, name_or_path: str | Path, *, name: str, models_root: Path | None = None, **options: Any):
        """Load a model on every worker (one after another) and return its RemoteEngine.

        The signature of the model manager's loader; the models root is the workers' own.
        """
        serial = next(self._serials)
        command = LoadCommand(serial, name, str(name_or_path), options, warmup=True)
        with self._cond:
            self._specs[serial] = command
        try:
            for worker in self._workers:
                self._run_on(worker, command)
            spec = self._await_spec(serial)  # at once, unless every worker was restarting
        except BaseException:
            self.close_engine(serial)
            raise
        return RemoteEngine(self, serial, spec)

    def close_engine(self, serial: int) -> None:
        """Free `serial` on every worker that holds it (each does so after the batch it is running)."""
        with self._cond:
            self._specs.pop(serial, None)
            self._engine_specs.pop(serial, None)
        for worker in self._workers:
            try:
                self._run_on(worker, CloseCommand(serial), only_if_held=serial)
            except WorkerLostError:
                pass  # its replacement does not load what is no longer in _specs

    def generate(
        self, serial: int, requests: list[GenerationRequest], encodings: list[ImageEncoding]
    ) -> GenerateReply:
        """One batch on an idle worker; a batch whose worker died under it runs once more on another
        (a request fails with WorkerLostError only when that happens twice)."""
        command = GenerateCommand(serial, requests, encodings)
        try:
            with self._borrow() as worker:
                return worker.call(command)
        except WorkerLostError:
            logger.warning("a worker died under a batch of %d; running it again on another", len(requests))
        with self._borrow() as worker:
            return worker.call(command)

    # ----- borrowing -----

    @contextmanager
    def _borrow(self) -> Iterator[_Worker]:
        """An idle worker, exclusively, until the block ends; NoWorkerError when none frees in time."""
        deadline = time.monotonic() + self.acquire_timeout_s
        with self._cond:
            while True:
                idle = [w for w in self._workers if w.state == "idle"]
                if idle:
                    worker = idle[0]
                    worker.state = "busy"
                    break
                remaining = deadline - time.monotonic()
                if self._stopping or remaining <= 0:
                    raise NoWorkerError(
                        "no engine worker could take this request in time; retry",
                        headers={"Retry-After": str(RETRY_AFTER_S)},
                    )
                self._cond.wait(timeout=remaining)
        try:
            yield worker
        except WorkerLostError:
            self._lost(worker)
            raise
        except BaseException:
            self._release(worker)
            raise
        else:
            self._release(worker)

    def _run_on(self, worker: _Worker, command: Any, *, only_if_held: int | None = None) -> Any:
        """Run an admin command on one given worker, beside the batches it runs (a load runs in a
        thread of the worker, so a single worker keeps serving while it loads).

        A worker that is starting or dead is skipped (None): its restart loads whatever `_specs`
        holds then. `only_if_held`: skip a worker that does not hold that serial.
        """
        serial = getattr(command, "serial", None)
        with self._cond:
            if worker.state not in ("idle", "busy"):
                return None
            if isinstance(command, LoadCommand) and serial in worker.serials:
                return None
            if only_if_held is not None and only_if_held not in worker.serials:
                return None
        try:
            result = worker.call(command, timeout_s=START_TIMEOUT_S)
        except WorkerLostError:
            self._lost(worker)
            raise
        self._record(worker, command, result)
        return result

    def _record(self, worker: _Worker, command: Any, result: Any) -> None:
        with self._cond:
            if isinstance(command, LoadCommand):
                worker.serials.add(command.serial)
                if command.serial in self._specs:
                    self._engine_specs.setdefault(command.serial, result)
            elif isinstance(command, CloseCommand):
                worker.serials.discard(command.serial)
            self._cond.notify_all()

    def _await_spec(self, serial: int) -> EngineSpec:
        """The engine spec of `serial`, once some worker (maybe a restarting one) has loaded it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        with self._cond:
            while serial not in self._engine_specs:
                if time.monotonic() > deadline or self._stopping:
                    raise NoWorkerError("no engine worker came up to load the model")
                self._cond.wait(timeout=1.0)
            return self._engine_specs[serial]

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if worker.state == "busy":
                worker.state = "idle"
            self._cond.notify_all()

    # ----- death and restart -----

    def _lost(self, worker: _Worker) -> None:
        """A serving worker's process died: mark it and start its replacement (once per death).

        A starting worker is its restart's business: a failure there retries the restart.
        """
        with self._cond:
            if worker.state not in ("idle", "busy") or self._stopping:
                return
            worker.state = "dead"
            worker.serials.clear()
            self._cond.notify_all()
        if worker.alive():  # its pipe broke but the process lingers: it can never answer again
            worker.process.kill()
        logger.error("engine worker died: %s pid=%s exitcode=%s", worker.name, worker.pid, _exitcode(worker))
        threading.Thread(target=self._restart, args=(worker,), name=f"flashstep-restart-{worker.name}", daemon=True).start()

    def _restart(self, worker: _Worker) -> None:
        for attempt in itertools.count():
            with self._cond:
                if self._stopping:
                    return
            if worker.process is not None:
                worker.process.join(timeout=1.0)
            try:
                self._await_ready(worker, self._spawn(worker))
                self._replay(worker)
            except Exception:
                logger.exception("engine worker restart failed: %s attempt=%d", worker.name, attempt + 1)
                if worker.process is not None and worker.process.is_alive():
                    worker.process.kill()
                time.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                continue
            with self._cond:
                worker.restarts += 1
                worker.state = "idle"
                self._cond.notify_all()
            if self.metrics is not None:
                self.metrics.worker_process_restarts.labels(worker.name).inc()
            logger.warning("engine worker restarted: %s pid=%s restarts=%d", worker.name, worker.pid, worker.restarts)
            return

    def _replay(self, worker: _Worker) -> None:
        """Load every model the pool holds into a fresh worker, until nothing is missing."""
        while True:
            with self._cond:
                missing = [c for s, c in self._specs.items() if s not in worker.serials]
                extra = worker.serials - set(self._specs)
            if not missing and not extra:
                return
            for serial in extra:  # closed while this worker was loading it
                close = CloseCommand(serial)
                self._record(worker, close, worker.call(close, timeout_s=START_TIMEOUT_S))
            for command in missing:
                self._record(worker, command, worker.call(command, timeout_s=START_TIMEOUT_S))

    def _spawn(self, worker: _Worker):
        """Start `worker`'s process; returns the parent's end of its pipe (read by `_await_ready`)."""
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main, args=(child, worker.index, self.options), name=f"flashstep-{worker.name}", daemon=True
        )
        process.start()
        child.close()  # the parent keeps only its end: the worker's death closes the pipe
        with self._cond:
            worker.process, worker.pid = process, process.pid
            worker.state = "starting"
            worker.serials = set()
        return parent

    def _await_ready(self, worker: _Worker, conn) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not conn.poll(POLL_S):
            if not worker.process.is_alive():
                raise RuntimeError(f"{worker.name} exited with {worker.process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.name} did not start within {START_TIMEOUT_S:g} s")
        _, status, pid = conn.recv()
        if status != "ready":
            raise RuntimeError(f"{worker.name} answered {status!r} instead of ready")
        worker.attach(conn, self._lost)


def _exitcode(worker: _Worker) -> int | None:
    if worker.process is None:
        return None
    worker.process.join(timeout=POLL_S)
    return worker.process.exitcode


class RemoteEngine:
    """`EngineProtocol` for a model held by the worker pool, as the HTTP process sees it.

    Validation and batch keys run here, from the engine's limits and its tokenizers (no round
    trip per request); `generate` borrows a worker. The model manager counts and closes it like
    any engine; `max_concurrent_batches` tells the batcher to run one batch per worker at once.
    """

    encodes_images = True

    def __init__(self, pool: WorkerPool, serial: int, spec: EngineSpec):
        self.pool = pool
        self.serial = serial
        self.name = spec.name
        self.path = Path(spec.path)
        self.version = spec.version
        self.family = spec.family
        self.config = spec.config
        self.device = f"workers:{spec.device}"  # one batcher queue for the pool, apart from in-process devices
        self.dtype = spec.dtype
        self.max_concurrent_batches = pool.size
        self._memory_bytes = spec.memory_bytes
        self.tokens = TokenCounter(spec.tokenizers)
        self.limits = replace(spec.limits, count_tokens=self.tokens.count)

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        return validate_request(request, self.limits)

    def batch_key(self, request: GenerationRequest) -> tuple:
        return batch_key(self.validate(request))

    def generate(
        self, requests: list[GenerationRequest], encodings: list[ImageEncoding] | None = None
    ) -> GenerationResult:
        """Images for `requests`, made and encoded by one worker process (PNG unless `encodings` says)."""
        encodings = encodings or [ImageEncoding()] * len(requests)
        reply = self.pool.generate(self.serial, requests, encodings)
        result = GenerationResult(
            images=reply.images,
            timings=reply.timings,
            unet_evals=reply.unet_evals,
            batch_size=reply.batch_size,
            model_version=reply.model_version,
            served_by=reply.served_by,
        )
        if reply.non_finite:
            raise NonFiniteOutputError(reply.message, indices=reply.non_finite, result=result)
        return result

    def warmup(self) -> None:
        """Nothing: every worker warmed the model as it loaded it (a restarted worker too)."""

    def memory_bytes(self) -> int:
        """Bytes of weights one worker holds for this model (each worker holds a copy)."""
        return self._memory_bytes

    def count_tokens(self, text: str) -> int:
        return self.tokens.count(text)

    def close(self) -> None:
        self.pool.close_engine(self.serial)

    def __repr__(self) -> str:
        return f"RemoteEngine(name={self.name!r}, version={self.version!r}, workers={self.pool.size})"


def default_worker_count() -> int:
    """One worker per CUDA device, else one."""
    try:
        import torch
    except ImportError:
        return 1
    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def default_threads(workers: int) -> int:
    """The cores but one, shared out among the workers (at least one each).

    The core left over is the HTTP process's (and the clients', on a small machine). Measured on 2
    cores, one worker at 16 clients: with 1 torch thread a steady 84-91 images/s; with 2, between
    10 and 95 images/s from run to run, p99 up to 3.9 s, as the worker's OpenMP threads and the HTTP
    process take each other's core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // workers)
