"""End-to-end specs of backpressure and failure isolation: 429, timeouts, clients that leave, readiness."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from flashstep.server.app import create_app
from flashstep.server.settings import Settings
from tests.server.conftest import WAIT_S, LiveServer, metric_value, wait_until
from tests.server.fakes import FakeLoader

GATE_TIMEOUT_S = 30


@dataclass
class Held:
    """Batches of an engine held at `gate`: `entered` once one is inside, `left` once one finished."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    left: threading.Event = field(default_factory=threading.Event)


@contextmanager
def held(engine) -> Iterator[Held]:
    """Hold every batch of `engine` inside generate until the test sets `gate` (opened on exit)."""
    original = engine.generate
    state = Held()

    def hold(requests):
        state.entered.set()
        try:
            if not state.gate.wait(timeout=GATE_TIMEOUT_S):
                raise RuntimeError("the test never opened the gate")
            return original(requests)
        finally:
            state.left.set()

    engine.generate = hold
    try:
        yield state
    finally:
        state.gate.set()
        del engine.generate


async def _burst_until_refused(url: str, n: int, gate: threading.Event) -> list[httpx.Response]:
    """Send `n` requests at once; open `gate` as soon as one of them is refused with 429."""
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        tasks = [
            asyncio.create_task(client.post("/generate", json={"prompt": "a cyan square", "seed": i}))
            for i in range(n)
        ]
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.result().status_code == 429 for t in done):
                    break
        finally:
            gate.set()  # the held batch and the queue behind it may now run
        return list(await asyncio.gather(*tasks))


def assert_healthy(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.post("/generate", json={"prompt": "a circle", "seed": 1}).status_code == 200
        assert client.get("/readyz").json()["queue_depth"] == 0


def test_a_burst_past_the_queue_limit_gets_429_with_retry_after(overload_server):
    # The engine is held while the burst arrives, so the 4-image queue is full for certain.
    with held(overload_server.engine("swift")) as engine:
        responses = asyncio.run(_burst_until_refused(overload_server.url, 30, engine.gate))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= 4, statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
    assert_healthy(overload_server.url)


@pytest.mark.slow
def test_a_request_past_its_timeout_gets_504_and_nothing_breaks(overload_server):
    with held(overload_server.engine("swift")) as engine:
        response = httpx.post(f"{overload_server.url}/generate", json={"prompt": "a star"}, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout_error"
        # The 504 came while the engine still held the batch: the server did not wait for it.
        assert engine.entered.is_set() and not engine.left.is_set()
        engine.gate.set()
        assert engine.left.wait(WAIT_S)
    assert_healthy(overload_server.url)


def test_a_client_that_leaves_is_dropped_from_the_queue(overload_server):
    url = overload_server.url
    images_before = metric_value(url, "flashstep_images_generated_total", model="swift")

    def client_gone_answers() -> float:
        return metric_value(url, "flashstep_http_requests_total", route="/generate", method="POST", status="499")

    gone_before = client_gone_answers()
    with held(overload_server.engine("swift")) as engine:
        for _ in range(3):  # the first runs at once; the other two leave while queued behind it
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/generate", json={"prompt": "a star"}, timeout=0.05)
        # The server noticed all three clients leave while the first batch was still held.
        wait_until(lambda: client_gone_answers() - gone_before >= 3, message="the server never noticed the clients leave")
        engine.gate.set()
        assert engine.left.wait(WAIT_S), "the running batch never finished"
        wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=5).json()["queue_depth"] == 0,
            message="the abandoned requests were never taken off the queue",
        )
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
            wait_until(lambda: client.get("/readyz").json()["status"] == "failed", message="/readyz never said failed")
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
