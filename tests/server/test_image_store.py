"""Specs of the url image store, for both backends, on an injected clock (no sleeping).

Each image is charged its bytes plus ENTRY_OVERHEAD_BYTES; the tests use blobs of IMAGE bytes,
so one image costs exactly COST and budgets read as a number of images.
"""

from __future__ import annotations

import os

import pytest

from flashstep.server.errors import ClientShareError, ImageStoreFullError
from flashstep.server.image_store import (
    ENTRY_OVERHEAD_BYTES,
    DirectoryImageStore,
    ImageStore,
    Limits,
    MemoryImageStore,
    is_valid_id,
)

IMAGE = 1000
COST = IMAGE + ENTRY_OVERHEAD_BYTES
TTL = 100.0
ALICE, BOB, CAROL, DAVE, EVE = "a1", "b2", "c3", "d4", "e5"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:  # wall-time-like: files carry it as mtime
        self.now = now

    def __call__(self) -> float:
        return self.now


def blob(tag: int) -> bytes:
    return bytes([tag % 256]) * IMAGE


@pytest.fixture(params=["memory", "directory"])
def make_store(request, tmp_path):
    """make_store(images, share) -> a store of `images` * COST bytes; every store shares one clock and folder."""
    clock = Clock()

    def make(images: int = 8, share: float = 0.25) -> ImageStore:
        limits = Limits.of(images * COST, share, TTL)
        if request.param == "memory":
            return MemoryImageStore(limits, clock=clock)
        return DirectoryImageStore(tmp_path / "store", limits, clock=clock)

    make.clock = clock
    make.backend = request.param
    return make


def put(store: ImageStore, client: str, tag: int = 0, n: int = 1) -> list[str]:
    return store.put_many([blob(tag + i) for i in range(n)], "image/png", client)


def test_a_stored_image_is_served_until_its_ttl(make_store):
    store = make_store()
    [image_id] = put(store, ALICE, tag=7)
    got = store.get(image_id)
    assert got.data == blob(7) and got.media_type == "image/png"
    make_store.clock.now += TTL - 1
    assert store.get(image_id) is not None
    make_store.clock.now += 1
    assert store.get(image_id) is None and len(store) == 0 and store.nbytes() == 0


def test_ids_are_unguessable_and_unique(make_store):
    store = make_store(images=8, share=1.0)
    ids = put(store, ALICE, n=8)
    assert len(set(ids)) == 8
    assert all(is_valid_id(i) and len(i) >= 22 for i in ids)


def test_the_store_is_bounded_by_bytes(make_store):
    store = make_store(images=4, share=1.0)
    for tag in range(10):
        put(store, ALICE, tag=tag)
        assert store.nbytes() <= store.limits.max_bytes
    assert len(store) == 4


def test_a_client_over_its_share_evicts_only_its_own_oldest(make_store):
    store = make_store(images=8, share=0.25)  # two images each
    bob = put(store, BOB, n=2)
    alice = [put(store, ALICE, tag=i)[0] for i in range(5)]
    assert [store.get(i) is not None for i in alice] == [False, False, False, True, True]
    assert all(store.get(i) is not None for i in bob)


def test_another_clients_image_is_never_evicted_inside_its_ttl(make_store):
    store = make_store(images=8, share=0.25)
    kept = {c: put(store, c, n=2) for c in (ALICE, BOB, CAROL, DAVE)}  # full: four clients, two each
    for tag in range(20):
        put(store, ALICE, tag=tag)  # Alice floods: she replaces her own, nobody else's
    for client in (BOB, CAROL, DAVE):
        assert all(store.get(i) is not None for i in kept[client])


def test_a_store_full_of_others_images_refuses_with_retry_after(make_store):
    store = make_store(images=8, share=0.25)
    for client in (ALICE, BOB, CAROL, DAVE):
        put(store, client, n=2)
    make_store.clock.now += 30
    with pytest.raises(ImageStoreFullError) as info:
        put(store, EVE)
    assert info.value.status_code == 503
    assert "image store" in info.value.message
    assert int(info.value.headers["Retry-After"]) == 70  # the oldest images expire at TTL
    make_store.clock.now += 70
    assert store.get(put(store, EVE)[0]) is not None  # once they expire, Eve gets in


def test_a_refused_put_stores_and_evicts_nothing(make_store):
    store = make_store(images=8, share=0.25)
    for client in (BOB, CAROL, DAVE):
        put(store, client, n=2)
    alice = put(store, ALICE, n=2)
    with pytest.raises(ClientShareError) as info:  # three images exceed any client's share of two
        put(store, ALICE, tag=10, n=3)
    assert info.value.status_code == 429
    assert all(store.get(i) is not None for i in alice) and len(store) == 8


def test_one_requests_images_are_stored_together_and_never_evict_each_other(make_store):
    store = make_store(images=8, share=0.5)
    ids = put(store, ALICE, n=4)  # exactly her share
    assert all(store.get(i) is not None for i in ids)
    newer = put(store, ALICE, tag=9, n=2)  # evicts her two oldest, keeps the rest
    assert [store.get(i) is not None for i in ids] == [False, False, True, True]
    assert all(store.get(i) is not None for i in newer)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "..", "a" * 21, "a" * 23, "a/b" + "c" * 19, "." * 22, ""])
def test_malformed_ids_are_unknown(make_store, bad):
    store = make_store()
    put(store, ALICE)
    assert not is_valid_id(bad)
    assert store.get(bad) is None


def test_two_stores_over_one_folder_see_each_others_images(tmp_path):
    clock = Clock()
    limits = Limits.of(8 * COST, 0.25, TTL)
    first = DirectoryImageStore(tmp_path, limits, clock=clock)
    second = DirectoryImageStore(tmp_path, limits, clock=clock)
    [from_first] = put(first, ALICE, tag=1)
    assert second.get(from_first).data == blob(1)
    for client in (BOB, CAROL, DAVE):
        put(second, client, n=2)
    # The bound and the shares are the folder's, not each instance's.
    put(first, ALICE, tag=2, n=2)  # Alice at her share: her first image goes, through either store
    assert second.get(from_first) is None and len(second) == 8
    with pytest.raises(ImageStoreFullError):
        put(first, EVE)


def test_the_folder_holds_only_finished_images_named_by_id(tmp_path):
    clock = Clock()
    store = DirectoryImageStore(tmp_path, Limits.of(8 * COST, 1.0, TTL), clock=clock)
    ids = put(store, ALICE, n=3)
    names = sorted(n for n in os.listdir(tmp_path) if not n.startswith("."))
    assert len(names) == 3 and all(name.split(".")[0] in ids for name in names)
    assert all(os.stat(tmp_path / name).st_mtime == clock.now for name in names)  # expiry reads mtime
    (tmp_path / "stranger.txt").write_bytes(b"x" * 10 * COST)
    assert len(store) == 3 and store.nbytes() == 3 * COST  # files that are not images are neither counted nor deleted
    clock.now += TTL
    put(store, ALICE)
    assert (tmp_path / "stranger.txt").exists() and len(store) == 1
