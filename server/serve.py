"""`flashstep serve` / `python -m flashstep.server`: parse the serve flags, build the app, run uvicorn.

Flags override FLASHSTEP_* environment variables, which override the defaults in `Settings`.
On SIGTERM (or Ctrl-C) the server stops taking work (503, /readyz 503), lets in-flight requests
finish for up to --graceful-shutdown-s, then closes the models.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from flashstep.server import allocator
from flashstep.server.errors import RequestIdFilter
from flashstep.server.lifecycle import Lifecycle
from flashstep.server.settings import Settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The serve flags; every default is None so that unset flags fall back to the environment."""
    add = parser.add_argument
    add("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 only in a container)")
    add("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    add("--models-root", type=Path, help="the only folder checkpoints may load from (default: shipped models)")
    add("--models", help="comma-separated model names to load at start (default: every one in the root)")
    add("--default-model", help="model for requests that name none (default: shapes-instaflow when loaded, else the first loaded)")
    add("--max-batch-size", type=int, help="most images per forward pass (default 8)")
    add("--max-wait-ms", type=float, help="longest a request waits for its batch to fill (default 10)")
    add("--queue-limit", type=int, help="most images waiting; past it, 429 (default 256)")
    add("--request-timeout-s", type=float, help="504 after this many seconds (default 120)")
    add("--admin-token", help="enables /admin (prefer FLASHSTEP_ADMIN_TOKEN: flags show in `ps`)")
    add("--attention-backend", help="sdpa, triton, xformers or math (default: kernels' choice)")
    add("--device", help="torch device, e.g. cuda:0 (default: CUDA when available, else CPU)")
    add("--dtype", choices=["float32", "float16", "bfloat16"], help="weights dtype (default: per device)")
    add("--warmup", action=argparse.BooleanOptionalAction, default=None, help="warm each model before ready")
    add("--image-store-dir", type=Path, help="folder of the url image store, shared by every process or replica using it (default: memory)")
    add("--public-url", help="scheme://host[:port][/prefix] that image urls start with (default: forwarded or bind address)")
    add("--graceful-shutdown-s", type=float, help="on SIGTERM, time in-flight requests get (default 60)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    add("--max-body-bytes", type=int, help="largest request body; past it, 413 before parsing (default 1048576)")
    add("--body-read-timeout-s", type=float, help="408 when a body is still arriving after this (default 10)")
    add("--keep-alive-timeout-s", type=int, help="close idle keep-alive connections after this (default 5)")
    add("--max-header-bytes", type=int, help="largest request line plus headers; past it, 400 (default 16384)")
    add("--workers", type=int, help="engine worker processes (one per GPU; on a CPU, how many); 0 runs inference in the HTTP process (default: one per GPU, else 1)")
    add("--worker-threads", type=int, help="torch CPU threads per worker process (default: the cores but one, shared out among workers)")
    add("--ray", action="store_true", default=None, help="serve on Ray Serve: an ingress and engine deployments (docs/scaling.md)")
    add("--replicas", dest="ray_replicas", type=int, help="Ray Serve: engine replicas per model, the autoscaler's minimum (default 1)")
    add("--max-replicas", dest="ray_max_replicas", type=int, help="Ray Serve: most engine replicas per model (default: --replicas)")
    add("--ray-address", help="Ray Serve: cluster to join, e.g. auto or ray://head:10001 (default: start a local one)")
    add("--cpus-per-replica", dest="ray_cpus_per_replica", type=float, help="Ray Serve: CPUs reserved per engine replica (default 1)")
    add("--gpus-per-replica", dest="ray_gpus_per_replica", type=float, help="Ray Serve: GPUs reserved per engine replica (default 0)")
    add("--malloc-mmap-threshold-bytes", type=int,
        help="glibc: while a model loads, map allocations above this, so unloaded models free their memory; 0 leaves glibc alone (default 4096)")
    return parser


def uvicorn_limits(settings: Settings) -> dict[str, int | str]:
    """uvicorn's own limits on a connection, from the settings: idle keep-alive time, header size.

    The h11 parser, because only it takes a header cap (httptools, uvicorn's pick when installed,
    buffers headers without bound); its cost is noise beside a forward pass. uvicorn applies no
    timeout before a connection's first request completes its headers: the cap bounds what such
    a connection can hold, and a proxy in front, where there is one, closes it.
    """
    return {
        "http": "h11",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashstep serve", description="Serve flashstep models over HTTP (OpenAI-compatible and native)."
    )
    return add_serve_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every flag that was given on top."""
    return Settings(**{key: value for key, value in vars(args).items() if value is not None})


class FlashstepServer(uvicorn.Server):
    """uvicorn's server, telling the app when a shutdown signal arrives.

    uvicorn runs the lifespan shutdown only after connections drain; marking the lifecycle at
    the signal makes new work get 503 (and /readyz 503) while in-flight requests finish.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.lifecycle.begin_shutdown()
        super().handle_exit(sig, frame)


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `flashstep serve` and `python -m flashstep.server`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())  # uvicorn's loggers write through these handlers too

    if settings.ray:
        from flashstep.server.ray_serve import serve_ray  # imports ray: only for --ray

        return serve_ray(settings)
    allocator.configure(settings.malloc_mmap_threshold_bytes)  # before any model's weights are allocated
    from flashstep.server.app import create_app  # after logging is set up; pulls in torch

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        log_config=None,  # keep the root logger's format (set above) for uvicorn's loggers too
        # uvicorn would rewrite the peer and scheme from X-Forwarded-* sent from 127.0.0.1; flashstep
        # believes those headers only from FLASHSTEP_TRUSTED_PROXIES (server/request_origin.py).
        proxy_headers=False,
        **uvicorn_limits(settings),
    )
    FlashstepServer(config, app.state.lifecycle).run()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
