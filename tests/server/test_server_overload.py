"""End-to-end specs of backpressure and failure isolation: 429, timeouts, clients that leave, readiness."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from contextlib import contextmanager

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import LiveServer, metric_value
from tests.server.fakes import FakeLoader


@contextmanager
def slowed(engine, seconds: float = 0.0, gate: threading.Event | None = None):
    """Make every batch of `engine` take `seconds` longer (or wait for `gate`)."""
    original = engine.generate

    def slow(requests):
        if gate is not None:
            gate.wait(timeout=30)
        time.sleep(seconds)
        return original(requests)

    engine.generate = slow
    try:
        yield
    finally:
        del engine.generate


async def _burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        bodies = [{"prompt": "a cyan square", "seed": i} for i in range(n)]
        return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))


def assert_healthy(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.post("/generate", json={"prompt": "a circle", "seed": 1}).status_code == 200
        assert client.get("/readyz").json()["queue_depth"] == 0


def test_a_burst_past_the_queue_limit_gets_429_with_retry_after(overload_server):
    with slowed(overload_server.engine("swift"), seconds=0.1):
        responses = asyncio.run(_burst(overload_server.url, 30))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= 4, statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
    assert_healthy(overload_server.url)


def test_a_request_past_its_timeout_gets_504_and_nothing_breaks(overload_server):
    gate = threading.Event()
    with slowed(overload_server.engine("swift"), gate=gate):
        started = time.monotonic()
        response = httpx.post(f"{overload_server.url}/generate", json={"prompt": "a star"}, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        assert time.monotonic() - started < 10
        gate.set()
    assert_healthy(overload_server.url)


def test_a_client_that_leaves_is_dropped_from_the_queue(overload_server):
    url = overload_server.url
    images_before = metric_value(url, "flashstep_images_generated_total", model="swift")
    with slowed(overload_server.engine("swift"), seconds=1.0):
        for _ in range(3):  # the first runs at once; the other two leave while queued behind it
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/generate", json={"prompt": "a star"}, timeout=0.05)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/readyz", timeout=5).json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.2)  # let the running batch finish
    assert metric_value(url, "flashstep_images_generated_total", model="swift") - images_before <= 2
    assert_healthy(url)


def test_readyz_is_503_until_models_are_loaded_and_warm():
    loader = FakeLoader()
    loader.release = threading.Event()
    server = LiveServer(create_app(Settings(models=["slow"]), engine_loader=loader)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
            not_ready = client.get("/readyz")
            assert not_ready.status_code == 503 and not_ready.json()["status"] == "loading"
            refused = client.post("/generate", json={"prompt": "x"})
            assert refused.status_code == 503 and "Retry-After" in refused.headers
            loader.release.set()
            server.wait_ready(timeout_s=10)
            assert loader.loaded[0].warmed
            assert client.post("/generate", json={"prompt": "x"}).status_code == 200
    finally:
        loader.release.set()
        server.stop()


def test_readyz_reports_a_failed_start():
    def broken_loader(name_or_path, **kwargs):
        raise RuntimeError("disk on fire")

    server = LiveServer(create_app(Settings(models=["broken"]), engine_loader=broken_loader)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            deadline = time.monotonic() + 10
            while client.get("/readyz").json()["status"] != "failed" and time.monotonic() < deadline:
                time.sleep(0.02)
            failed = client.get("/readyz")
            assert failed.status_code == 503 and "disk on fire" in failed.json()["error"]
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_once_shutting_down_new_work_gets_503():
    server = LiveServer(create_app(Settings(models=["m"]), engine_loader=FakeLoader())).start().wait_ready(10)
    try:
        server.app.state.lifecycle.begin_shutdown()  # what the SIGTERM handler does (server/serve.py)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            refused = client.post("/generate", json={"prompt": "x"})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            assert client.get("/readyz").json()["status"] == "shutting_down"
            assert client.get("/healthz").status_code == 200
    finally:
        server.stop()
