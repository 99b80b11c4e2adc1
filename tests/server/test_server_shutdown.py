"""`python -m flashstep.server` as a real process: flags, startup, and SIGTERM letting in-flight requests finish."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import metric_value, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
REQUESTS, IMAGES_EACH = 4, 10  # 40 images, one per batch: seconds of queued work
TOTAL = REQUESTS * IMAGES_EACH


def _read_port(process: subprocess.Popen, lines: list[str]) -> int:
    """Follow the server's log until uvicorn says which port it bound."""
    found: dict[str, int] = {}
    ready = threading.Event()

    def pump() -> None:
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if match:
                found["port"] = int(match.group(1))
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S):
        raise RuntimeError("server did not start:\n" + "".join(lines[-30:]))
    return found["port"]


def test_sigterm_lets_in_flight_requests_finish(models_root):
    command = [
        sys.executable, "-m", "flashstep.server", "--models-root", str(models_root), "--models", "teacher",
        "--port", "0", "--max-batch-size", "1", "--max-wait-ms", "0", "--log-level", "info",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHSTEP_ADMIN_TOKEN": ""}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        url = f"http://127.0.0.1:{_read_port(process, lines)}"
        wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200,
            timeout=START_TIMEOUT_S,
            message="server never became ready",
        )

        def generate(i: int) -> httpx.Response:
            body = {"prompt": "a pink circle", "n": IMAGES_EACH, "seed": 100 * i}
            return httpx.post(f"{url}/generate", json=body, timeout=120)

        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = [pool.submit(generate, i) for i in range(REQUESTS)]
            # Every request is in the batcher once made + queued images account for all but the
            # one a worker may hold; SIGTERM then lands while most of the work is still queued.
            with httpx.Client(base_url=url, timeout=5) as probe:

                def all_queued() -> tuple[float] | None:
                    """(images made so far,) once every image is made, queued or held by a worker."""
                    made = metric_value(url, "flashstep_images_generated_total", model="teacher")
                    return (made,) if made + probe.get("/readyz").json()["queue_depth"] >= TOTAL - 1 else None

                (made,) = wait_until(all_queued, timeout=60, message="requests never queued")
            process.send_signal(signal.SIGTERM)
            assert made < TOTAL - IMAGES_EACH, "the work finished before SIGTERM: nothing was in flight"
            responses = [f.result() for f in futures]

        assert [r.status_code for r in responses] == [200] * REQUESTS, [r.text[:200] for r in responses]
        assert all(len(r.json()["images"]) == IMAGES_EACH for r in responses)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = "".join(lines)
        assert "Traceback" not in log, log[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
