"""End-to-end specs of generation over HTTP: batching, the OpenAI client, the native route, errors.

A real uvicorn server on 127.0.0.1 serves tiny random-weight checkpoints (conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

# The engine's batch invariance holds up to float rounding: a batched matmul on the CPU may sum
# in another order, which moves a pixel by at most one 8-bit level.
PIXEL_TOLERANCE = 1


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def batch_size_counts(client: httpx.Client) -> tuple[float, float]:
    """(batches run, batches of exactly one image) from /metrics."""
    total = single = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "flashstep_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    total = sample.value
                if sample.name.endswith("_bucket") and sample.labels["le"] == "1.0":
                    single = sample.value
    return total, single


async def _generate_concurrently(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/generate", json=body) for body in bodies))


@pytest.mark.slow
def test_concurrent_requests_share_batches_and_match_their_solo_images(live_server, client):
    batches_before, singles_before = batch_size_counts(client)
    bodies = [{"prompt": f"a red circle number {i}", "seed": 1000 + i} for i in range(16)]
    responses = asyncio.run(_generate_concurrently(live_server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 16
    batches_after, singles_after = batch_size_counts(client)
    multi_image_batches = (batches_after - batches_before) - (singles_after - singles_before)
    assert multi_image_batches >= 1, "no batch carried more than one image"
    assert max(int(r.headers["X-Flashstep-Batch-Size"]) for r in responses) > 1

    for body, batched in zip(bodies, responses, strict=True):
        alone = client.post("/generate", json=body)
        assert alone.status_code == 200 and alone.headers["X-Flashstep-Seed"] == str(body["seed"])
        difference = np.abs(pixels(batched.content) - pixels(alone.content)).max()
        assert difference <= PIXEL_TOLERANCE, f"seed {body['seed']} differs by {difference} levels"


def test_native_route_returns_image_bytes_with_timing_headers(client):
    response = client.post("/generate", json={"prompt": "a blue square", "seed": 3, "output_format": "webp"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    headers = response.headers
    assert headers["X-Flashstep-Model"] == "teacher" and headers["X-Flashstep-Model-Version"].startswith("teacher@")
    for name in ("Queue-Wait", "Encode-Time", "Denoise-Time", "Decode-Time"):
        assert float(headers[f"X-Flashstep-{name}"]) >= 0
    assert int(headers["X-Flashstep-Batch-Size"]) >= 1 and int(headers["X-Flashstep-Unet-Evals"]) >= 1
    assert "denoise;dur=" in headers["Server-Timing"]


def test_native_route_returns_json_for_several_images(client):
    response = client.post("/generate", json={"prompt": "a star", "n": 3, "seed": 40, "model": "swift"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model"] == "swift" and [image["seed"] for image in body["images"]] == [40, 41, 42]
    first = body["images"][0]
    assert first["unet_evals"] == 1 and first["timings"]["denoise"] >= 0
    alone = client.post("/generate", json={"prompt": "a star", "seed": 41, "model": "swift"})
    batched = pixels(base64.b64decode(body["images"][1]["b64_json"]))
    assert np.abs(batched - pixels(alone.content)).max() <= PIXEL_TOLERANCE


def test_openai_client_gets_base64_images(live_server):
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    result = client.images.generate(
        model="swift", prompt="a green triangle", n=2, size="64x64", response_format="b64_json",
        extra_body={"seed": 5},
    )  # fmt: skip
    assert len(result.data) == 2 and result.data[0].revised_prompt == "a green triangle"
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 64)


def test_openai_client_gets_urls_that_serve_the_image(live_server):
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    result = client.images.generate(prompt="a yellow diamond", response_format="url", output_format="jpeg")
    url = result.data[0].url
    assert url.startswith(f"{live_server.url}/v1/images/")
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)
    assert httpx.get(f"{live_server.url}/v1/images/not-an-id", timeout=10).status_code == 404


def test_models_are_listed_in_openai_format(live_server):
    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list()}
    assert {"teacher", "swift"} <= set(models)
    teacher = models["teacher"].model_dump()
    assert teacher["default"] is True and teacher["allowed_steps"] == [1, 2, 4] and teacher["sizes"] == ["64x64"]


LONG_PROMPT = " ".join(["a large red circle on the left"] * 20)

BAD_REQUESTS = [
    # (route, body, status, param)
    ("/v1/images/generations", {"prompt": "x", "n": 11}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/images/generations", {"prompt": "x", "size": "128x128"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "huge"}, 400, "size"),
    ("/v1/images/generations", {"prompt": "x", "steps": 3}, 400, "steps"),
    ("/v1/images/generations", {"prompt": "x", "model": "swift", "steps": 2}, 400, "steps"),
    ("/v1/images/generations", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "negative_prompt": LONG_PROMPT}, 400, "negative_prompt"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": 100}, 400, "guidance_scale"),
    ("/v1/images/generations", {"prompt": "x", "model": "swift", "guidance_scale": 5}, 400, "guidance_scale"),
    ("/v1/images/generations", {"prompt": "x", "nasa_alpha": 2}, 400, "nasa_alpha"),
    ("/v1/images/generations", {"prompt": "x", "hybrid": True}, 400, "hybrid"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "xml"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "x", "output_format": "gif"}, 400, "output_format"),
    ("/v1/images/generations", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/images/generations", {"prompt": "x", "frame_count": 4}, 400, "frame_count"),
    ("/v1/images/generations", {"prompt": ""}, 400, "prompt"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
    ("/generate", {"prompt": "x", "n": 11}, 400, "n"),
    ("/generate", {"prompt": "x", "height": 128}, 400, "height"),
    ("/generate", {"prompt": "x", "num_inference_steps": 3}, 400, "steps"),
    ("/generate", {"prompt": "x", "model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
def test_bad_input_gets_a_4xx_that_names_the_field(client, route, body, status, param):
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert f"`{param}`" in error["message"] or param in error["message"]
    assert "Traceback" not in response.text


def test_unknown_model_lists_the_loaded_ones(client):
    error = client.post("/generate", json={"prompt": "x", "model": "nope"}).json()["error"]
    assert "teacher" in error["message"] and "swift" in error["message"]


def test_invalid_json_is_a_400_not_a_500(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_a_negative_prompt_the_family_cannot_use_is_refused(client):
    body = {"prompt": "a circle", "model": "swift", "negative_prompt": "red", "nasa_alpha": 0}
    response = client.post("/generate", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "negative_prompt"


def test_an_engine_failure_fails_only_its_batch_with_a_clean_500(live_server, client):
    engine = live_server.engine("teacher")
    original = engine.generate

    def flaky(requests):
        if any(r.prompt == "explode" for r in requests):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return original(requests)

    engine.generate = flaky
    try:
        failed = client.post("/generate", json={"prompt": "explode", "seed": 1})
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "server_error"
        assert "Traceback" not in failed.text and "illegal memory" not in failed.text
        assert client.post("/generate", json={"prompt": "a circle", "seed": 1}).status_code == 200
        assert client.get("/readyz").status_code == 200
    finally:
        del engine.generate  # back to the class's method


def test_requests_are_counted_by_route_and_status(client):
    client.post("/generate", json={"prompt": "x", "n": 99})
    metrics = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    samples = metrics["flashstep_http_requests"].samples
    assert any(s.labels == {"route": "/generate", "method": "POST", "status": "400"} and s.value >= 1 for s in samples)
    for name in ("flashstep_queue_depth", "flashstep_stage_seconds", "flashstep_images_generated", "flashstep_model_loads"):
        assert name in metrics


def test_health_and_playground_are_served(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="generate"' in page.text
