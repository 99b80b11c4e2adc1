"""Unit specs of the server's small parts: settings, image store, error messages, metrics buckets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flashstep.server.errors import describe_validation_error
from flashstep.server.image_store import ENTRY_OVERHEAD_BYTES, Limits, MemoryImageStore
from flashstep.server.metrics import batch_size_buckets
from flashstep.server.schemas import GenerateRequest, ImageGenerationRequest, parse_size
from flashstep.server.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_settings_read_flashstep_environment(monkeypatch):
    monkeypatch.setenv("FLASHSTEP_MODELS", "shapes-teacher, shapes-swiftbrush")
    monkeypatch.setenv("FLASHSTEP_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("FLASHSTEP_ADMIN_TOKEN", "s3cret")
    settings = Settings()
    assert settings.models == ["shapes-teacher", "shapes-swiftbrush"]
    assert settings.max_batch_size == 4
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_settings_flags_override_environment(monkeypatch):
    monkeypatch.setenv("FLASHSTEP_PORT", "9000")
    assert Settings(port=1234).port == 1234
    monkeypatch.setenv("FLASHSTEP_ADMIN_TOKEN", "")
    assert Settings().admin_token is None


def test_settings_reject_out_of_range_values():
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(max_batch_size=0)


def test_serve_flags_become_settings(monkeypatch):
    from flashstep.server.serve import build_parser, settings_from_args

    monkeypatch.setenv("FLASHSTEP_QUEUE_LIMIT", "7")
    args = build_parser().parse_args(["--port", "0", "--models", "a,b", "--no-warmup"])
    settings = settings_from_args(args)
    assert (settings.port, settings.models, settings.warmup, settings.queue_limit) == (0, ["a", "b"], False, 7)


def test_image_store_expires_and_evicts_the_clients_oldest():
    clock = Clock()
    store = MemoryImageStore(Limits.of(2 * (ENTRY_OVERHEAD_BYTES + 1), 1.0, ttl_s=10), clock=clock)
    a = store.put(b"a", "image/png")
    b = store.put(b"b", "image/png")
    c = store.put(b"c", "image/png")  # evicts a: same client, store full
    assert store.get(a) is None and store.get(b).data == b"b" and len(store) == 2
    clock.now = 10.5
    assert store.get(c) is None and len(store) == 0
    assert len(a) >= 20  # unguessable ids


def _first_error(model, body) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    error = info.value.errors()[0]
    error["loc"] = ("body", *error["loc"])
    return error


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "x", "n": 11}, "n", "`n` must be between 1 and 10 but is 11"),
        ({"prompt": "x", "n": 0}, "n", "`n` must be between 1 and 10 but is 0"),
        ({"prompt": ""}, "prompt", "`prompt` must not be empty"),
        ({}, "prompt", "`prompt` is required"),
        ({"prompt": "x", "size": "big"}, "size", "`size` must be 'auto' or WIDTHxHEIGHT"),
        ({"prompt": "x", "response_format": "xml"}, "response_format", "`response_format` must be 'b64_json' or 'url'"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "`output_format` must be 'png', 'jpeg' or 'webp'"),
        ({"prompt": "x", "seed": -1}, "seed", "`seed` must be between 0 and 4294967295 but is -1"),
        ({"prompt": "x", "frame_count": 3}, "frame_count", "`frame_count` is not a parameter of this endpoint"),
        ({"prompt": "x", "steps": "many"}, "steps", "`steps`: Input should be a valid integer"),
    ],
)
def test_validation_errors_name_the_field_and_range(body, param, message):
    got_param, got_message = describe_validation_error(_first_error(ImageGenerationRequest, body))
    assert got_param == param
    assert got_message.startswith(message)


def test_native_body_accepts_diffusers_names():
    body = GenerateRequest.model_validate({"prompt": "x", "num_inference_steps": 4})
    assert body.steps == 4


def test_parse_size():
    assert parse_size("64x32") == (64, 32)
    assert parse_size("auto") is None


def test_batch_size_buckets_cover_every_small_size():
    assert batch_size_buckets(4) == (1.0, 2.0, 3.0, 4.0)
    assert batch_size_buckets(64)[-3:] == (16.0, 32.0, 64.0)


def test_settings_reject_unknown_attention_backends():
    assert Settings(attention_backend="math").attention_backend == "math"
    with pytest.raises(ValidationError, match="attention_backend"):
        Settings(attention_backend="warp-drive")


def test_start_up_serves_the_shipped_one_step_default_unless_told_otherwise():
    from flashstep.models.registry import SHIPPED_DEFAULT_MODEL
    from flashstep.server.app import startup_models
    from flashstep.server.settings import Settings

    shipped = startup_models(Settings())
    assert shipped[0] == SHIPPED_DEFAULT_MODEL and "shapes-teacher" in shipped
    assert startup_models(Settings(default_model="shapes-teacher"))[0] == "shapes-teacher"
    assert startup_models(Settings(models=["shapes-teacher", "shapes-2rf"])) == ["shapes-teacher", "shapes-2rf"]
