"""Spec of `serve_ray` as a command (`python -m flashstep.server --ray`, what `flashstep serve --ray`
runs): it starts a local Ray cluster, serves until SIGTERM, then stops with nothing of the cluster
left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

from tests.scaleout.waiting import WAIT_S, wait_until  # noqa: E402

START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    from flashstep.models.flashstep_config import FlashstepConfig
    from flashstep.training.architecture import ShapesArch
    from flashstep.training.export import export_random

    root = tmp_path_factory.mktemp("models")
    export_random(
        root / "swift", FlashstepConfig(family="swiftbrush", resolution=64), arch=ShapesArch.tiny(), seed=2
    )
    return root


def test_serve_ray_serves_until_sigterm_and_leaves_no_ray_process_behind(models_root, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    argv = [
        sys.executable, "-m", "flashstep.server", "--ray", "--host", "127.0.0.1", "--port", str(port),
        "--models-root", str(models_root), "--models", "swift", "--replicas", "1", "--cpus-per-replica", "0.5",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"serve_ray exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
                    )
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, timeout=START_TIMEOUT_S, message="serve_ray never became ready")
            answer = client.post("/generate", json={"prompt": "a red circle", "seed": 1})
            assert answer.status_code == 200 and answer.headers["X-Flashstep-Worker"].startswith(
                "flashstep-model-swift#"
            )

        cluster = psutil.Process(process.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in cluster), "no local Ray cluster was started"
        process.send_signal(signal.SIGTERM)  # the driver only, as a container runtime does
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0

        def gone(p: psutil.Process) -> bool:
            try:
                return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(
            lambda: all(gone(p) for p in cluster), timeout=WAIT_S, message="Ray processes outlived serve_ray"
        )
        log = log_path.read_text()
        assert "stopping on SIGTERM" in log and "local Ray cluster shut down" in log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)
