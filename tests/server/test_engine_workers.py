"""Engine worker processes: inference outside the HTTP process, and nothing admitted is lost when one dies.

A real uvicorn server in the test process with two worker processes (`workers=2`, one torch
thread each) over the tiny random checkpoints; the engines are the registry's behind the fault
injector (tests/server/faults.py), which runs inside the workers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flashstep.bench.servers import free_port
from flashstep.server.app import create_app
from flashstep.server.settings import Settings
from tests.server.conftest import ADMIN_TOKEN, START_TIMEOUT_S, LiveServer, metric_value, wait_until
from tests.server.faults import INVALID, KILL, NAN, RAISE, faulty_registry_loader

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workers_server(models_root) -> Iterator[LiveServer]:
    settings = Settings(
        models_root=models_root,
        models=["swift", "teacher"],
        default_model="swift",
        workers=2,
        worker_threads=1,
        max_batch_size=8,
        max_wait_ms=20,
        request_timeout_s=60,
        admin_token=ADMIN_TOKEN,
    )
    server = LiveServer(create_app(settings, engine_loader=faulty_registry_loader)).start().wait_ready()
    yield server
    server.stop()


def _post_many(url: str, bodies: list[dict], path: str = "/generate") -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    return asyncio.run(run())


def _workers(url: str) -> list[dict]:
    return httpx.get(f"{url}/readyz", timeout=10).json()["workers"]


def _all_idle(url: str) -> bool:
    return all(w["state"] == "idle" for w in _workers(url))


def test_the_engines_run_in_other_processes_and_both_workers_serve(workers_server):
    pids = {w["pid"] for w in _workers(workers_server.url)}
    assert len(pids) == 2 and os.getpid() not in pids
    responses = _post_many(workers_server.url, [{"prompt": "a red circle", "seed": i} for i in range(32)])
    assert [r.status_code for r in responses] == [200] * 32
    assert all(r.content.startswith(PNG) for r in responses)
    served = Counter(r.headers["X-Flashstep-Worker"] for r in responses)
    assert set(served) == {"worker-0", "worker-1"}, served
    assert max(int(r.headers["X-Flashstep-Batch-Size"]) for r in responses) > 1  # still batched


def test_an_image_does_not_depend_on_the_worker_or_batch_that_made_it(workers_server):
    responses = _post_many(workers_server.url, [{"prompt": "a blue star", "seed": 7}] * 16)
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["X-Flashstep-Worker"] for r in responses}) == 2
    assert len({r.content for r in responses}) == 1


def test_images_are_encoded_in_the_worker_as_the_client_asked(workers_server):
    jpeg = httpx.post(
        f"{workers_server.url}/generate", json={"prompt": "a red circle", "output_format": "jpeg"}, timeout=60
    )
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert jpeg.content.startswith(b"\xff\xd8")


def test_the_openai_client_gets_images_and_bad_request_errors(workers_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{workers_server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a green triangle", model="swift", n=2, size="64x64", response_format="b64_json")
    assert len(result.data) == 2 and result.usage.input_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a green triangle", model="swift", extra_body={"steps": 3})
    assert refused.value.body["param"] == "steps"


def test_request_values_are_checked_in_the_http_process_with_the_models_tokenizer(workers_server):
    too_long = httpx.post(f"{workers_server.url}/generate", json={"prompt": "circle " * 200}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    assert metric_value(workers_server.url, "flashstep_batch_failures_total", model="swift") == 0


def test_faults_raised_in_a_worker_stay_with_their_request(workers_server):
    bodies = [{"prompt": f"a red circle {marker}", "seed": 1} for marker in (RAISE, NAN, INVALID)]
    bodies += [{"prompt": "a red circle", "seed": i} for i in range(5)]
    responses = _post_many(workers_server.url, bodies)
    assert [r.status_code for r in responses] == [500, 500, 400] + [200] * 5
    assert responses[0].json()["error"]["code"] == "engine_error"
    assert responses[1].json()["error"]["code"] == "non_finite_output"
    assert responses[2].json()["error"]["param"] == "prompt"


def test_a_worker_killed_mid_load_loses_no_admitted_request(workers_server):
    url = workers_server.url
    victim = _workers(url)[0]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            tasks = [asyncio.create_task(client.post("/generate", json={"prompt": "a star", "seed": i})) for i in range(64)]

            def busy() -> bool:
                return any(w["state"] == "busy" and w["pid"] == victim["pid"] for w in _workers(url))

            await asyncio.to_thread(wait_until, busy, message="the victim never ran a batch")
            os.kill(victim["pid"], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(run())
    assert Counter(r.status_code for r in responses) == Counter({200: 64})
    # The dead worker is replaced, loads both models again, and serves.
    wait_until(lambda: _all_idle(url) and _workers(url)[0]["restarts"] == 1, timeout=START_TIMEOUT_S,
               message="the killed worker was never replaced")  # fmt: skip
    assert _workers(url)[0]["pid"] != victim["pid"]
    assert metric_value(url, "flashstep_worker_process_restarts_total", worker="worker-0") == 1
    after = _post_many(url, [{"prompt": "a star", "seed": i, "model": "teacher"} for i in range(16)])
    assert {r.status_code for r in after} == {200}
    assert {r.headers["X-Flashstep-Worker"] for r in after} == {"worker-0", "worker-1"}


def test_a_request_that_kills_its_worker_is_answered_503_and_the_server_recovers(workers_server):
    url = workers_server.url
    before = sum(w["restarts"] for w in _workers(url))
    killed = httpx.post(f"{url}/generate", json={"prompt": f"a star {KILL}"}, timeout=120)
    assert killed.status_code == 503 and killed.json()["error"]["code"] in ("worker_lost", "no_worker")
    assert "Retry-After" in killed.headers
    wait_until(lambda: _all_idle(url) and sum(w["restarts"] for w in _workers(url)) >= before + 1,
               timeout=START_TIMEOUT_S, message="no worker was replaced")  # fmt: skip
    assert httpx.post(f"{url}/generate", json={"prompt": "a star"}, timeout=60).status_code == 200


def test_a_hot_swap_under_load_drops_nothing(workers_server):
    url = workers_server.url
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    old_version = httpx.post(f"{url}/generate", json={"prompt": "x", "model": "teacher"}, timeout=60).headers[
        "X-Flashstep-Model-Version"
    ]

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            bodies = [{"prompt": "a circle", "seed": i, "model": "teacher"} for i in range(48)]
            tasks = [asyncio.create_task(client.post("/generate", json=body)) for body in bodies]
            swap = await client.post("/admin/models/teacher/swap", json={"path": "teacher-v2"}, headers=headers)
            return swap, await asyncio.gather(*tasks)

    swap, responses = asyncio.run(run())
    assert swap.status_code == 200, swap.text
    assert Counter(r.status_code for r in responses) == Counter({200: 48})
    new = httpx.post(f"{url}/generate", json={"prompt": "x", "model": "teacher"}, timeout=60)
    assert new.headers["X-Flashstep-Model-Version"] != old_version
    assert new.headers["X-Flashstep-Model-Version"] == swap.json()["new_version"]


def test_metrics_count_the_workers_and_their_memory(workers_server):
    url = workers_server.url
    assert metric_value(url, "flashstep_worker_processes_serving") == 2
    for name in ("worker-0", "worker-1"):
        assert metric_value(url, "flashstep_worker_resident_memory_bytes", worker=name) > 50 * 2**20


def test_sigterm_drains_through_the_workers_and_leaves_no_process_behind(models_root, tmp_path):
    """`flashstep serve` as users run it: admitted requests finish, then the workers exit with it."""
    port = free_port()
    argv = [sys.executable, "-m", "flashstep.server", "--port", str(port), "--models-root", str(models_root),
            "--models", "swift", "--workers", "2", "--worker-threads", "1", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "FLASHSTEP_WORKERS": "2"}
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError((tmp_path / "server.log").read_text()[-2000:])
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=START_TIMEOUT_S, message="the server never got ready")
        worker_pids = [w["pid"] for w in _workers(url)]

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.create_task(client.post("/generate", json={"prompt": "a", "seed": i})) for i in range(24)]
                await asyncio.to_thread(
                    wait_until, lambda: httpx.get(f"{url}/readyz", timeout=5).json()["queue_depth"] > 0 or
                    any(w["state"] == "busy" for w in _workers(url)), message="nothing was in flight",
                )  # fmt: skip
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        responses = asyncio.run(run())
        assert process.wait(timeout=60) in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
        statuses = Counter(getattr(r, "status_code", type(r).__name__) for r in responses)
        # Admitted before the signal: 200. Arrived after it: refused cleanly with 503. Nothing dropped.
        assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
        for pid in worker_pids:
            wait_until(lambda pid=pid: not _alive(pid), message=f"worker {pid} outlived the server")
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited: only its exit status is left
        return stat.read().split()[2] != "Z"
