"""End-to-end specs of fault isolation: one bad request fails alone, over HTTP, on fake and real engines.

Each test queues several requests into one batch (the engine is held at a gate by a first
request meanwhile), marks one of them with a fault (tests/server/faults.py), and checks that only
that request fails, with the status its fault means, while its batch-mates get their images.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest

from flashstep.server.app import create_app
from flashstep.server.model_manager import registry_loader
from flashstep.server.settings import Settings
from tests.server.conftest import ADMIN_TOKEN, LiveServer, metric_value, wait_until
from tests.server.fakes import FakeLoader
from tests.server.faults import NAN, OOM, RAISE, FaultInjectingLoader

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _settings(**overrides) -> Settings:
    options = dict(
        max_batch_size=8, max_wait_ms=50, queue_limit=64, request_timeout_s=60, admin_token=ADMIN_TOKEN, warmup=False
    )
    return Settings(**{**options, **overrides})


@pytest.fixture(scope="module")
def fake_server() -> Iterator[LiveServer]:
    """Fake engines behind the fault injector: `fake` (default) for faults, others loaded by tests."""
    server = LiveServer(create_app(_settings(models=["fake"]), engine_loader=FaultInjectingLoader(FakeLoader())))
    server.start().wait_ready()
    yield server
    server.stop()


def run_as_one_batch(server: LiveServer, model: str, bodies: list[dict], *, during=None) -> list[httpx.Response]:
    """Post `bodies` so that they queue behind a held request and then run as one batch.

    `during()` runs while they wait in the queue (e.g. an admin action).
    """
    engine = server.engine(model)
    batcher = server.app.state.batcher
    engine.gate = threading.Event()
    engine.entered.clear()

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            holder = asyncio.create_task(client.post("/generate", json={"prompt": "holder", "seed": 99, "model": model}))
            assert await asyncio.to_thread(engine.entered.wait, 10), "the holding request never reached the engine"
            posts = [asyncio.create_task(client.post("/generate", json={**body, "model": model})) for body in bodies]
            await asyncio.to_thread(
                wait_until, lambda: batcher.depth >= len(bodies), message="the requests never queued"
            )
            if during is not None:
                await asyncio.to_thread(during)
            engine.gate.set()
            assert (await holder).status_code == 200
            return list(await asyncio.gather(*posts))

    try:
        return asyncio.run(go())
    finally:
        engine.gate.set()
        engine.gate = None


def bodies_with(marker: str, n: int = 4, bad: int = 1) -> list[dict]:
    return [{"prompt": f"shape {i} {marker if i == bad else ''}".strip(), "seed": i} for i in range(n)]


def assert_only_the_bad_one_failed(responses: list[httpx.Response], bad: int = 1) -> dict:
    for i, response in enumerate(responses):
        if i != bad:
            assert response.status_code == 200, (i, response.text)
            assert response.headers["content-type"] == "image/png"
    return responses[bad].json()["error"]


def test_a_request_that_makes_the_engine_raise_fails_alone(fake_server):
    failures_before = metric_value(fake_server.url, "flashstep_batch_failures_total", model="fake")
    engine = fake_server.engine("fake")
    calls_before = len(engine.calls)
    responses = run_as_one_batch(fake_server, "fake", bodies_with(RAISE))
    assert responses[1].status_code == 500
    error = assert_only_the_bad_one_failed(responses)
    assert error["code"] == "engine_error" and "Traceback" not in error["message"]
    assert engine.calls[calls_before:][:2] == [1, 4]  # the holder, then the four in one batch
    assert metric_value(fake_server.url, "flashstep_batch_failures_total", model="fake") > failures_before


def test_a_request_error_found_late_is_that_requests_4xx_only(fake_server):
    responses = run_as_one_batch(fake_server, "fake", bodies_with("[[invalid]]"))
    assert 400 <= responses[1].status_code < 500
    error = assert_only_the_bad_one_failed(responses)
    assert error["param"] == "prompt"


def test_out_of_memory_alone_is_a_503_with_retry_after_and_frees_the_cache(fake_server, monkeypatch):
    freed = []
    monkeypatch.setattr("flashstep.server.fault_isolation.empty_device_cache", lambda: freed.append(1))
    oom_before = metric_value(fake_server.url, "flashstep_out_of_memory_total", model="fake")
    responses = run_as_one_batch(fake_server, "fake", bodies_with(OOM))
    assert responses[1].status_code == 503 and int(responses[1].headers["Retry-After"]) >= 1
    error = assert_only_the_bad_one_failed(responses)
    assert error["code"] == "out_of_memory"
    assert freed, "the device cache was not emptied after an out-of-memory error"
    assert metric_value(fake_server.url, "flashstep_out_of_memory_total", model="fake") > oom_before


def test_a_batch_too_big_for_memory_is_split_until_it_fits(fake_server):
    engine = fake_server.engine("fake")
    engine.oom_above = 2
    try:
        calls_before = len(engine.calls)
        responses = run_as_one_batch(fake_server, "fake", bodies_with("", n=4, bad=-1))
    finally:
        engine.oom_above = None
    assert [r.status_code for r in responses] == [200] * 4
    assert engine.calls[calls_before:] == [1, 4, 2, 2]


def test_a_non_finite_image_is_an_error_never_a_black_png(fake_server):
    before = metric_value(fake_server.url, "flashstep_non_finite_outputs_total", model="fake")
    engine = fake_server.engine("fake")
    calls_before = len(engine.calls)
    responses = run_as_one_batch(fake_server, "fake", bodies_with(NAN))
    assert responses[1].status_code == 500
    error = assert_only_the_bad_one_failed(responses)
    assert error["code"] == "non_finite_output" and "NaN" in error["message"]
    assert engine.calls[calls_before:] == [1, 4]  # the good images came from the same call: no rerun
    assert metric_value(fake_server.url, "flashstep_non_finite_outputs_total", model="fake") == before + 1


def test_unloading_a_model_finishes_the_requests_it_admitted(fake_server):
    with httpx.Client(base_url=fake_server.url, headers=ADMIN, timeout=30) as admin:
        assert admin.post("/admin/models", json={"path": "leaving", "name": "leaving"}).status_code == 201
        engine = fake_server.engine("leaving")
        refused = []

        def unload() -> None:
            assert admin.delete("/admin/models/leaving").status_code == 200
            refused.append(admin.post("/generate", json={"prompt": "too late", "model": "leaving"}))

        responses = run_as_one_batch(fake_server, "leaving", bodies_with("", n=3, bad=-1), during=unload)
    assert [r.status_code for r in responses] == [200] * 3
    assert refused[0].status_code == 404
    wait_until(lambda: engine.inner.closed, message="the unloaded engine was never closed")


def test_with_no_model_loaded_readyz_and_generation_are_503():
    server = LiveServer(create_app(_settings(models=["only"]), engine_loader=FakeLoader())).start().wait_ready()
    try:
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as client:
            assert client.delete("/admin/models/only").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            refused = client.post("/generate", json={"prompt": "x"})
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert client.post("/admin/models", json={"path": "only"}).status_code == 201
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_a_dead_device_worker_is_restarted_and_counted():
    server = LiveServer(create_app(_settings(models=["m"]), engine_loader=FakeLoader())).start().wait_ready()
    batcher = server.app.state.batcher
    batcher.worker_restart_delay_s = 3600  # restarted by the next request, not by the timer
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.post("/generate", json={"prompt": "x", "seed": 1}).status_code == 200
            (worker,) = batcher._workers.values()

            def broken():
                raise RuntimeError("injected bug while taking work")

            worker._next_batch = broken  # the running loop calls it after its current batch
            assert client.post("/generate", json={"prompt": "x", "seed": 2}).status_code == 200
            wait_until(lambda: client.get("/readyz").status_code == 503, message="/readyz never saw the dead worker")
            assert "device workers died" in client.get("/readyz").json()["error"]
            del worker._next_batch
            assert client.post("/generate", json={"prompt": "x", "seed": 3}).status_code == 200
            assert metric_value(server.url, "flashstep_worker_restarts_total", device="cpu") == 1
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("marker", "status", "code"), [(RAISE, 500, "engine_error"), (OOM, 503, "out_of_memory"),
                                                          (NAN, 500, "non_finite_output")])  # fmt: skip
def test_a_real_engine_isolates_each_fault(models_root, marker, status, code):
    loader = FaultInjectingLoader(registry_loader)
    settings = _settings(models_root=models_root, models=["swift"], warmup=True)
    server = LiveServer(create_app(settings, engine_loader=loader)).start().wait_ready()
    try:
        responses = run_as_one_batch(server, "swift", bodies_with(marker, n=3))
        assert responses[1].status_code == status
        assert assert_only_the_bad_one_failed(responses)["code"] == code
        with httpx.Client(base_url=server.url, timeout=60) as client:
            alone = client.post("/generate", json={"prompt": "shape 2", "seed": 2, "model": "swift"})
        assert alone.content == responses[2].content  # a batch-mate's image is the one it gets alone
    finally:
        server.stop()
