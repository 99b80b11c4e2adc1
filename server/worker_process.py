"""The engine worker process: owns one device, loads engines, runs batches, encodes their images.

Started by `WorkerPool` (server/worker_pool.py) with multiprocessing's spawn method: a fresh
interpreter, so no lock or CUDA context of the HTTP process is inherited. It answers one command
at a time over its pipe (server/worker_protocol.py), except that a model loads in a thread of
its own: the pool lends the worker to one batch at a time, and batches keep running while a new
model loads beside them.

Signals: SIGINT and SIGTERM are ignored. A Ctrl-C or a `kill` of the process group reaches the
workers too, but stopping is the HTTP process's decision: it drains the queue through the
workers first, then sends the stop command. A worker whose HTTP process vanished (its pipe
closes) exits on its own.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flashstep.models.errors import NonFiniteOutputError
from flashstep.server import allocator
from flashstep.server.image_encoding import encoded
from flashstep.server.worker_protocol import (
    CloseCommand,
    EngineSpec,
    Fault,
    GenerateCommand,
    GenerateReply,
    LoadCommand,
)

logger = logging.getLogger("flashstep.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """How every worker of a pool runs: what loads engines, from where, on how many threads.

    `loader` must be picklable (a module-level function): it crosses to the spawned process.
    `devices` are handed out round-robin by worker index (["cuda:0", "cuda:1"], or [None] for
    the engine's own choice).
    """

    loader: Callable[..., Any]
    models_root: Path | None
    devices: tuple[str | None, ...] = (None,)
    threads: int | None = None
    malloc_mmap_threshold_bytes: int = 0
    log_level: str = "info"
    log_format: str = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _Worker:
    def __init__(self, index: int, options: WorkerOptions):
        self.index = index
        self.options = options
        self.device = options.devices[index % len(options.devices)]
        self.name = f"worker-{index}"
        self.engines: dict[int, Any] = {}

    def handle(self, command: Any) -> Any:
        if isinstance(command, GenerateCommand):
            return self.generate(command)
        if isinstance(command, LoadCommand):
            return self.load(command)
        if isinstance(command, CloseCommand):
            return self.close(command.serial)
        raise TypeError(f"unknown command {type(command).__name__}")

    def load(self, command: LoadCommand) -> EngineSpec:
        options = dict(command.options)
        if self.device is not None:
            options["device"] = self.device
        engine = None
        try:
            with allocator.mapped_while_loading():  # weights in their own mappings: freed for good at close
                engine = self.options.loader(
                    command.source, name=command.name, models_root=self.options.models_root, **options
                )
            if command.warmup:
                engine.warmup()
        except BaseException:
            if engine is not None:
                engine.close()
            raise
        gc.freeze()  # the loaded modules leave the cyclic collector's sight (see model_manager.py)
        self.engines[command.serial] = engine
        limits = replace(engine.limits, count_tokens=None)
        logger.info("engine loaded: worker=%s serial=%d name=%s version=%s", self.name, command.serial, command.name, engine.version)
        return EngineSpec(
            name=engine.name,
            path=str(engine.path),
            version=str(engine.version),
            family=engine.family,
            config=engine.config,
            device=str(engine.device),
            dtype=str(engine.dtype),
            memory_bytes=int(engine.memory_bytes()),
            limits=limits,
            tokenizers=list(engine.prompts.tokenizers),
        )

    def generate(self, command: GenerateCommand) -> GenerateReply:
        engine = self.engines[command.serial]
        bad: list[int] = []
        message = ""
        try:
            result = engine.generate(command.requests)
        except NonFiniteOutputError as exc:
            if exc.result is None:
                raise
            result, bad, message = exc.result, list(exc.indices), str(exc)
        images = [
            None if i in bad else encoded(image, encoding)
            for i, (image, encoding) in enumerate(zip(result.images, command.encodings, strict=True))
        ]
        return GenerateReply(
            images=images,
            timings=result.timings,
            unet_evals=result.unet_evals,
            batch_size=result.batch_size,
            model_version=result.model_version,
            served_by=self.name,
            non_finite=bad,
            message=message,
        )

    def close(self, serial: int) -> None:
        engine = self.engines.pop(serial, None)
        if engine is None:
            return
        engine.close()
        del engine
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        logger.info("engine closed: worker=%s serial=%d", self.name, serial)


def worker_main(conn, index: int, options: WorkerOptions) -> None:
    """The worker's whole life: announce itself, then answer commands until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=options.log_level.upper(), format=options.log_format)
    allocator.configure(options.malloc_mmap_threshold_bytes)
    import torch  # after the allocator: torch's own allocations follow the configured threshold

    if options.threads:
        torch.set_num_threads(options.threads)
    worker = _Worker(index, options)
    send_lock = threading.Lock()  # replies come from this thread and from loading threads

    def answer(call_id: int, command: Any) -> None:
        try:
            reply = (call_id, "ok", worker.handle(command))
        except Exception as exc:
            logger.exception("command failed: worker=%s command=%s", worker.name, type(command).__name__)
            if "out of memory" in str(exc).lower() and torch.cuda.is_available():
                torch.cuda.empty_cache()  # this process holds the cache: the smaller retry must fit here
            reply = (call_id, "fault", Fault.capture(exc))
        try:
            with send_lock:
                conn.send(reply)
        except (BrokenPipeError, OSError):
            pass  # the HTTP process is gone; the loop ends at the next receive

    conn.send((0, "ready", os.getpid()))
    loading: list[threading.Thread] = []
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the HTTP process is gone
            break
        if message is None:
            break
        call_id, command = message
        if isinstance(command, LoadCommand):
            # Loading and warming take seconds on a real checkpoint: in a thread, so the batches
            # of the models already held keep running meanwhile (a hot swap with one worker).
            thread = threading.Thread(target=answer, args=(call_id, command), name=f"load-{command.name}", daemon=True)
            thread.start()
            loading.append(thread)
            loading = [t for t in loading if t.is_alive()]
        else:
            answer(call_id, command)
    for thread in loading:
        thread.join(timeout=60)
    for serial in list(worker.engines):
        worker.close(serial)
