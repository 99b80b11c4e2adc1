"""The app factory: `create_app(settings)` wires the services and routers; the lifespan loads models.

    app = create_app(Settings())          # builds objects only: no weights are read here
    uvicorn.run(app)                      # lifespan: start loading in a thread; /readyz 503 until warm

Models load in a background thread started by the lifespan, so /healthz answers during a long
load and /readyz tells a load balancer when to send traffic. On shutdown the batcher runs what
is queued before the engines close.

With `workers` > 0 (the default) inference runs in engine worker processes
(server/worker_pool.py): the lifespan's loader thread starts them before loading the models, and
the model manager's engines are their `RemoteEngine`s. `workers=0` keeps every engine in this
process (debugging, and tests that reach into an engine).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import flashstep
from flashstep.server.batcher import Batcher
from flashstep.server.edge import BodyLimitMiddleware
from flashstep.server.errors import ErrorBoundaryMiddleware, install_error_handlers
from flashstep.server.generation import GenerationService
from flashstep.server.image_store import ImageStore, open_image_store
from flashstep.server.lifecycle import Lifecycle, Phase
from flashstep.server.metrics import Metrics
from flashstep.server.model_manager import EngineLoader, ModelManager, registry_loader
from flashstep.server.request_origin import RequestOrigin
from flashstep.server.routes import admin, generate, health, images, playground
from flashstep.server.settings import Settings
from flashstep.server.worker_pool import WorkerPool, default_threads, default_worker_count
from flashstep.server.worker_process import WorkerOptions

logger = logging.getLogger("flashstep.server")
WORKER_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(processName)s %(message)s"


def startup_models(settings: Settings) -> list[str]:
    """The models to load at start: the configured list, else every model in the models root."""
    if settings.models:
        names = list(settings.models)
    else:
        from flashstep.models import registry  # imported only when no model list is given

        names = sorted(registry.discover(settings.models_root))
    default = default_model(settings, names)
    if default in names:
        names.remove(default)
        names.insert(0, default)  # loaded first, so it serves first
    return names


def default_model(settings: Settings, names: list[str]) -> str | None:
    """The configured default, else the shipped one-step default when it is loaded, else None (first loaded)."""
    from flashstep.models.registry import SHIPPED_DEFAULT_MODEL

    if settings.default_model:
        return settings.default_model
    return SHIPPED_DEFAULT_MODEL if SHIPPED_DEFAULT_MODEL in names else None


def load_startup_models(
    settings: Settings, manager: ModelManager, lifecycle: Lifecycle, pool: WorkerPool | None = None
) -> None:
    """Start the worker processes, load and warm every start-up model, then mark the server ready
    (or failed, with why)."""
    lifecycle.set(Phase.LOADING)
    try:
        if pool is not None:
            pool.start()
        names = startup_models(settings)
        if not names:
            raise RuntimeError(f"no models to serve: the models root {settings.models_root or '(shipped)'} holds none")
        for name in names:
            manager.load(name)
        if default := default_model(settings, names):
            manager.set_default(default)
    except Exception as exc:
        logger.exception("start-up model loading failed")
        lifecycle.set(Phase.FAILED, error=str(exc))
        return
    lifecycle.set(Phase.READY)
    logger.info("ready: models=%s default=%s", manager.names(), manager.default)


def worker_pool(settings: Settings, metrics: Metrics, loader: EngineLoader) -> WorkerPool | None:
    """The engine worker processes `settings` ask for (not started), or None for in-process engines."""
    count = default_worker_count() if settings.workers is None else settings.workers
    if count == 0:
        return None
    devices: tuple[str | None, ...] = (settings.device,)
    if settings.device is None and count > 1 and default_worker_count() > 1:
        devices = tuple(f"cuda:{i}" for i in range(default_worker_count()))  # one worker per GPU
    options = WorkerOptions(
        loader=loader,
        models_root=Path(settings.models_root) if settings.models_root else None,
        devices=devices,
        threads=settings.worker_threads or default_threads(count),
        malloc_mmap_threshold_bytes=settings.malloc_mmap_threshold_bytes,
        log_level=settings.log_level,
        log_format=WORKER_LOG_FORMAT,
    )
    pool = WorkerPool(count, options, metrics=metrics, acquire_timeout_s=settings.request_timeout_s)
    metrics.watch_workers(pool.pids)
    metrics.worker_processes.set_function(lambda: pool.serving)
    return pool


def assemble_app(
    settings: Settings,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    summary: str,
    metrics: Metrics,
    lifecycle: Lifecycle,
    manager: Any,
    batcher: Any,
    generation: Any,
    image_store: ImageStore,
) -> FastAPI:
    """The HTTP API over a set of services: the state the routes read, the error boundary, the edge
    limits and the routers (admin only with a token).

    One process (`create_app`) and the Ray Serve ingress (server/ray_ingress.py) pass their own
    model manager, queue and generation service; everything a client sees is built here once.
    """
    app = FastAPI(title="flashstep", version=flashstep.__version__, summary=summary, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.manager = manager
    app.state.batcher = batcher
    app.state.generation = generation
    app.state.image_store = image_store
    app.state.origin = RequestOrigin(settings.public_url, settings.trusted_proxies)

    install_error_handlers(app)
    # Added first, so it runs inside the boundary: its 413/408/400 answers carry the request id.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
        metrics=metrics,
    )
    app.add_middleware(ErrorBoundaryMiddleware, metrics=metrics)
    app.include_router(images.router)
    app.include_router(generate.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    if settings.admin_token is not None:
        app.include_router(admin.router)
    else:
        logger.info("admin routes disabled: no admin token configured")
    return app


def create_app(settings: Settings, *, engine_loader: EngineLoader | None = None) -> FastAPI:
    """Build the flashstep app. `engine_loader` replaces `models.registry` (tests only); with worker
    processes it runs in them, so it must be a picklable module-level function."""
    metrics = Metrics(settings.max_batch_size)
    lifecycle = Lifecycle()
    pool = worker_pool(settings, metrics, engine_loader or registry_loader)
    manager = ModelManager(
        models_root=Path(settings.models_root) if settings.models_root else None,
        metrics=metrics,
        loader=pool.load_engine if pool is not None else (engine_loader or registry_loader),
        device=settings.device if pool is None else None,  # each worker's device is its own (WorkerOptions)
        dtype=settings.dtype,
        attention_backend=settings.attention_backend,
        warmup=settings.warmup,
    )
    batcher = Batcher(
        manager,
        metrics,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        queue_limit=settings.queue_limit,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(
            target=load_startup_models, args=(settings, manager, lifecycle, pool), name="flashstep-model-loader", daemon=True
        )
        loader.start()
        yield
        lifecycle.begin_shutdown()
        await run_in_threadpool(batcher.stop, settings.graceful_shutdown_s)
        await run_in_threadpool(manager.close_all)
        if pool is not None:
            await run_in_threadpool(pool.stop)
        logger.info("shut down")

    image_store = open_image_store(
        max_bytes=settings.image_store_bytes,
        client_share=settings.image_store_client_share,
        ttl_s=settings.image_ttl_s,
        folder=settings.image_store_dir,
    )
    app = assemble_app(
        settings,
        lifespan=lifespan,
        summary="One-step and few-step text-to-image diffusion, batched.",
        metrics=metrics,
        lifecycle=lifecycle,
        manager=manager,
        batcher=batcher,
        generation=GenerationService(manager, batcher, lifecycle, settings.request_timeout_s),
        image_store=image_store,
    )
    app.state.pool = pool
    return app
