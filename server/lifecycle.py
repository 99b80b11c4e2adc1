"""Where the server is in its life: loading, ready, failed, shutting down.

Set by the lifespan (loading, ready, failed) and by the SIGTERM handler (shutting down); read
by /readyz and by the generation routes, which refuse new work with 503 once shutting down.
"""

from __future__ import annotations

import threading
from enum import StrEnum


class Phase(StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    SHUTTING_DOWN = "shutting_down"


class Lifecycle:
    """Thread-safe phase of the server, with the reason when loading failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase = Phase.STARTING
        self.error: str | None = None

    @property
    def phase(self) -> Phase:
        with self._lock:
            return self._phase

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def shutting_down(self) -> bool:
        return self.phase is Phase.SHUTTING_DOWN

    def set(self, phase: Phase, error: str | None = None) -> None:
        """Move to `phase`; nothing leaves SHUTTING_DOWN."""
        with self._lock:
            if self._phase is not Phase.SHUTTING_DOWN:
                self._phase = phase
                self.error = error

    def begin_shutdown(self) -> None:
        self.set(Phase.SHUTTING_DOWN)
