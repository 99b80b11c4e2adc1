"""`flashstep serve --ray`: start (or join) Ray, deploy flashstep on Ray Serve, serve until a signal.

    serve_ray(settings)
      ray.init(settings.ray_address or a new local cluster)
      Serve's HTTP proxy on settings.host:settings.port (every node)
      apply the config of `ray_config.serve_config`: application `flashstep` (ingress + admin)
        and one `flashstep-model-<name>` per start-up model, each with settings.ray_replicas
        engine replicas; wait until all run
      block until SIGTERM or SIGINT
      a cluster started here: serve.shutdown() and ray.shutdown() (nothing of it outlives the process);
      a joined cluster: only flashstep's applications are deleted

The config is applied the way `serve deploy` applies a file, so admin actions (hot swap, load,
unload) are in-place updates of it; `serve status` and `serve config` show it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from flashstep.server.ray_config import INGRESS_APP, model_of_app, serve_config
from flashstep.server.settings import Settings

logger = logging.getLogger("flashstep.server")

DEPLOY_TIMEOUT_S = 900.0  # every start-up model loaded and warm on every replica
READY_TIMEOUT_S = 120.0  # then the ingress has described them (it polls Serve every second)
READY_POLL_S = 0.2
CONTROLLER_CHECK_S = 3.0
# A signal sent to the whole process group (a supervisor's killpg) stops Ray's own processes too;
# they are given this long to go before Serve is asked to drain.
CLUSTER_SETTLE_S = 1.0
CLUSTER_POLL_S = 0.1


def wait_ready(url: str, timeout_s: float) -> None:
    """Block until GET {url}/readyz answers 200; RuntimeError when it reports `failed`, TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as exc:  # 503 while loading: its body says how far
            body = json.loads(exc.read() or b"{}")
            if body.get("status") == "failed":
                raise RuntimeError(f"the server failed to load its models: {body.get('error')}") from None
        except OSError:
            pass  # the proxy is not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:g} s")
        time.sleep(READY_POLL_S)


def free_port(host: str) -> int:
    """A TCP port free on `host` now (Serve's proxy cannot take port 0 and report the one it got)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def merged_config(running: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """`ours` plus the running config's applications that are not flashstep's (a shared cluster keeps them)."""
    names = {app["name"] for app in ours["applications"]}
    others = [
        app
        for app in running.get("applications", [])
        if app["name"] not in names and app["name"] != INGRESS_APP and model_of_app(app["name"]) is None
    ]
    merged = {**ours, "applications": [*ours["applications"], *others]}
    if running.get("target_capacity") is not None:
        merged["target_capacity"] = running["target_capacity"]
    return merged


def deploy(settings: Settings) -> str:
    """Deploy flashstep on the Ray cluster this process is connected to; returns the HTTP base url.

    Starts Serve's proxy on settings.host:settings.port (a free port when 0) unless Serve runs
    already, and waits until every application runs and /readyz answers 200. Raises
    `ray_control.DeployFailedError` naming the application that failed, TimeoutError when
    that takes too long.
    """
    from ray import serve

    from flashstep.server.app import default_model, startup_models
    from flashstep.server.ray_control import apply, controller_client, running_config, wait_running

    models = startup_models(settings)
    if not models:
        raise ValueError(
            f"no models to serve: the models root {settings.models_root or '(shipped)'} holds none"
        )
    port = settings.port or free_port(settings.host)
    config = serve_config(settings, models, default_model(settings, models), port)
    serve.start(http_options=config["http_options"], proxy_location=config["proxy_location"])
    client = controller_client()
    if not settings.image_store_dir:
        logger.info(
            "image_store_dir not set: url images are kept under each node's Ray temp dir; "
            "set --image-store-dir to a shared path when ingress replicas run on several nodes"
        )
    apply(client, merged_config(running_config(client), config))
    wait_running([app["name"] for app in config["applications"]], DEPLOY_TIMEOUT_S)
    http = client.http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::") else http.host
    url = f"http://{host}:{http.port}"
    wait_ready(url, READY_TIMEOUT_S)
    logger.info("ready on Ray Serve: url=%s models=%s replicas=%d", url, models, settings.ray_replicas)
    return url


class StopSignal(Exception):
    """SIGTERM or SIGINT arrived: stop serving (raised in the main thread by the signal handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, the first SIGTERM or SIGINT raises StopSignal wherever the main thread is
    (deploying or idle); later ones are ignored, so a second Ctrl-C cannot cut the shutdown short.

    Installed after `ray.init`, replacing the driver's handlers that Ray set, which would abort.
    """
    raised = False

    def handler(signum, frame) -> None:
        nonlocal raised
        if raised:
            logger.info("already stopping: %s ignored", signal.Signals(signum).name)
            return
        raised = True
        raise StopSignal(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def gcs_listening() -> bool:
    """Whether the cluster's GCS accepts connections (a TCP connect: no Ray call that could hang on it)."""
    import ray

    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def cluster_stays_up(settle_s: float) -> bool:
    """False when the GCS stops listening within `settle_s`: Ray is going down with us."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if not gcs_listening():
            return False
        time.sleep(CLUSTER_POLL_S)
    return True


def shut_down(started_here: bool) -> None:
    """Stop what `serve_ray` started: the whole local cluster, or only flashstep's applications."""
    import ray
    from ray import serve

    from flashstep.server.ray_control import controller_alive

    try:
        if not (cluster_stays_up(CLUSTER_SETTLE_S) and controller_alive(CONTROLLER_CHECK_S)):
            # The signal reached the whole process group (a supervisor's killpg): Ray's own
            # processes are stopping already and Serve calls would wait on them in vain.
            logger.warning("Ray's processes are stopping already; disconnecting without draining Serve")
        elif started_here:
            serve.shutdown()
        else:
            ours = [name for name in serve.status().applications if name == INGRESS_APP or model_of_app(name)]
            for name in ours:
                serve.delete(name)
    finally:
        ray.shutdown()


def serve_ray(settings: Settings) -> int:
    """Serve flashstep on Ray Serve until SIGTERM/SIGINT; returns the exit status (0, or 1 if deploying failed)."""
    import ray

    from flashstep.server.ray_control import DeployFailedError

    started_here = settings.ray_address is None
    ray.init(address=settings.ray_address or "local")
    with stop_on_signals():
        try:
            deploy(settings)
            while True:
                signal.pause()  # until a signal: its handler raises StopSignal
        except StopSignal as stop:
            logger.info("stopping on %s", stop)
            return 0
        except (DeployFailedError, TimeoutError, RuntimeError, ValueError) as exc:
            logger.error("could not deploy flashstep on Ray Serve: %s", exc)
            return 1
        finally:
            shut_down(started_here)
            logger.info("Ray Serve stopped%s", "; local Ray cluster shut down" if started_here else "")
