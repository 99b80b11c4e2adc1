"""Stores for images served by url (response_format=url): in memory (default) or in a shared folder.

Both backends keep the same rules:

- bounded by bytes (`max_bytes`: image bytes plus a fixed charge per image, so a flood of tiny
  images is bounded too), and each image expires `ttl_s` seconds after it was stored;
- fair: a client (see `server/request_origin.py`) may hold at most `client_bytes`. A client over
  its share evicts its own oldest images; another client's image is never evicted before it
  expires. When the store is full of other clients' unexpired images a put is refused
  (`ImageStoreFullError`, 503 with Retry-After) rather than breaking urls already handed out;
- all or nothing per request: `put_many` stores every image of a response or none of them, and
  never evicts an image of the same call, so a response never carries a dead url;
- ids are unguessable (`secrets.token_urlsafe`, 128 bits), so the url is the only capability
  needed to fetch; `is_valid_id` is checked before any lookup, so an id can never name a path.

`DirectoryImageStore` keeps each image as a file named `<id>.<client>.<order>.<ext>` (the
metadata is in the name; `order` is a wall-clock nanosecond stamp that breaks mtime ties), written atomically (temporary file + rename), expiring by mtime, with puts serialised
by an flock on `.lock`, so several server processes or replicas on one host (or a filesystem
with working flock) share one store. Lookups and puts scan the folder: fine for the tens of
thousands of images a default budget holds, not for millions.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from flashstep.server.errors import ClientShareError, ImageStoreFullError

# Bookkeeping each image costs besides its bytes (dict entries, or a file's inode and directory
# entry); without it a client storing 100-byte images could hold millions of entries.
ENTRY_OVERHEAD_BYTES = 1024
ID_BYTES = 16  # token_urlsafe(16): 22 characters of [A-Za-z0-9_-]
_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
_CLIENT_PATTERN = re.compile(r"[0-9a-f]{1,64}")
_ORDER_PATTERN = re.compile(r"[0-9a-f]{1,20}")
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
MEDIA_TYPES = {ext: media for media, ext in EXTENSIONS.items()}

Clock = Callable[[], float]


def is_valid_id(image_id: str) -> bool:
    """True for ids this store could have made; anything else (paths, dots, slashes) is unknown."""
    return _ID_PATTERN.fullmatch(image_id) is not None


def new_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires_at: float


@dataclass(frozen=True)
class Limits:
    """max_bytes: the whole store; client_bytes: what one client may hold; ttl_s: each image's life."""

    max_bytes: int
    client_bytes: int
    ttl_s: float

    @classmethod
    def of(cls, max_bytes: int, client_share: float, ttl_s: float) -> Limits:
        if max_bytes < ENTRY_OVERHEAD_BYTES:
            raise ValueError(f"`max_bytes` must be >= {ENTRY_OVERHEAD_BYTES} but is {max_bytes}")
        if not 0.0 < client_share <= 1.0:
            raise ValueError(f"`client_share` must be in (0, 1] but is {client_share}")
        if not ttl_s > 0:
            raise ValueError(f"`ttl_s` must be > 0 but is {ttl_s}")
        return cls(max_bytes, max(ENTRY_OVERHEAD_BYTES, int(max_bytes * client_share)), float(ttl_s))


def charge(data: bytes) -> int:
    """Bytes one image counts against the bounds."""
    return len(data) + ENTRY_OVERHEAD_BYTES


@runtime_checkable
class ImageStore(Protocol):
    """What the url routes need of a store."""

    limits: Limits

    def put_many(self, blobs: list[bytes], media_type: str, client: str) -> list[str]:
        """Store every blob for `client` and return their ids, or raise and store none."""
        ...

    def get(self, image_id: str) -> StoredImage | None:
        """The image, or None when unknown, malformed or expired."""
        ...

    def nbytes(self) -> int:
        """Bytes charged by the unexpired images."""
        ...

    def __len__(self) -> int: ...


def plan_evictions(
    new_bytes: int,
    *,
    client: str,
    total_bytes: int,
    own_bytes: int,
    own_oldest_first: Iterable[tuple[str, int]],
    all_by_expiry: Callable[[], Iterable[tuple[float, str, int]]],
    limits: Limits,
    now: float,
) -> list[str]:
    """Ids of `client`'s own images to evict so `new_bytes` more fit, or raise (nothing evicted).

    own_oldest_first: (id, charged bytes) of the client's unexpired images, oldest first.
    all_by_expiry: (expires_at, client, charged bytes) of every unexpired image, soonest first;
    read only to compute Retry-After when the store is full.
    """
    if new_bytes > limits.client_bytes:
        raise ClientShareError(
            f"this request's images take {new_bytes} bytes but one client may keep at most "
            f"{limits.client_bytes} in the image store (FLASHSTEP_IMAGE_STORE_CLIENT_SHARE); "
            "ask for fewer images or use response_format=b64_json",
            param="n",
        )
    evict: list[str] = []
    own = iter(own_oldest_first)
    while own_bytes + new_bytes > limits.client_bytes or total_bytes + new_bytes > limits.max_bytes:
        oldest = next(own, None)
        if oldest is None:
            break
        evict.append(oldest[0])
        own_bytes -= oldest[1]
        total_bytes -= oldest[1]
    if total_bytes + new_bytes <= limits.max_bytes:
        return evict
    # Full of other clients' images: wait for enough of them to expire rather than evict them.
    missing, wait_s = total_bytes + new_bytes - limits.max_bytes, limits.ttl_s
    for expires_at, owner, nbytes in all_by_expiry():
        if owner == client:
            continue  # already counted as evicted above
        missing -= nbytes
        if missing <= 0:
            wait_s = expires_at - now
            break
    retry_after = max(1, math.ceil(wait_s))
    raise ImageStoreFullError(
        f"the image store (response_format=url) is full of other clients' unexpired images; "
        f"retry in {retry_after} s or use response_format=b64_json",
        headers={"Retry-After": str(retry_after)},
    )


@dataclass(frozen=True)
class _Entry:
    image: StoredImage
    client: str
    nbytes: int


class MemoryImageStore:
    """The default backend: one process's memory, thread-safe."""

    def __init__(self, limits: Limits, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        # Every image shares one ttl, so insertion order is expiry order.
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._by_client: dict[str, OrderedDict[str, None]] = {}
        self._client_bytes: dict[str, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put_many(self, blobs: list[bytes], media_type: str, client: str) -> list[str]:
        now = self._clock()
        new_bytes = sum(charge(b) for b in blobs)
        with self._lock:
            self._evict_expired(now)
            own = self._by_client.get(client, OrderedDict())
            evict = plan_evictions(
                new_bytes,
                client=client,
                total_bytes=self._bytes,
                own_bytes=self._client_bytes.get(client, 0),
                own_oldest_first=((i, self._items[i].nbytes) for i in own),
                all_by_expiry=lambda: ((e.image.expires_at, e.client, e.nbytes) for e in self._items.values()),
                limits=self.limits,
                now=now,
            )
            for image_id in evict:
                self._remove(image_id)
            ids = []
            for blob in blobs:
                image_id = new_id()
                self._add(image_id, _Entry(StoredImage(blob, media_type, now + self.limits.ttl_s), client, charge(blob)))
                ids.append(image_id)
            return ids

    def put(self, data: bytes, media_type: str, client: str = "") -> str:
        """Store one image; see `put_many`."""
        return self.put_many([data], media_type, client)[0]

    def get(self, image_id: str) -> StoredImage | None:
        if not is_valid_id(image_id):
            return None
        with self._lock:
            self._evict_expired(self._clock())
            entry = self._items.get(image_id)
            return None if entry is None else entry.image

    def nbytes(self) -> int:
        with self._lock:
            self._evict_expired(self._clock())
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            self._evict_expired(self._clock())
            return len(self._items)

    def _add(self, image_id: str, entry: _Entry) -> None:
        self._items[image_id] = entry
        self._by_client.setdefault(entry.client, OrderedDict())[image_id] = None
        self._client_bytes[entry.client] = self._client_bytes.get(entry.client, 0) + entry.nbytes
        self._bytes += entry.nbytes

    def _remove(self, image_id: str) -> None:
        entry = self._items.pop(image_id)
        own = self._by_client[entry.client]
        del own[image_id]
        self._client_bytes[entry.client] -= entry.nbytes
        if not own:  # forget idle clients, or their keys would pile up
            del self._by_client[entry.client]
            del self._client_bytes[entry.client]
        self._bytes -= entry.nbytes

    def _evict_expired(self, now: float) -> None:
        while self._items:
            image_id, entry = next(iter(self._items.items()))
            if entry.image.expires_at > now:
                break
            self._remove(image_id)


@dataclass(frozen=True)
class _File:
    path: Path
    image_id: str
    client: str
    nbytes: int
    stored_at: float
    order: int


class DirectoryImageStore:
    """Images as files in `folder`, shared by every store instance (and process) over that folder.

    The clock must be wall time (the default), since expiry reads file mtimes that other
    processes wrote; tests pass a fake one and every instance over a folder must share it.
    """

    def __init__(self, folder: Path, limits: Limits, clock: Clock = time.time) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self._clock = clock
        self._lock_path = self.folder / ".lock"
        self._thread_lock = threading.Lock()  # flock is per open file; threads of one process queue here
        self._last_order = 0

    def put_many(self, blobs: list[bytes], media_type: str, client: str) -> list[str]:
        if _CLIENT_PATTERN.fullmatch(client) is None:
            raise ValueError(f"`client` must be a lowercase hex digest but is {client!r}")
        ext = EXTENSIONS.get(media_type)
        if ext is None:
            raise ValueError(f"`media_type` must be one of {sorted(EXTENSIONS)} but is {media_type!r}")
        new_bytes = sum(charge(b) for b in blobs)
        with self._locked():
            now = self._clock()
            files = self._scan(now, remove_expired=True)
            own = sorted((f for f in files if f.client == client), key=lambda f: (f.stored_at, f.order))
            by_id = {f.image_id: f for f in files}
            evict = plan_evictions(
                new_bytes,
                client=client,
                total_bytes=sum(f.nbytes for f in files),
                own_bytes=sum(f.nbytes for f in own),
                own_oldest_first=((f.image_id, f.nbytes) for f in own),
                all_by_expiry=lambda: (
                    (f.stored_at + self.limits.ttl_s, f.client, f.nbytes)
                    for f in sorted(files, key=lambda f: (f.stored_at, f.order))
                ),
                limits=self.limits,
                now=now,
            )
            for image_id in evict:
                by_id[image_id].path.unlink(missing_ok=True)
            return [self._write(blob, client, ext, now) for blob in blobs]

    def put(self, data: bytes, media_type: str, client: str = "0") -> str:
        """Store one image; see `put_many`."""
        return self.put_many([data], media_type, client)[0]

    def get(self, image_id: str) -> StoredImage | None:
        if not is_valid_id(image_id):
            return None
        now = self._clock()
        for entry in self._entries():
            name = entry.name
            if not name.startswith(image_id + "."):
                continue
            parsed = _parse_name(name)
            if parsed is None:
                return None
            try:
                stored_at = entry.stat().st_mtime
                if stored_at + self.limits.ttl_s <= now:
                    return None
                data = Path(entry.path).read_bytes()
            except FileNotFoundError:  # evicted or expired by another process meanwhile
                return None
            return StoredImage(data, MEDIA_TYPES[parsed[3]], stored_at + self.limits.ttl_s)
        return None

    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._scan(self._clock(), remove_expired=False))

    def __len__(self) -> int:
        return len(self._scan(self._clock(), remove_expired=False))

    def _write(self, blob: bytes, client: str, ext: str, now: float) -> str:
        image_id = new_id()
        tmp = self.folder / f".tmp-{image_id}"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.utime(tmp, (now, now))  # expiry reads mtime, on the store's clock
        # Several images of one put share `now`; the stamp keeps "oldest first" exact among them.
        self._last_order = max(self._last_order + 1, time.time_ns())
        os.replace(tmp, self.folder / f"{image_id}.{client}.{self._last_order:x}.{ext}")  # readers never see a partial file
        return image_id

    def _entries(self) -> Iterator[os.DirEntry]:
        with os.scandir(self.folder) as it:
            yield from it

    def _scan(self, now: float, *, remove_expired: bool) -> list[_File]:
        """Unexpired images; with `remove_expired`, expired ones and stale temporary files are deleted."""
        files = []
        for entry in self._entries():
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            expired = stat.st_mtime + self.limits.ttl_s <= now
            if entry.name.startswith(".tmp-"):
                if expired and remove_expired:  # left by a process that died mid-write
                    Path(entry.path).unlink(missing_ok=True)
                continue
            parsed = _parse_name(entry.name)
            if parsed is None:
                continue  # not ours (.lock, or a stranger's file): never counted, never deleted
            if expired:
                if remove_expired:
                    Path(entry.path).unlink(missing_ok=True)
                continue
            image_id, client, order, _ = parsed
            nbytes = stat.st_size + ENTRY_OVERHEAD_BYTES
            files.append(_File(Path(entry.path), image_id, client, nbytes, stat.st_mtime, int(order, 16)))
        return files

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
                yield
            finally:
                os.close(fd)


def _parse_name(name: str) -> tuple[str, str, str, str] | None:
    """(id, client, order, extension) of a stored image's file name, or None for any other file."""
    parts = name.split(".")
    if len(parts) != 4:
        return None
    image_id, client, order, ext = parts
    if (
        not is_valid_id(image_id) or _CLIENT_PATTERN.fullmatch(client) is None
        or _ORDER_PATTERN.fullmatch(order) is None or ext not in MEDIA_TYPES
    ):  # fmt: skip
        return None
    return image_id, client, order, ext


def open_image_store(
    *, max_bytes: int, client_share: float, ttl_s: float, folder: Path | None = None, clock: Clock | None = None
) -> MemoryImageStore | DirectoryImageStore:
    """The store the settings describe: a folder when one is given, else memory."""
    limits = Limits.of(max_bytes, client_share, ttl_s)
    if folder is None:
        return MemoryImageStore(limits, clock or time.monotonic)
    return DirectoryImageStore(folder, limits, clock or time.time)
