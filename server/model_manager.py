"""Which engines serve which model names: load, unload, set the default, hot-swap.

Every batch runs inside `lease(name)`, which pins the engine then serving `name` and counts it
in flight. Unload and swap take a name out of service at once but close its engine only when
its last lease ends, so batches already running finish on the engine they started with:

    swap("shapes-swiftbrush", new_folder)
      load + warm the new engine            (old one keeps serving meanwhile)
      switch the name under the lock        (new leases get the new engine)
      old engine closes when in_flight == 0 (memory freed)

Requests are admitted to an engine when the batcher queues them (`admit`), and that also keeps
it open: an unload takes the name out of service at once (new requests get 404), but the
requests it already admitted still run, on the engine they were admitted to (`lease_handle`).

All methods block (loading reads weights, warmup runs the model): call them from a worker
thread, never from the event loop.

Once a model is loaded the heap is frozen (`gc.freeze`): the ~460,000 objects a loaded server
holds (modules, tokenizers, libraries) leave the cyclic collector's sight, so its full passes no
longer walk them. Unfrozen, one such pass took 263 ms and stalled the batch it fell in (a p99
spike under load). Closing an engine unfreezes, collects its cycles and freezes again.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashstep.models.contract import EngineProtocol
from flashstep.models.errors import ForbiddenPathError, ModelNotFoundError
from flashstep.server.allocator import mapped_while_loading
from flashstep.server.errors import ModelConflictError
from flashstep.server.fault_isolation import empty_device_cache
from flashstep.server.metrics import Metrics

logger = logging.getLogger("flashstep.server")

# (name_or_path, *, name, models_root, device, dtype, attention_backend) -> a loaded engine
EngineLoader = Callable[..., EngineProtocol]


def registry_loader(name_or_path: str | Path, *, name: str, models_root: Path | None, **kwargs: Any) -> EngineProtocol:
    """Load through `models.engine.load_engine`, refusing any folder outside the models root (403).

    The registry allows the models root and the shipped models; a bare name the registry does
    not know would be tried relative to the working directory, so the resolved folder is
    checked here once more.
    """
    # Imported here, not at module top: `models.engine` pulls in torch and diffusers, and the
    # server's settings and CLI must stay importable (and `--help` fast) without them.
    from flashstep.models import registry
    from flashstep.models.engine import load_engine

    # restrict_to_root also confines the engine: its base, LoRA and every symlink stay inside.
    path = registry.resolve(str(name_or_path), models_root, restrict_to_root=True)
    roots = [registry.SHIPPED_MODELS_DIR, *([Path(models_root).resolve()] if models_root is not None else [])]
    if not any(path.resolve().is_relative_to(root) for root in roots):
        raise ForbiddenPathError(f"model folder {str(name_or_path)!r} lies outside the models root {models_root}")
    return load_engine(str(path), models_root, restrict_to_root=True, name=name, **kwargs)


@dataclass
class LoadedModel:
    """One engine serving one name. `serial` tells engines apart across swaps of the same name.

    `engine` is None once closed (its last lease ended after an unload or swap). `in_flight`
    counts batches running on it, `admitted` requests queued for it; it closes once retired and
    both are zero.
    """

    name: str
    engine: EngineProtocol | None
    serial: int
    version: str
    loaded_at: float
    in_flight: int = 0
    admitted: int = 0
    retired: bool = False
    closing: bool = False


class ModelManager:
    """The set of served models, safe to use from many threads."""

    def __init__(
        self,
        *,
        models_root: Path | None,
        metrics: Metrics,
        loader: EngineLoader = registry_loader,
        device: str | None = None,
        dtype: str | None = None,
        attention_backend: str | None = None,
        warmup: bool = True,
    ):
        self.models_root = models_root
        self._metrics = metrics
        self._loader = loader
        # The engine installs the attention backend itself (its NASA processors need it too).
        options = {"device": device, "dtype": dtype, "attention_backend": attention_backend}
        self._load_kwargs = {k: v for k, v in options.items() if v is not None}
        self._warmup = warmup
        self._models: dict[str, LoadedModel] = {}
        self._default: str | None = None
        self._lock = threading.Lock()  # guards _models, _default and every LoadedModel's counters
        self._admin_lock = threading.Lock()  # one load/unload/swap at a time
        self._serials = itertools.count(1)

    # ----- reading -----

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    @property
    def default(self) -> str | None:
        with self._lock:
            return self._default

    def get(self, name: str | None = None) -> LoadedModel:
        """The model serving `name` (the default when None); ModelNotFoundError lists the loaded ones."""
        with self._lock:
            return self._get_locked(name)

    def snapshot(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def _get_locked(self, name: str | None) -> LoadedModel:
        key = self._default if name is None else name
        if key is None or key not in self._models:
            loaded = sorted(self._models)
            if name is None:
                raise ModelNotFoundError(f"no default model is set; `model` must be one of the loaded models {loaded}")
            raise ModelNotFoundError(f"`model` must be one of the loaded models {loaded} but is {name!r}")
        return self._models[key]

    @contextmanager
    def lease(self, name: str | None) -> Iterator[LoadedModel]:
        """Pin the engine now serving `name` (the default when None); it stays open until the lease ends."""
        with self._lock:
            handle = self._get_locked(name)
            handle.in_flight += 1
        try:
            yield handle
        finally:
            self._unpin(handle, "in_flight")

    @contextmanager
    def lease_handle(self, handle: LoadedModel) -> Iterator[LoadedModel]:
        """Pin `handle` itself, served or not: for requests it admitted before an unload.

        Raises ModelNotFoundError if it closed already (nothing admitted was holding it).
        """
        with self._lock:
            if handle.engine is None:
                raise ModelNotFoundError(f"model {handle.name!r} was unloaded")
            handle.in_flight += 1
        try:
            yield handle
        finally:
            self._unpin(handle, "in_flight")

    def admit(self, handle: LoadedModel, n: int) -> None:
        """Count `n` requests queued for `handle`: it stays open until each one is `discharge`d."""
        with self._lock:
            handle.admitted += n

    def discharge(self, handle: LoadedModel) -> None:
        """One admitted request is done (served, failed or cancelled)."""
        self._unpin(handle, "admitted")

    def _unpin(self, handle: LoadedModel, counter: str) -> None:
        with self._lock:
            setattr(handle, counter, getattr(handle, counter) - 1)
            close = handle.retired and not handle.closing and handle.in_flight == 0 and handle.admitted == 0
            handle.closing = handle.closing or close  # at once: a racing last unpin must not close it twice
        if close:
            # Not on the caller's thread: that is a device worker, and closing (gc, cache
            # release) would stall the batches queued behind it.
            threading.Thread(target=self._close, args=(handle,), name=f"flashstep-close-{handle.name}").start()

    # ----- changing -----

    def load(self, name_or_path: str | Path, *, name: str | None = None) -> LoadedModel:
        """Load, warm and start serving a model from the models root under `name`."""
        name = name or Path(name_or_path).name
        with self._admin_lock:
            with self._lock:
                if name in self._models:
                    message = f"a model named {name!r} is loaded already; swap it or pick another name"
                    raise ModelConflictError(message, param="name")
            handle = self._build(name_or_path, name, self._metrics.model_loads)
            with self._lock:
                self._models[name] = handle
                if self._default is None:
                    self._default = name
                self._metrics.models_loaded.set(len(self._models))
        logger.info("model loaded: name=%s version=%s serial=%d", name, handle.version, handle.serial)
        return handle

    def swap(self, name: str, name_or_path: str | Path) -> tuple[LoadedModel, LoadedModel]:
        """Serve `name` from a new folder: load and warm it first, switch, then free the old engine."""
        with self._admin_lock:
            old = self.get(name)
            new = self._build(name_or_path, name, self._metrics.model_swaps)
            with self._lock:
                old = self._models[name]
                self._models[name] = new
                close = self._retire_locked(old)
        logger.info("model swapped: name=%s old_version=%s new_version=%s", name, old.version, new.version)
        if close:
            self._close(old)
        return old, new

    def unload(self, name: str) -> LoadedModel:
        """Stop serving `name`; its engine closes once the requests it admitted and its batches end."""
        with self._admin_lock, self._lock:
            handle = self._get_locked(name)
            del self._models[name]
            if self._default == name:
                self._default = next(iter(self._models), None)
            close = self._retire_locked(handle)
            self._metrics.models_loaded.set(len(self._models))
            self._metrics.model_unloads.inc()
        if close:
            self._close(handle)
        logger.info("model unloaded: name=%s in_flight=%d", name, handle.in_flight)
        return handle

    def set_default(self, name: str) -> None:
        with self._lock:
            self._get_locked(name)
            self._default = name
        logger.info("default model set: name=%s", name)

    def close_all(self) -> None:
        """Unload everything (shutdown). Engines still leased close when their batch ends."""
        for name in self.names():
            try:
                self.unload(name)
            except ModelNotFoundError:
                pass

    # ----- internals -----

    def _build(self, name_or_path: str | Path, name: str, counter) -> LoadedModel:
        engine = None
        try:
            with mapped_while_loading():  # weights outside the heap: freed for good at unload (allocator.py)
                engine = self._loader(name_or_path, name=name, models_root=self.models_root, **self._load_kwargs)
            if self._warmup:
                engine.warmup()
        except ForbiddenPathError:
            counter.labels("forbidden").inc()
            raise
        except BaseException:
            counter.labels("error").inc()
            if engine is not None:
                engine.close()
            raise
        counter.labels("ok").inc()
        gc.freeze()
        return LoadedModel(
            name=name, engine=engine, serial=next(self._serials), version=str(engine.version), loaded_at=time.time()
        )

    def _retire_locked(self, handle: LoadedModel) -> bool:
        """Mark `handle` out of service; True when nothing holds it, so the caller closes it now."""
        handle.retired = True
        close = handle.in_flight == 0 and handle.admitted == 0  # else whoever unpins it last closes it
        handle.closing = handle.closing or close
        return close

    def _close(self, handle: LoadedModel) -> None:
        try:
            handle.engine.close()
        finally:
            handle.engine = None  # the manager's reference is the last: dropping it lets the weights be collected
            gc.unfreeze()  # the engine's objects were frozen with the rest at load
            gc.collect()
            gc.freeze()
            empty_device_cache()
        logger.info("engine closed: name=%s serial=%d", handle.name, handle.serial)
