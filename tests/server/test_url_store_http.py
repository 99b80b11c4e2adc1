"""response_format=url over a real server: where urls point, and that one client cannot evict another.

Fake engines make images instantly (solid 64x64 PNGs of a few hundred bytes). The loopback
network is all of 127.0.0.0/8, so a client bound to 127.0.0.2 is a second peer address.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from flashstep.server.app import create_app
from flashstep.server.settings import Settings
from tests.server.conftest import LiveServer
from tests.server.fakes import FakeLoader

PROXY = "127.0.0.2"  # the one peer whose X-Forwarded-* headers the server believes
PUBLIC_URL = "https://images.example.com/flash"
STORE_BYTES = 65536  # a quarter each: about a dozen fake images per client


def start(**settings) -> LiveServer:
    base = {"models": ["fake"], "warmup": False, "max_wait_ms": 0, "image_store_bytes": STORE_BYTES}
    app = create_app(Settings(**{**base, **settings}), engine_loader=FakeLoader())
    return LiveServer(app).start().wait_ready()


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = start(trusted_proxies=PROXY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def public_server() -> Iterator[LiveServer]:
    live = start(public_url=PUBLIC_URL)
    yield live
    live.stop()


def client_at(server: LiveServer, address: str = "127.0.0.1", **kwargs) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.url, transport=transport, timeout=30, **kwargs)


def generate_urls(client: httpx.Client, n: int = 1, **kwargs) -> list[str]:
    response = client.post(
        "/v1/images/generations", json={"prompt": "a red circle", "n": n, "response_format": "url"}, **kwargs
    )
    assert response.status_code == 200, response.text
    return [item["url"] for item in response.json()["data"]]


def test_a_spoofed_host_header_does_not_change_the_url(server):
    with client_at(server) as client:
        [url] = generate_urls(client, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})
        assert url.startswith(f"{server.url}/v1/images/"), url
        assert httpx.get(url, timeout=10).status_code == 200


def test_forwarded_headers_are_believed_only_from_a_trusted_proxy(server):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "cdn.example.org"}
    with client_at(server, PROXY) as proxy:
        [url] = generate_urls(proxy, headers=forwarded)
    assert url.startswith("https://cdn.example.org/v1/images/"), url
    # 127.0.0.3: uvicorn's own proxy-header handling (off under `flashstep serve`, on in LiveServer)
    # believes 127.0.0.1, so a stranger elsewhere shows what flashstep itself does.
    with client_at(server, "127.0.0.3") as stranger:
        [url] = generate_urls(stranger, headers=forwarded)
    assert url.startswith(f"{server.url}/v1/images/"), url


def test_the_public_url_setting_prefixes_every_url(public_server):
    with client_at(public_server) as client:
        urls = generate_urls(client, n=2, headers={"Host": "evil.example"})
        for url in urls:
            assert url.startswith(f"{PUBLIC_URL}/v1/images/"), url
            path = url.removeprefix(PUBLIC_URL)  # what the reverse proxy would forward
            assert client.get(path).status_code == 200


def test_a_flooding_client_does_not_evict_another_clients_url(server):
    with client_at(server) as victim, client_at(server, "127.0.0.3") as flooder:
        [kept] = generate_urls(victim, headers={"Authorization": "Bearer victim-key"})
        for _ in range(27):  # 270 images: past the old store's 256 entries and far past one client's share
            generate_urls(flooder, n=10)
        assert victim.get(kept).status_code == 200
        assert flooder.get(generate_urls(flooder)[0]).status_code == 200  # the flooder still gets its newest


@pytest.mark.parametrize("image_id", ["..%2F..%2Fsettings.py", "..", "x" * 200, "not-an-id"])
def test_a_malformed_image_id_is_not_found(server, image_id):
    with client_at(server) as client:
        response = client.get(f"/v1/images/{image_id}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
