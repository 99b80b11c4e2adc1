"""Specs of the HTTP edge against hostile or broken clients: one test per fault class.

Invalid Unicode, oversized and endless bodies, bodies of many keys, oversized prompts, slow
clients and oversized headers must each get a small, typed 4xx (or a closed connection) without
the route, the tokenizer or the event loop paying for the input's size. Raw sockets stand in for
clients that no well-behaved HTTP library would imitate.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from flashstep.models.validation import MAX_PROMPT_CHARS
from flashstep.server.app import create_app
from flashstep.server.errors import RequestIdFilter
from flashstep.server.serve import uvicorn_limits
from flashstep.server.settings import Settings
from tests.server.conftest import WAIT_S, LiveServer, metric_value
from tests.server.fakes import FakeLoader

MIB = 1 << 20
EDGE_BODY_TIMEOUT_S = 0.5
EDGE_MAX_HEADER_BYTES = 4096
ERROR_BODY_LIMIT = 8 * 1024

SURROGATE = "\ud800"  # a lone high surrogate: JSON can escape it, UTF-8 cannot encode it
OPENAI_STRING_FIELDS = [
    "prompt", "negative_prompt", "model", "size", "response_format", "output_format", "user",
    "safety_identifier", "quality", "style", "moderation", "background", "complexity",
]  # fmt: skip
NATIVE_STRING_FIELDS = ["prompt", "negative_prompt", "model", "output_format"]


class EdgeServer(LiveServer):
    """A LiveServer run with serve.py's uvicorn limits (keep-alive and header size)."""

    def __init__(self, app, settings: Settings):
        super().__init__(app)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=10, **uvicorn_limits(settings)
        )
        self.server = uvicorn.Server(config)
        self.thread.__init__(target=self.server.run, name="test-uvicorn-edge", daemon=True)


@pytest.fixture(scope="module")
def edge_server() -> Iterator[EdgeServer]:
    """Fake engine; bodies up to 8 MiB (so key-count limits are reached), short body and header limits."""
    settings = Settings(
        models=["m"],
        max_body_bytes=8 * MIB,
        body_read_timeout_s=EDGE_BODY_TIMEOUT_S,
        keep_alive_timeout_s=1,
        max_header_bytes=EDGE_MAX_HEADER_BYTES,
    )
    server = EdgeServer(create_app(settings, engine_loader=FakeLoader()), settings).start().wait_ready(WAIT_S)
    yield server
    server.stop()


def raw_body(body: dict) -> bytes:
    """JSON with non-ASCII escaped, so a lone surrogate travels as the text \\ud800."""
    return json.dumps(body, ensure_ascii=True).encode("ascii")


def open_socket(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=WAIT_S)


def read_response(sock: socket.socket, timeout: float = WAIT_S) -> bytes:
    """Bytes the server sends until it closes the connection or `timeout` passes (b"" if none)."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
        if b"\r\n\r\n" in received and received.rstrip().endswith(b"}"):
            break  # a complete JSON error body
    return received


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def json_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("field", OPENAI_STRING_FIELDS)
def test_lone_surrogates_in_any_openai_field_get_a_400_naming_it(client, field):
    body = {"prompt": "a circle", field: SURROGATE}
    response = client.post("/v1/images/generations", content=raw_body(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("field", NATIVE_STRING_FIELDS)
def test_lone_surrogates_in_any_native_field_get_a_400_naming_it(client, field):
    body = {"prompt": "a circle", field: "red " + SURROGATE}
    response = client.post("/generate", content=raw_body(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize(
    "content",
    [
        '{"prompt": "a red circle"}'.encode("utf-16"),  # json.loads would guess UTF-16 and accept it
        b'{"prompt": "a red \xed\xa0\x80circle"}',  # a surrogate encoded as UTF-8 bytes
        b'{"prompt": "a red \xff circle"}',
    ],
    ids=["utf-16", "utf-8-surrogate", "invalid-byte"],
)
def test_json_bodies_that_are_not_utf8_get_a_400(client, content):
    response = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_encoding"


def test_a_body_over_the_cap_is_refused_from_its_length_before_it_is_sent(live_server):
    refused = metric_value(live_server.url, "flashstep_request_bodies_refused_total", reason="too_large")
    rss = metric_value(live_server.url, "process_resident_memory_bytes")
    assert rss > 0
    with open_socket(live_server.url) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {16 * MIB}\r\n\r\n".encode()
        )
        response = read_response(sock)  # not one byte of the body was sent: the answer cannot wait for it
    assert status_of(response) == 413
    error = json_of(response)["error"]
    assert "max_body_bytes" in error["message"] and str(MIB) in error["message"]
    assert metric_value(live_server.url, "flashstep_request_bodies_refused_total", reason="too_large") == refused + 1
    assert metric_value(live_server.url, "process_resident_memory_bytes") < rss + 16 * MIB


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_cap(live_server):
    chunk = b"x" * (64 * 1024)
    sent = 0
    with open_socket(live_server.url) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < 16 * MIB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while chunks were still going out
        response = read_response(sock)
    assert status_of(response) == 413
    assert sent < 4 * MIB, f"the server let {sent} bytes through a 1 MiB cap"


def test_a_body_of_many_keys_gets_a_small_400(edge_server):
    keys = ",".join(f'"k{i}":0' for i in range(300_000))
    content = ('{"prompt":"x",' + keys + "}").encode()
    response = httpx.post(
        f"{edge_server.url}/v1/images/generations", content=content,
        headers={"content-type": "application/json"}, timeout=WAIT_S,
    )  # fmt: skip
    assert response.status_code == 400
    assert len(response.content) < ERROR_BODY_LIMIT
    assert "keys" in response.json()["error"]["message"]


def test_error_bodies_stay_small_whatever_the_input(edge_server):
    huge = "y" * 500_000
    bodies = [
        {"prompt": "x", huge: 1},  # an unknown key half a megabyte long
        {"prompt": "x", **{f"k{i}": huge[:5000] for i in range(40)}},  # many errors, each echoing its input
        {"prompt": "x", "n": huge, "seed": huge, "steps": huge, "quality": huge, "size": huge},
    ]
    for body in bodies:
        response = httpx.post(f"{edge_server.url}/v1/images/generations", json=body, timeout=WAIT_S)
        assert response.status_code == 400
        assert len(response.content) < ERROR_BODY_LIMIT, len(response.content)


def test_an_oversized_prompt_is_refused_before_the_tokenizer_sees_it(live_server, client):
    counts = live_server.engine("teacher").prompts.token_counts
    size_before = len(counts)
    oversized = "red " * (MAX_PROMPT_CHARS // 4 + 1)
    for field in ("prompt", "negative_prompt"):
        body = {"prompt": "a circle", "nasa_alpha": 0.5, field: oversized}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and str(MAX_PROMPT_CHARS) in error["message"]
    assert len(counts) == size_before and oversized not in counts


def test_a_client_that_stalls_mid_body_is_cut_off(edge_server):
    with open_socket(edge_server.url) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        response = read_response(sock)  # the rest of the body never comes
    assert response == b"" or status_of(response) == 408, response[:200]
    if response:
        assert json_of(response)["error"]["code"] == "request_timeout"
    assert httpx.get(f"{edge_server.url}/healthz", timeout=WAIT_S).status_code == 200


def test_headers_that_grow_past_the_cap_are_refused(edge_server):
    with open_socket(edge_server.url) as sock:  # headers that never end, as a slowloris client sends them
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"p" * (2 * EDGE_MAX_HEADER_BYTES))
        response = read_response(sock)
    assert response == b"" or 400 <= status_of(response) < 500, response[:200]


def test_every_response_and_error_body_carries_the_request_id(live_server, client, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.DEBUG, logger="flashstep.server")
    ok = client.get("/healthz", headers={"X-Request-Id": "trace-abc.123"})
    assert ok.headers["x-request-id"] == "trace-abc.123"
    failed = client.post("/generate", json={"prompt": "x", "n": 0}, headers={"X-Request-Id": "trace-def"})
    assert failed.headers["x-request-id"] == "trace-def"
    assert failed.json()["error"]["request_id"] == "trace-def"
    assert any(getattr(record, "request_id", None) == "trace-def" for record in caplog.records)

    for unusable in ("x" * 65, "has space", "tab\tin"):
        response = client.get("/healthz", headers={"X-Request-Id": unusable})
        generated = response.headers["x-request-id"]
        assert generated != unusable and 0 < len(generated) <= 64 and generated.isalnum()

    with open_socket(live_server.url) as sock:  # refused before routing: still carries one
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nX-Request-Id: big-1\r\nContent-Length: 99999999\r\n\r\n")
        response = read_response(sock)
    assert b"x-request-id: big-1" in response.lower() and json_of(response)["error"]["request_id"] == "big-1"


def test_metrics_report_process_memory_with_bounded_labels(live_server, client):
    text = client.get("/metrics").text
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected_total" in text
    client.request("BREW", "/generate")
    assert 'method="BREW"' not in client.get("/metrics").text
