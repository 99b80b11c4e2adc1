"""Start the benchmarked servers as subprocesses on 127.0.0.1, wait until they are ready, stop them.

    with start_server(flashstep_spec(folder, settings), log_dir) as server:
        ... server.url ...

Each server runs in its own session (process group), so stopping it reaches the worker processes
LitServe spawns too: SIGTERM to the group we started, then SIGKILL after a grace period. Every wait
is bounded; a server that exits or never gets ready raises with the tail of its log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flashstep.bench.report import REPO_ROOT

START_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BatchSettings:
    """What flashstep and LitServe are told alike: most images per forward pass, longest wait for one."""

    max_batch_size: int = 8
    max_wait_ms: float = 10.0


@dataclass(frozen=True)
class Runtime:
    """Where every server runs its model: device, weights dtype, torch CPU threads."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


@dataclass
class ServerSpec:
    """How to start one server and how to tell that it is ready."""

    name: str
    argv: list[str]
    port: int
    ready: Callable[[httpx.Response], bool]
    health_path: str
    generate_path: str = "/generate"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _thread_env(runtime: Runtime) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(runtime.threads)} if runtime.threads else {}


def _flashstep_ready(response: httpx.Response) -> bool:
    body = response.json()
    if body.get("status") == "failed":
        raise RuntimeError(f"flashstep failed to load its model: {body.get('error')}")
    return response.status_code == 200 and body.get("status") == "ready"


def flashstep_spec(
    folder: Path, batch: BatchSettings, runtime: Runtime, *, workers: int | None = None, ray_replicas: int | None = None
) -> ServerSpec:
    """`python -m flashstep.server` (= `flashstep serve`) serving only `folder`, batching as `batch` says.

    workers: engine worker processes (None: the server's default; 0: inference in the HTTP process),
        each with `runtime.threads` torch threads. ray_replicas: serve on Ray Serve with that many
        engine replicas (a local cluster of as many CPUs as the machine has) instead.
    """
    port = free_port()
    argv = [
        sys.executable, "-m", "flashstep.server", "--host", "127.0.0.1", "--port", str(port),
        "--models-root", str(folder.parent), "--models", folder.name,
        "--max-batch-size", str(batch.max_batch_size), "--max-wait-ms", str(batch.max_wait_ms),
        "--device", runtime.device, "--dtype", runtime.dtype, "--log-level", "warning",
    ]  # fmt: skip
    if ray_replicas is not None:
        name = "flashstep-ray"
        argv += ["--ray", "--replicas", str(ray_replicas)]
        if runtime.threads:
            argv += ["--cpus-per-replica", str(runtime.threads)]
    elif workers == 0:
        name = "flashstep-in-process"
        argv += ["--workers", "0"]
    else:
        name = "flashstep-workers"
        argv += [] if workers is None else ["--workers", str(workers)]
        argv += ["--worker-threads", str(runtime.threads)] if runtime.threads else []
    return ServerSpec(name, argv, port, _flashstep_ready, "/readyz", env=_thread_env(runtime))


def _peer_argv(module: str, folder: Path, port: int, runtime: Runtime) -> list[str]:
    argv = [sys.executable, "-m", module, "--model-dir", str(folder), "--port", str(port)]
    argv += ["--device", runtime.device, "--dtype", runtime.dtype]
    return argv + (["--threads", str(runtime.threads)] if runtime.threads else [])


def fastapi_spec(folder: Path, runtime: Runtime) -> ServerSpec:
    """Peer (a): FastAPI calling the pipeline per request (bench/peers/fastapi_per_request.py)."""
    port = free_port()
    argv = _peer_argv("flashstep.bench.peers.fastapi_per_request", folder, port, runtime)
    return ServerSpec("fastapi-per-request", argv, port, lambda r: r.status_code == 200, "/health", env=_thread_env(runtime))


def litserve_spec(folder: Path, batch: BatchSettings, runtime: Runtime) -> ServerSpec:
    """Peer (b): LitServe batching like flashstep (bench/peers/litserve_peer.py)."""
    port = free_port()
    argv = _peer_argv("flashstep.bench.peers.litserve_peer", folder, port, runtime)
    argv += ["--max-batch-size", str(batch.max_batch_size), "--batch-timeout", str(batch.max_wait_ms / 1000)]
    return ServerSpec("litserve", argv, port, lambda r: r.status_code == 200, "/health", env=_thread_env(runtime))


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return self.spec.url

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _wait_ready(server: RunningServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{server.spec.name} exited with {server.process.returncode} before it was ready:\n{server.log_tail()}"
                )
            try:
                if server.spec.ready(client.get(server.spec.health_path)):
                    return
            except (httpx.TransportError, ValueError):
                pass  # not listening yet, or not JSON yet
            time.sleep(0.2)
    raise TimeoutError(f"{server.spec.name} was not ready within {timeout_s:.0f} s:\n{server.log_tail()}")


def _stop(server: RunningServer) -> None:
    process = server.process
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # the group this module started (start_new_session)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_GRACE_S)
    # LitServe's workers may outlive their parent by a moment; make sure the group is gone.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def start_server(spec: ServerSpec, log_dir: Path, start_timeout_s: float = START_TIMEOUT_S) -> Iterator[RunningServer]:
    """Run `spec` until the block ends; its output goes to <log_dir>/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    env = {**os.environ, **spec.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            spec.argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    server = RunningServer(spec, process, log_path)
    try:
        _wait_ready(server, start_timeout_s)
        yield server
    finally:
        _stop(server)
