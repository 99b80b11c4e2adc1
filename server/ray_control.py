"""Reading and applying the Serve config, and waiting for applications: the calls to Serve's controller.

`flashstep serve --ray` deploys, and the admin deployment edits, the cluster's *declarative*
config -- the same path as `serve deploy` and `serve run config.yaml` -- because only there does
Serve apply a changed `user_config` in place (the replicas' `reconfigure`), without restarting
them; an application deployed with `serve.run` gets new replicas on every deploy.

Serve exposes no public Python call for this, so the functions here use the controller client
that Serve's own CLI uses (`ServeControllerClient.deploy_apps`, `get_serve_details`), checked
against ray[serve] 2.60; this is the one module to revisit on a Ray upgrade.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ray import serve
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

# How often `wait_running` looks at the applications' status.
STATUS_POLL_S = 0.2


def last_line(message: str | None) -> str:
    """The last non-empty line of a Serve status message: for a traceback, the exception itself."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class DeployFailedError(RuntimeError):
    """An application went to DEPLOY_FAILED; `reason` says why (its failing deployment's error when known)."""

    def __init__(self, app: str, reason: str):
        self.app = app
        self.reason = reason or "no reason given"
        super().__init__(f"application {app!r} failed to deploy: {self.reason}")

    @classmethod
    def of(cls, name: str, app) -> DeployFailedError:
        """From an `ApplicationStatusOverview`: the replicas' error beats the application's summary."""
        failed = [
            last_line(d.message) for d in app.deployments.values() if d.status != "HEALTHY" and d.message
        ]
        return cls(name, next((reason for reason in failed if reason), last_line(app.message)))


def controller_client():
    """The client of the cluster's Serve controller (Serve must be running; ray initialised)."""
    from ray.serve.context import _get_global_client

    return _get_global_client()


def controller_alive(timeout_s: float) -> bool:
    """Whether Serve's controller answers within `timeout_s` (it is gone when a signal hit the whole process group)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        ray.get(controller.check_alive.remote(), timeout=timeout_s)
    except Exception:
        return False
    return True


def running_config(client) -> dict[str, Any]:
    """The declarative config now applied (a `ServeDeploySchema` dict), applications being deleted left out.

    Applications deployed with `serve.run` have no config and are not listed; applying the
    result leaves them alone.
    """
    details = client.get_serve_details()
    applications = [
        app["deployed_app_config"]
        for app in details.get("applications", {}).values()
        if app.get("deployed_app_config") and app.get("status") != ApplicationStatus.DELETING
    ]
    config: dict[str, Any] = {"applications": applications}
    if details.get("target_capacity") is not None:
        config["target_capacity"] = details["target_capacity"]
    return config


def apply(client, config: dict[str, Any]) -> None:
    """Apply `config` as the cluster's whole declarative config (what `serve deploy` does).

    Applications whose import path and args are unchanged are updated in place; declarative
    applications missing from `config` are deleted.
    """
    client.deploy_apps(ServeDeploySchema.model_validate(config))


def wait_running(apps: Iterable[str], timeout_s: float) -> None:
    """Block until every application in `apps` is RUNNING.

    Raises DeployFailedError as soon as one fails to deploy, TimeoutError after `timeout_s`.
    Call it right after `apply`: Serve marks a changed application DEPLOYING before `apply`
    returns, so a RUNNING seen here is the new config's.
    """
    waiting = set(apps)
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        for name in list(waiting):
            app = statuses.get(name)
            if app is None:
                continue
            if app.status == ApplicationStatus.DEPLOY_FAILED:
                raise DeployFailedError.of(name, app)
            if app.status == ApplicationStatus.RUNNING:
                waiting.discard(name)
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications {sorted(waiting)} were not running after {timeout_s:g} s")
        time.sleep(STATUS_POLL_S)
