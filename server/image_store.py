"""A bounded, expiring in-memory store for images served by url (response_format=url).

Holds at most `capacity` images, each for `ttl_s` seconds; the oldest goes first when full.
Ids are unguessable (128 random bits), so the url is the only capability needed to fetch.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_at: float


class ImageStore:
    """Thread-safe LRU-by-insertion store with a time-to-live per entry."""

    def __init__(self, capacity: int, ttl_s: float, clock=time.monotonic):
        if capacity < 1:
            raise ValueError(f"`capacity` must be >= 1 but is {capacity}")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str) -> str:
        """Store `data` and return its id."""
        image_id = secrets.token_urlsafe(16)
        now = self._clock()
        with self._lock:
            self._evict_expired(now)
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)
            self._items[image_id] = StoredImage(data, media_type, now + self.ttl_s)
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        """The image, or None when unknown, evicted or expired."""
        now = self._clock()
        with self._lock:
            self._evict_expired(now)
            return self._items.get(image_id)

    def __len__(self) -> int:
        with self._lock:
            self._evict_expired(self._clock())
            return len(self._items)

    def _evict_expired(self, now: float) -> None:
        # Entries are in insertion order and share one ttl, so expiry order is insertion order.
        while self._items:
            image_id, item = next(iter(self._items.items()))
            if item.expires_at > now:
                break
            del self._items[image_id]
