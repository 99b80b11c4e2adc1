"""Unit specs of the dynamic batcher and the model manager, on a fake engine (no torch model)."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import wait

import pytest

from flashstep.models.errors import InvalidRequestError, ModelNotFoundError
from flashstep.models.outputs import GenerationRequest
from flashstep.server.batcher import Batcher
from flashstep.server.errors import EngineFailure, ModelConflictError, QueueFullError, ShuttingDownError
from flashstep.server.metrics import Metrics
from flashstep.server.model_manager import ModelManager
from tests.server.conftest import wait_until
from tests.server.fakes import FakeLoader, seed_colour

TIMEOUT_S = 10


@pytest.fixture
def loader():
    return FakeLoader()


@pytest.fixture
def manager(loader):
    manager = ModelManager(models_root=None, metrics=Metrics(8), loader=loader)
    manager.load("m")
    return manager


def make_batcher(manager, **kwargs) -> Batcher:
    options = {"max_batch_size": 4, "max_wait_ms": 50, "queue_limit": 64, **kwargs}
    return Batcher(manager, manager._metrics, **options)


def submit(batcher, manager, seeds, name="m", **fields):
    handle = manager.get(name)
    raws = [GenerationRequest(prompt=fields.pop("prompt", "a circle"), seed=s, **fields) for s in seeds]
    validated = [handle.engine.validate(r) for r in raws]
    return batcher.submit(handle, raws, validated, timeout_s=TIMEOUT_S)


def test_compatible_requests_share_batches_up_to_the_limit(manager):
    batcher = make_batcher(manager)
    futures = submit(batcher, manager, range(10))
    done, _ = wait(futures, timeout=TIMEOUT_S)
    assert len(done) == 10
    assert manager.get("m").engine.batches == [4, 4, 2]
    for seed, future in enumerate(futures):
        outcome = future.result()
        assert outcome.seed == seed and outcome.image.getpixel((0, 0)) == seed_colour(seed)
        assert outcome.model_version == "m"
    batcher.stop()


def test_a_lone_request_into_a_quiet_server_does_not_wait_to_fill_a_batch(manager):
    # At low load waiting max_wait_ms buys no batch-mates, only latency: the request runs at once.
    batcher = make_batcher(manager, max_wait_ms=60_000)
    (future,) = submit(batcher, manager, [7])
    done, _ = wait([future], timeout=TIMEOUT_S)
    assert done and future.result().batch_size == 1
    batcher.stop()


def test_requests_arriving_during_a_batch_run_together_as_soon_as_it_ends(manager):
    engine = manager.get("m").engine
    engine.gate = threading.Event()
    batcher = make_batcher(manager, max_wait_ms=60_000)
    first = submit(batcher, manager, [0])  # runs at once and holds the device
    assert engine.entered.wait(TIMEOUT_S), "the first request never reached the engine"
    later = [submit(batcher, manager, [seed])[0] for seed in (1, 2, 3)]  # one at a time, as clients do
    engine.gate.set()
    done, _ = wait(first + later, timeout=TIMEOUT_S)
    assert len(done) == 4
    # They waited for the device, not for max_wait_ms, and shared one pass.
    assert engine.batches == [1, 3]
    batcher.stop()


def test_requests_that_cannot_share_a_pass_are_batched_apart(manager):
    batcher = make_batcher(manager)
    one_step = submit(batcher, manager, [1, 2], num_inference_steps=1)
    two_steps = submit(batcher, manager, [3, 4], num_inference_steps=2)
    wait(one_step + two_steps, timeout=TIMEOUT_S)
    assert sorted(manager.get("m").engine.batches) == [2, 2]
    assert {f.result().batch_size for f in one_step + two_steps} == {2}
    batcher.stop()


def test_cancelled_requests_are_dropped_before_their_batch_runs(manager):
    engine = manager.get("m").engine
    engine.gate = threading.Event()
    batcher = make_batcher(manager, max_batch_size=2, max_wait_ms=0)
    first = submit(batcher, manager, [1, 2])  # taken by the worker, held at the gate
    assert engine.entered.wait(TIMEOUT_S), "the first batch never reached the engine"
    gone = submit(batcher, manager, [3, 4])
    for future in gone:
        assert future.cancel()
    kept = submit(batcher, manager, [5])
    engine.gate.set()
    wait(first + kept, timeout=TIMEOUT_S)
    assert engine.batches == [2, 1]
    assert kept[0].result().seed == 5
    batcher.stop()


def test_an_engine_failure_fails_only_its_batch(loader):
    loader.engine_kwargs["fail_on"] = "boom"
    manager = ModelManager(models_root=None, metrics=Metrics(8), loader=loader)
    manager.load("m")
    batcher = make_batcher(manager, max_wait_ms=0)
    bad = submit(batcher, manager, [1], prompt="boom")
    wait(bad, timeout=TIMEOUT_S)
    good = submit(batcher, manager, [2])
    wait(good, timeout=TIMEOUT_S)
    assert isinstance(bad[0].exception(), EngineFailure)
    assert "Traceback" not in str(bad[0].exception())
    assert good[0].result().seed == 2
    batcher.stop()


def test_the_queue_is_bounded(manager):
    engine = manager.get("m").engine
    engine.gate = threading.Event()
    batcher = make_batcher(manager, max_batch_size=1, max_wait_ms=0, queue_limit=3)
    futures = submit(batcher, manager, [1])
    assert engine.entered.wait(TIMEOUT_S), "the first request never reached the engine"
    # The worker holds the first; three more fit in the queue.
    futures += submit(batcher, manager, [2, 3, 4])
    with pytest.raises(QueueFullError) as info:
        submit(batcher, manager, [5])
    assert int(info.value.headers["Retry-After"]) >= 1
    manager.get("m").engine.gate.set()
    wait(futures, timeout=TIMEOUT_S)
    assert all(f.result() for f in futures)
    batcher.stop()
    with pytest.raises(ShuttingDownError):
        submit(batcher, manager, [6])


def test_more_images_than_the_queue_can_ever_hold_is_a_client_error(manager):
    batcher = make_batcher(manager, queue_limit=3)
    with pytest.raises(InvalidRequestError, match="queue_limit"):
        submit(batcher, manager, range(4))
    batcher.stop()


def test_stop_runs_what_is_queued(manager):
    batcher = make_batcher(manager, max_wait_ms=5_000)
    futures = submit(batcher, manager, [1, 2])
    batcher.stop(timeout_s=TIMEOUT_S)
    assert all(f.done() and f.result() for f in futures)


def test_a_swap_keeps_in_flight_batches_on_the_old_engine(manager, loader):
    old = manager.get("m").engine
    old.gate = threading.Event()
    batcher = make_batcher(manager, max_wait_ms=0)
    running = submit(batcher, manager, [1])
    assert old.entered.wait(TIMEOUT_S), "the batch never reached the old engine"
    _, new_handle = manager.swap("m", "m2")
    assert new_handle.engine.warmed and not old.closed  # still leased by the running batch
    after = submit(batcher, manager, [2])  # validated by the new engine, queued behind the running batch
    old.gate.set()
    wait(running + after, timeout=TIMEOUT_S)
    assert running[0].result().model_version == "m"
    assert after[0].result().model_version == "m2"
    # Freed when its last batch ended, by a helper thread.
    wait_until(lambda: old.closed, timeout=TIMEOUT_S, message="the swapped-out engine was never closed")
    batcher.stop()


def test_requests_queued_across_a_swap_are_validated_again(manager, loader):
    loader.per_name["m2"] = {"allowed_steps": (1,)}
    manager.get("m").engine.gate = threading.Event()
    batcher = make_batcher(manager, max_batch_size=1, max_wait_ms=0)
    blocker = submit(batcher, manager, [0])
    assert loader.loaded[0].entered.wait(TIMEOUT_S), "the blocking batch never reached the engine"
    queued = submit(batcher, manager, [1], num_inference_steps=4)  # fine for m, not for m2
    manager.swap("m", "m2")
    manager.get("m").engine.gate = None
    loader.loaded[0].gate.set()
    wait(blocker + queued, timeout=TIMEOUT_S)
    assert isinstance(queued[0].exception(), InvalidRequestError)
    batcher.stop()


def test_unload_frees_the_engine_and_lists_what_is_left(manager):
    manager.load("other")
    engine = manager.get("m").engine
    manager.unload("m")
    assert engine.closed and manager.names() == ["other"] and manager.default == "other"
    with pytest.raises(ModelNotFoundError, match=r"\['other'\]"):
        manager.get("m")


def test_a_name_cannot_be_loaded_twice(manager):
    with pytest.raises(ModelConflictError):
        manager.load("m")


def test_loading_freezes_the_heap_and_closing_still_frees_an_engine_held_in_a_cycle(loader):
    # A full collection walking a loaded server's ~460,000 objects stalled a batch for 263 ms:
    # the manager freezes them at load. An engine it closes must still be collectable, even
    # one that only a reference cycle keeps alive (frozen objects are never collected).
    gc.unfreeze()
    manager = ModelManager(models_root=None, metrics=Metrics(8), loader=loader)
    manager.load("cyclic")
    assert gc.get_freeze_count() > 0
    engine = manager.get("cyclic").engine
    engine.myself = engine  # a cycle: refcounting alone never frees it
    ref = weakref.ref(engine)
    del engine
    loader.loaded.clear()  # the fake loader's record of what it built
    manager.unload("cyclic")
    assert ref() is None, "the closed engine was frozen out of the collector's reach"
    assert gc.get_freeze_count() > 0, "the heap stays frozen after a close"
