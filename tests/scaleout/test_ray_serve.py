"""Specs of flashstep on Ray Serve, end to end: a real local Ray cluster, HTTP through Serve's proxy.

One cluster for the module (4 logical CPUs on 127.0.0.1, no dashboard): the `flashstep`
application (ingress + admin) and `flashstep-model-teacher` with two CPU engine replicas of a
tiny random checkpoint. The same routes, clients and error bodies as the one-process server;
what Ray adds is checked here: images from both replicas, batches that never mix batch keys,
a hot swap and a killed replica that lose no request. Every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402

from flashstep.server.ray_config import ENGINE_DEPLOYMENT, model_app_name  # noqa: E402
from flashstep.server.ray_serve import deploy  # noqa: E402
from flashstep.server.settings import Settings  # noqa: E402
from tests.scaleout.waiting import WAIT_S, wait_until  # noqa: E402

ADMIN_TOKEN = "scaleout-admin-token"
MODEL = "teacher"
REPLICAS = 2


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """teacher (seed 0) and teacher-v2 (seed 1: other weights, so another version), 64 px, steps 1, 2 or 4."""
    from flashstep.models.flashstep_config import FlashstepConfig
    from flashstep.training.architecture import ShapesArch
    from flashstep.training.export import export_random

    config = FlashstepConfig(
        family="teacher", default_steps=2, allowed_steps=(1, 2, 4), default_guidance_scale=3.0, resolution=64
    )
    root = tmp_path_factory.mktemp("models")
    export_random(root / "teacher", config, arch=ShapesArch.tiny(), seed=0)
    export_random(root / "teacher-v2", config, arch=ShapesArch.tiny(), seed=1)
    return root


@pytest.fixture(scope="module")
def base_url(models_root, tmp_path_factory) -> Iterator[str]:
    """flashstep deployed on a fresh local cluster; Serve and Ray are shut down afterwards."""
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            models_root=models_root,
            models=[MODEL],
            default_model=MODEL,
            ray=True,
            ray_replicas=REPLICAS,
            ray_cpus_per_replica=1,
            max_batch_size=8,
            max_wait_ms=100,  # long enough that concurrent requests share batches on a slow CI box
            request_timeout_s=60,
            admin_token=ADMIN_TOKEN,
            image_store_dir=tmp_path_factory.mktemp("images"),
        )
        url = deploy(settings)
        with httpx.Client(base_url=url, timeout=10) as client:
            wait_until(lambda: client.get("/readyz").status_code == 200, message="/readyz never answered 200")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


@pytest.fixture
def admin_client(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=base_url, timeout=300, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as c:
        yield c


def generate(client: httpx.Client, seed: int, **options) -> httpx.Response:
    return client.post("/generate", json={"prompt": "a red circle", "seed": seed, "steps": 1, **options})


def concurrently(n: int, call: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(call, range(n)))


@dataclass
class Load:
    """Clients sending requests in a loop until stopped; every answer kept (status, headers)."""

    base_url: str
    threads: int = 6
    answers: list[httpx.Response] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        self._workers = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        return self

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            seed = index * 100_000
            while not self._stop.is_set():
                seed += 1
                try:
                    answer = generate(client, seed)
                except httpx.HTTPError as exc:  # a lost request: no answer at all
                    with self._lock:
                        self.failures.append(exc)
                    continue
                with self._lock:
                    self.answers.append(answer)

    def count(self) -> int:
        with self._lock:
            return len(self.answers) + len(self.failures)

    def wait_for(self, more: int, message: str) -> None:
        target = self.count() + more
        wait_until(lambda: self.count() >= target, message=message)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=WAIT_S)
        assert not any(worker.is_alive() for worker in self._workers), "a load thread is stuck"


# ----- the same API as the one-process server -----


def test_probes_and_model_list_describe_the_engine_replicas(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["models"] == [MODEL]
    assert client.get("/healthz").json() == {"status": "ok"}
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["family"] == "teacher" and card["default"] is True
    assert card["allowed_steps"] == [1, 2, 4] and card["sizes"] == ["64x64"]
    assert card["version"].startswith(f"{MODEL}@")
    assert "flashstep_http_requests_total" in client.get("/metrics").text


def test_the_openai_client_gets_images_and_a_bad_request_names_the_field(base_url):
    import openai

    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    result = oai.images.generate(
        prompt="a red circle",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "steps": 1},
    )
    assert len(result.data) == 2 and result.usage.input_tokens > 0
    for item in result.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as image:
            assert image.format == "PNG" and image.size == (64, 64)

    with pytest.raises(openai.BadRequestError) as steps_error:
        oai.images.generate(prompt="a red circle", extra_body={"steps": 3})
    error = steps_error.value.body
    assert (error["param"], error["type"], error["code"]) == (
        "steps",
        "invalid_request_error",
        "invalid_value",
    )
    assert "[1, 2, 4]" in error["message"] and error["request_id"]

    with pytest.raises(openai.BadRequestError) as size_error:  # checked on the replica, against its engine
        oai.images.generate(prompt="a red circle", size="1024x1024")
    assert size_error.value.body["param"] == "size" and "64x64" in size_error.value.body["message"]


def test_32_concurrent_requests_are_all_served_and_by_both_replicas(client):
    answers = concurrently(32, lambda i: generate(client, seed=1000 + i))
    assert [a.status_code for a in answers] == [200] * 32
    assert all(a.headers["content-type"] == "image/png" for a in answers)
    workers = {a.headers["X-Flashstep-Worker"] for a in answers}
    assert len(workers) == REPLICAS, workers
    assert all(w.startswith(f"{model_app_name(MODEL)}#{ENGINE_DEPLOYMENT}#") for w in workers)


def engine_calls_per_replica() -> dict[str, tuple[int, int]]:
    """replica -> (engine.generate calls, calls that raised), asking the deployment until both replicas answered."""
    engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model_app_name(MODEL))
    seen: dict[str, tuple[int, int]] = {}

    def both_replicas_answered() -> bool:
        described = engine.describe.remote().result(timeout_s=WAIT_S)
        seen[described.served_by] = (described.engine_calls, described.failed_engine_calls)
        return len(seen) == REPLICAS

    wait_until(both_replicas_answered, message="describe() never reached both replicas")
    return seen


def test_requests_with_different_batch_keys_never_share_an_engine_call(client):
    # One 4-step request among twelve 1-step ones, all at once: Serve gathers them into the same
    # @serve.batch calls, and the replica must split them so the engine never gets both kinds --
    # Engine.generate refuses mixed batch keys, so a mixed call would be counted as failed.
    before = engine_calls_per_replica()

    def send(i: int) -> httpx.Response:
        return generate(client, seed=2000 + i, steps=4 if i == 0 else 1)

    answers = concurrently(13, send)
    assert [a.status_code for a in answers] == [200] * 13
    assert answers[0].headers["X-Flashstep-Unet-Evals"] == "8"  # 4 steps with CFG: it did run 4 steps
    assert answers[0].headers["X-Flashstep-Batch-Size"] == "1"
    one_step_batches = [int(a.headers["X-Flashstep-Batch-Size"]) for a in answers[1:]]
    assert max(one_step_batches) > 1, "no batching happened, so nothing was tested"
    after = engine_calls_per_replica()
    assert {replica: calls[1] for replica, calls in after.items()} == {r: c[1] for r, c in before.items()}
    assert sum(calls[0] for calls in after.values()) > sum(calls[0] for calls in before.values())


def test_url_images_are_fetched_from_the_shared_store(client):
    answer = client.post(
        "/v1/images/generations", json={"prompt": "a blue square", "response_format": "url", "seed": 3}
    )
    assert answer.status_code == 200
    url = answer.json()["data"][0]["url"]
    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"


def test_admin_routes_refuse_without_the_bearer_token(client, admin_client):
    for method, path, body in [
        ("GET", "/admin/models", None),
        ("POST", "/admin/models", {"path": "teacher-v2", "name": "other"}),
        ("POST", f"/admin/models/{MODEL}/swap", {"path": "teacher-v2"}),
        ("DELETE", f"/admin/models/{MODEL}", None),
    ]:
        refused = client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401, (method, path)
        assert refused.json()["error"]["type"] == "authentication_error"
    listed = admin_client.get("/admin/models").json()
    assert listed["default"] == MODEL and [m["name"] for m in listed["models"]] == [MODEL]
    assert client.get("/readyz").json()["models"] == [MODEL]  # nothing was unloaded


def test_admin_refuses_a_path_outside_the_models_root_and_an_unknown_model(admin_client, tmp_path):
    outside = admin_client.post(f"/admin/models/{MODEL}/swap", json={"path": str(tmp_path / "elsewhere")})
    assert outside.status_code == 403 and outside.json()["error"]["param"] == "path"
    unknown = admin_client.post("/admin/models/nobody/swap", json={"path": "teacher-v2"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_serve_backpressure_answers_429_with_retry_after_and_unload_takes_a_model_out(
    models_root, client, admin_client
):
    from flashstep.server.ray_config import model_app_config, with_app
    from flashstep.server.ray_control import apply, controller_client, running_config, wait_running

    # A second model with a queue of one image per caller and batches of one: Serve's
    # max_queued_requests is then reached by a handful of concurrent requests.
    tight = Settings(models_root=models_root, queue_limit=1, max_batch_size=1, ray_cpus_per_replica=0.5)
    app = model_app_config(tight, "tight", MODEL)
    serve_client = controller_client()
    apply(serve_client, with_app(running_config(serve_client), app))
    wait_running([app["name"]], WAIT_S)
    wait_until(
        lambda: "tight" in client.get("/readyz").json()["models"], message="the ingress never saw `tight`"
    )

    answers = concurrently(12, lambda i: generate(client, seed=3000 + i, model="tight"))
    refused = [a for a in answers if a.status_code == 429]
    assert refused, "the queue limit was never reached"
    assert all(a.status_code in (200, 429) for a in answers)
    for answer in refused:
        error = answer.json()["error"]
        assert error["type"] == "rate_limit_error" and "max_queued_requests" in error["message"]
        assert int(answer.headers["Retry-After"]) >= 1

    unloaded = admin_client.delete("/admin/models/tight")
    assert unloaded.status_code == 200 and unloaded.json() == {
        "name": "tight",
        "unloaded": True,
        "default": MODEL,
    }
    assert client.get("/readyz").json()["models"] == [MODEL]
    gone = generate(client, seed=1, model="tight")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


# ----- what Ray adds: hot swap and replica failure without a lost request -----


def test_a_hot_swap_under_load_loses_no_request_and_changes_the_version(base_url, client, admin_client):
    old_version = generate(client, seed=1).headers["X-Flashstep-Model-Version"]
    with Load(base_url) as load:
        load.wait_for(12, "requests did not flow before the swap")
        swapped = admin_client.post(f"/admin/models/{MODEL}/swap", json={"path": "teacher-v2"})
        load.wait_for(12, "requests did not flow after the swap")
    assert swapped.status_code == 200, swapped.text
    body = swapped.json()
    assert body["old_version"] == old_version and body["new_version"] != old_version
    assert load.failures == []
    assert [a.status_code for a in load.answers] == [200] * len(load.answers)
    assert {a.headers["X-Flashstep-Model-Version"] for a in load.answers} <= {
        old_version,
        body["new_version"],
    }
    after = generate(client, seed=1)
    assert after.headers["X-Flashstep-Model-Version"] == body["new_version"]
    # Put the original weights back, for the tests after this one.
    restored = admin_client.post(f"/admin/models/{MODEL}/swap", json={"path": MODEL})
    assert restored.status_code == 200 and restored.json()["new_version"] == old_version


def test_a_replica_killed_under_load_loses_no_admitted_request(base_url):
    prefix = f"SERVE_REPLICA::{model_app_name(MODEL)}#{ENGINE_DEPLOYMENT}#"

    def replicas() -> list[str]:
        return sorted(
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
        )

    before = replicas()
    assert len(before) == REPLICAS
    with Load(base_url, threads=8) as load:
        load.wait_for(16, "requests did not flow before the kill")
        victim = before[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = load.count()
        load.wait_for(24, "requests did not flow after the kill")
    assert load.failures == [], load.failures
    statuses = [a.status_code for a in load.answers]
    # The target is every request answered 200; a clean 503 would still be an answer, not a loss.
    unavailable = [a for a in load.answers if a.status_code == 503]
    assert all(
        a.json()["error"]["type"] == "service_unavailable" and "Retry-After" in a.headers for a in unavailable
    )
    assert statuses.count(200) + len(unavailable) == len(statuses)
    assert unavailable == [], f"{len(unavailable)} of {len(statuses)} answered 503"
    # Answered after the kill (past the requests in flight then): never by the dead replica.
    later = [a.headers["X-Flashstep-Worker"] for a in load.answers[killed_at + load.threads :]]
    assert later and victim.removeprefix("SERVE_REPLICA::") not in later
    # Serve starts a replacement: the deployment is back to two replicas.
    wait_until(
        lambda: len(replicas()) == REPLICAS and victim not in replicas(), message="no replacement replica"
    )
