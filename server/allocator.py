"""Map model weights outside glibc's heap, so a swapped-out or unloaded model gives its memory back.

glibc serves allocations above its mmap threshold with their own `mmap` and unmaps them on `free`,
but by default it raises that threshold to the size of every mapped block freed (up to 32 MiB).
After the first model is freed, weight-sized tensors then come from the heap, interleaved with the
batches' short-lived buffers, and a later swap's freed weights stay in the process as holes it
cannot return: measured as about 25 MiB of RSS per hot swap under load, without end.

Pinning a low threshold for the whole process fixes that but maps and unmaps every mid-sized
activation on every forward pass (18 % fewer requests served in the same soak). So the threshold
is low (4 KiB by default, so a small model's biases and norms are mapped too) only while a model loads (`mapped_while_loading`, around the model manager's loads), when
the weights are allocated, and pinned at glibc's own ceiling the rest of the time, when batches
reuse heap memory as before. Pinning also stops the dynamic raise, which is what made the heap
hold the weights.

Only for glibc Linux, and only after `configure` (called once by `flashstep serve`, never at
import); elsewhere, or when the operator set MALLOC_MMAP_THRESHOLD_ themselves, it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
import threading
from collections.abc import Iterator

logger = logging.getLogger("flashstep.server")

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
SERVING_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: its own ceiling

_lock = threading.Lock()
_state = {"libc": None, "load_threshold": 0, "loads": 0}


def _mallopt(libc: ctypes.CDLL, nbytes: int) -> bool:
    return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(nbytes)))


def configure(load_threshold: int) -> bool:
    """Map allocations above `load_threshold` bytes while models load (0: leave glibc alone).

    True when applied: the serving threshold is pinned now, the loading one during each load.
    """
    if load_threshold <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    with _lock:
        if not _mallopt(libc, SERVING_THRESHOLD):
            return False
        _state.update(libc=libc, load_threshold=load_threshold)
    logger.info("model weights mapped while loading: threshold_bytes=%d serving_bytes=%d", load_threshold, SERVING_THRESHOLD)
    return True


@contextlib.contextmanager
def mapped_while_loading() -> Iterator[None]:
    """Inside: allocations above the loading threshold get their own mapping (no-op unless configured).

    Loads may overlap (an admin load beside a swap): the low threshold holds until the last ends.
    """
    with _lock:
        libc = _state["libc"]
        if libc is not None:
            _state["loads"] += 1
            if _state["loads"] == 1:
                _mallopt(libc, _state["load_threshold"])
    try:
        yield
    finally:
        if libc is not None:
            with _lock:
                _state["loads"] -= 1
                if _state["loads"] == 0:
                    _mallopt(libc, SERVING_THRESHOLD)
