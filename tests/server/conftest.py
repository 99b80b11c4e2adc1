"""Fixtures of the server tests: tiny random checkpoints and real uvicorn servers on 127.0.0.1.

Servers run in a thread of the test process (port 0: the OS picks a free one), so tests can
reach into `app.state` to slow down or break an engine on purpose. For that their engines run in
the test process too (FLASHSTEP_WORKERS=0, set for every test here); test_engine_workers.py
asks for worker processes explicitly. Every wait is bounded:
tests wait on events, or poll a condition with `wait_until`, never for a fixed time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import uvicorn

from flashstep.server.app import create_app
from flashstep.server.settings import Settings

ADMIN_TOKEN = "test-admin-token"
START_TIMEOUT_S = 120
WAIT_S = 10  # how long a condition that should hold within milliseconds may take on a loaded CI box
POLL_S = 0.01

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, message: str, timeout: float = WAIT_S) -> T:
    """Poll `predicate` until it returns something truthy and return that.

    Raises TimeoutError carrying `message` (what never happened) once `timeout` seconds pass; an
    exception from `predicate` propagates at once, so a predicate can fail fast on a dead process.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} (waited {timeout:g} s)")
        time.sleep(POLL_S)
    return value


def _teacher_config():
    from flashstep.models.flashstep_config import FlashstepConfig

    return FlashstepConfig(
        family="teacher", default_steps=2, allowed_steps=(1, 2, 4), default_guidance_scale=3.0, resolution=64
    )


def _swiftbrush_config():
    from flashstep.models.flashstep_config import FlashstepConfig

    return FlashstepConfig(family="swiftbrush", default_steps=1, allowed_steps=(1,), resolution=64)


@pytest.fixture(scope="session", autouse=True)
def engines_in_process() -> Iterator[None]:
    """Settings built by these tests default to in-process engines (explicit `workers=` still wins)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLASHSTEP_WORKERS", "0")
        yield


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    """teacher (seed 0), teacher-v2 (seed 1: another version of it) and swift (one step)."""
    from flashstep.training.architecture import ShapesArch
    from flashstep.training.export import export_random

    root = tmp_path_factory.mktemp("models")
    export_random(root / "teacher", _teacher_config(), arch=ShapesArch.tiny(), seed=0)
    export_random(root / "teacher-v2", _teacher_config(), arch=ShapesArch.tiny(), seed=1)
    export_random(root / "swift", _swiftbrush_config(), arch=ShapesArch.tiny(), seed=2)
    return root


@pytest.fixture(scope="session")
def outside_model(tmp_path_factory) -> Path:
    """A valid checkpoint outside the models root: loading it must be refused."""
    from flashstep.training.architecture import ShapesArch
    from flashstep.training.export import export_random

    return export_random(tmp_path_factory.mktemp("outside") / "intruder", _swiftbrush_config(), arch=ShapesArch.tiny())


class LiveServer:
    """A uvicorn server running `app` in a background thread on an ephemeral loopback port."""

    def __init__(self, app):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.url = ""

    def start(self) -> LiveServer:
        self.thread.start()

        def started() -> bool:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited before it started")
            return self.server.started

        wait_until(started, timeout=START_TIMEOUT_S, message="uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> LiveServer:
        with httpx.Client(base_url=self.url, timeout=5) as client:

            def ready() -> bool:
                body = client.get("/readyz").json()
                if body["status"] == "failed":
                    raise RuntimeError(f"server failed to load models: {body.get('error')}")
                return body["status"] == "ready"

            wait_until(ready, timeout=timeout_s, message="the server never reported ready")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def engine(self, name: str):
        return self.app.state.manager.get(name).engine


@pytest.fixture(scope="session")
def live_server(models_root) -> Iterator[LiveServer]:
    """The shared server: teacher (default) and swift, admin enabled, batches of up to 8."""
    settings = Settings(
        models_root=models_root,
        models=["teacher", "swift"],
        default_model="teacher",
        max_batch_size=8,
        max_wait_ms=50,
        queue_limit=256,
        request_timeout_s=60,
        admin_token=ADMIN_TOKEN,
    )
    server = LiveServer(create_app(settings)).start().wait_ready()
    yield server
    server.stop()


@pytest.fixture
def client(live_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=60) as c:
        yield c


@pytest.fixture
def admin_client(live_server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=live_server.url, timeout=120, headers=headers) as c:
        yield c


@pytest.fixture(scope="session")
def overload_server(models_root) -> Iterator[LiveServer]:
    """A server with a tiny queue (4 images), batches of 2, a 2 s request timeout, no admin token."""
    settings = Settings(
        models_root=models_root,
        models=["swift"],
        max_batch_size=2,
        max_wait_ms=0,
        queue_limit=4,
        request_timeout_s=2,
    )
    server = LiveServer(create_app(settings)).start().wait_ready()
    yield server
    server.stop()


def metric_value(url: str, name: str, **labels: str) -> float:
    """The value of one sample on the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
