"""End-to-end specs of the admin routes: auth, load/unload, default, hot swap under load."""

from __future__ import annotations

import asyncio
import gc
import weakref

import httpx
import pytest

from tests.server.conftest import wait_until

SWAP_LOAD = 60  # requests in flight around a hot swap: enough that some run before, during and after it


def wait_collected(ref: weakref.ref, what: str) -> None:
    """Return once nothing references the object (a batch may still be leaving its lease)."""

    def gone() -> bool:
        gc.collect()
        return ref() is None

    wait_until(gone, message=f"{what} is still referenced: its memory is not freed")


def test_admin_routes_need_the_token(client):
    missing = client.get("/admin/models")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = client.get("/admin/models", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert client.post("/admin/models", json={"path": "teacher-v2"}).status_code == 401
    assert client.delete("/admin/models/teacher").status_code == 401
    assert client.post("/admin/models/teacher/swap", json={"path": "teacher-v2"}).status_code == 401
    assert client.put("/admin/default", json={"model": "swift"}).status_code == 401


def test_admin_lists_models_with_memory_use(admin_client):
    body = admin_client.get("/admin/models").json()
    assert body["default"] == "teacher"
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["teacher"]["memory_bytes"] > 0 and by_name["teacher"]["family"] == "teacher"
    assert by_name["swift"]["version"].startswith("swift@")


def test_paths_outside_the_models_root_are_refused(admin_client, outside_model):
    for path in (str(outside_model), "../outside", "/etc"):
        response = admin_client.post("/admin/models", json={"path": path, "name": "intruder"})
        assert response.status_code == 403, response.text
        assert response.json()["error"]["type"] == "permission_error"
    missing = admin_client.post("/admin/models", json={"path": "no-such-model"})
    assert missing.status_code == 404


@pytest.mark.slow
def test_load_set_default_and_unload_frees_the_engine(live_server, admin_client, client):
    loaded = admin_client.post("/admin/models", json={"path": "teacher-v2", "name": "extra"})
    assert loaded.status_code == 201 and loaded.json()["name"] == "extra"
    assert admin_client.post("/admin/models", json={"path": "teacher", "name": "extra"}).status_code == 409
    assert client.post("/generate", json={"prompt": "a circle", "model": "extra"}).status_code == 200

    assert admin_client.put("/admin/default", json={"model": "extra"}).json()["default"] == "extra"
    served = client.post("/generate", json={"prompt": "a circle"})
    assert served.headers["X-Flashstep-Model"] == "extra"
    admin_client.put("/admin/default", json={"model": "teacher"})

    engine = weakref.ref(live_server.engine("extra"))
    unloaded = admin_client.delete("/admin/models/extra")
    assert unloaded.status_code == 200 and unloaded.json()["default"] == "teacher"
    assert "extra" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.post("/generate", json={"prompt": "a circle", "model": "extra"}).status_code == 404
    wait_collected(engine, "the unloaded engine")
    assert admin_client.delete("/admin/models/extra").status_code == 404


async def _load_around_a_swap(url: str, headers: dict) -> tuple[list[httpx.Response], httpx.Response]:
    limits = httpx.Limits(max_connections=12)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        semaphore = asyncio.Semaphore(8)
        done = 0
        ten_done = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            nonlocal done
            async with semaphore:
                body = {"prompt": f"a purple star {i}", "seed": i, "model": "swappable"}
                response = await client.post("/generate", json=body)
                done += 1
                if done >= 10:
                    ten_done.set()
                return response

        first = [asyncio.create_task(one(i)) for i in range(SWAP_LOAD - 10)]
        await asyncio.wait_for(ten_done.wait(), timeout=120)  # the swap lands while the old engine is serving
        swap = await client.post("/admin/models/swappable/swap", json={"path": "teacher-v2"}, headers=headers)
        # Requests sent after the swap returned must see the new version.
        rest = [asyncio.create_task(one(i)) for i in range(SWAP_LOAD - 10, SWAP_LOAD)]
        return list(await asyncio.gather(*first, *rest)), swap


@pytest.mark.slow
def test_a_hot_swap_under_load_loses_no_request(live_server, admin_client):
    assert admin_client.post("/admin/models", json={"path": "teacher", "name": "swappable"}).status_code == 201
    old_engine = weakref.ref(live_server.engine("swappable"))
    try:
        responses, swap = asyncio.run(_load_around_a_swap(live_server.url, dict(admin_client.headers)))
        assert swap.status_code == 200, swap.text
        old_version, new_version = swap.json()["old_version"], swap.json()["new_version"]
        assert old_version != new_version
        assert [r.status_code for r in responses] == [200] * SWAP_LOAD
        versions = [r.headers["X-Flashstep-Model-Version"] for r in responses]
        assert set(versions) == {old_version, new_version}
        assert set(versions[-10:]) == {new_version}
        wait_collected(old_engine, "the swapped-out engine")
    finally:
        admin_client.delete("/admin/models/swappable")


@pytest.mark.parametrize("route", ["/admin/models", "/admin/default"])
def test_admin_routes_are_absent_without_a_token(overload_server, route):
    assert httpx.get(f"{overload_server.url}{route}", timeout=10).status_code in (404, 405)
