"""Specs of OpenAI compatibility, with the official `openai` client against a real server.

Every field the client's `images.generate` can send is honoured, accepted and ignored, or
refused with a 400 the client raises as `BadRequestError` (the decisions are tabled in
`ImageGenerationRequest`'s docstring).
"""

from __future__ import annotations

import base64

import openai
import pytest
from openai import OpenAI


@pytest.fixture
def oai(live_server) -> OpenAI:
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


ACCEPTED = [
    {},
    {"model": "swift"},
    {"n": 2},
    {"size": "64x64"},
    {"size": "auto"},
    {"response_format": "b64_json"},
    {"response_format": "url"},
    {"output_format": "png"},
    {"output_format": "jpeg", "output_compression": 50},
    {"output_format": "webp", "output_compression": 0},
    {"background": "auto"},
    {"background": "opaque"},
    {"moderation": "low"},
    {"moderation": "auto"},
    *({"quality": q} for q in ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd")),
    {"style": "vivid"},
    {"style": "natural"},
    {"complexity": "high"},
    {"user": "user-1234"},
    {"safety_identifier": "hashed-id"},
    {"stream": False},
    {"partial_images": 0},
]


@pytest.mark.parametrize("fields", ACCEPTED, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "bare")
def test_every_field_flashstep_honours_or_ignores_returns_images(oai, fields):
    result = oai.images.generate(prompt="a red circle", **fields)
    assert len(result.data) == fields.get("n", 1)
    image = result.data[0]
    assert image.b64_json if fields.get("response_format") != "url" else image.url
    assert result.output_format == fields.get("output_format", "png")
    assert result.usage.input_tokens > 0 and result.usage.output_tokens == 0
    assert result.usage.total_tokens == result.usage.input_tokens == result.usage.input_tokens_details.text_tokens


def test_usage_counts_the_prompt_once_per_image(oai):
    one = oai.images.generate(prompt="a large red circle on the left", n=1).usage
    three = oai.images.generate(prompt="a large red circle on the left", n=3).usage
    assert three.input_tokens == 3 * one.input_tokens


def test_output_compression_has_openai_meaning_100_compresses_least(oai):
    def jpeg_bytes(compression: int) -> int:
        result = oai.images.generate(
            prompt="a red circle", output_format="jpeg", output_compression=compression, extra_body={"seed": 7}
        )
        return len(base64.b64decode(result.data[0].b64_json))

    assert jpeg_bytes(100) > jpeg_bytes(10)


REFUSED = [
    # (fields, param, code)
    ({"n": 0}, "n", "invalid_value"),
    ({"n": 11}, "n", "invalid_value"),
    ({"size": "1024x1024"}, "size", "invalid_value"),
    ({"size": "huge"}, "size", "invalid_value"),
    ({"output_format": "gif"}, "output_format", "invalid_value"),
    ({"output_format": "svg"}, "output_format", "invalid_value"),
    ({"background": "transparent"}, "background", "invalid_value"),
    ({"partial_images": 2}, "partial_images", "invalid_value"),
    ({"output_compression": 101}, "output_compression", "invalid_value"),
    ({"model": "dall-e-3"}, "model", "model_not_found"),
    ({"frame_count": 4}, "frame_count", "unknown_parameter"),
    ({"extra_body": {"n": "two"}}, "n", "invalid_type"),
    ({"extra_body": {"no_such_option": 1}}, "no_such_option", "unknown_parameter"),
]


@pytest.mark.parametrize(("fields", "param", "code"), REFUSED, ids=lambda v: str(v)[:40])
def test_invalid_requests_raise_bad_request_naming_the_field(oai, fields, param, code):
    error_class = openai.NotFoundError if code == "model_not_found" else openai.BadRequestError
    with pytest.raises(error_class) as info:
        oai.images.generate(prompt="a red circle", **fields)
    error = info.value
    assert error.param == param and error.code == code
    assert error.type == ("not_found_error" if code == "model_not_found" else "invalid_request_error")
    assert error.body["request_id"] == error.response.headers["x-request-id"]


def test_streaming_is_refused_with_a_400_naming_stream(live_server, client):
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", "stream": True})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream"


def test_a_missing_prompt_is_a_missing_required_parameter(client):
    error = client.post("/v1/images/generations", json={"n": 1}).json()["error"]
    assert error["param"] == "prompt" and error["code"] == "missing_required_parameter"


@pytest.mark.parametrize("path", ["/v1/images/generations", "/generate"])
def test_the_openapi_document_lists_every_status_of_the_generation_routes(client, path):
    responses = client.get("/openapi.json").json()["paths"][path]["post"]["responses"]
    assert {"200", "400", "404", "408", "413", "429", "500", "503", "504"} <= set(responses)
    assert "422" not in responses  # FastAPI's default, which the error boundary never answers
    error_schema = responses["400"]["content"]["application/json"]["schema"]
    assert error_schema["$ref"].endswith("/ErrorResponse")
