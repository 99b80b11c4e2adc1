"""The shape of flashstep on Ray Serve, as data: application names, deployment options, the config.

One Serve application per model plus one for HTTP:

    flashstep                      ingress (FastAPI, route_prefix "/") + admin (applies config changes)
    flashstep-model-<name>         one engine deployment: replicas of one checkpoint, @serve.batch

Everything here is plain data (dicts shaped like `ray.serve.schema.ServeDeploySchema`), so the
same functions write the config `flashstep serve --ray` deploys, check deploy/ray/serve_config.yaml,
and let the admin deployment edit the running config (add or remove a model's application,
change an engine's `user_config` for a hot swap, or the ingress's default model) -- each such
edit is an in-place update Serve applies without restarting the other applications.
Nothing here imports ray.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from flashstep.server.settings import Settings

INGRESS_APP = "flashstep"
MODEL_APP_PREFIX = "flashstep-model-"
INGRESS_DEPLOYMENT = "FlashstepIngress"
ADMIN_DEPLOYMENT = "FlashstepAdmin"
ENGINE_DEPLOYMENT = "FlashstepEngine"
INGRESS_IMPORT_PATH = "flashstep.server.ray_app:ingress_app"
ENGINE_IMPORT_PATH = "flashstep.server.ray_app:engine_app"
ADMIN_TOKEN_ENV = "FLASHSTEP_ADMIN_TOKEN"

# Settings that say how to reach or run the cluster, not how an application serves: never in `args`.
NOT_APPLICATION_SETTINGS = {"admin_token", "host", "port", "ray", "ray_address", "workers"}
# An engine replica holds one batch running and one filling; more waits at the caller (the ingress).
ONGOING_BATCHES_PER_REPLICA = 2
# Serve retries a failing replica constructor this often; a checkpoint that fails to load fails fast.
ENGINE_CONSTRUCTOR_RETRIES = 3
# The ingress only awaits: it holds many requests at once (more wait in the proxy).
INGRESS_ONGOING_PER_QUEUE_SLOT = 2


def send_logs_to_serve(log_level: str) -> None:
    """In a replica: write flashstep's log lines through Serve's handlers, into the replica's log file.

    Serve configures only its own logger ("ray.serve") in a replica; without this, flashstep's
    INFO lines (model loaded, swapped, ready) would be dropped and its warnings would land in a
    worker's stderr file instead of the replica's log beside its request lines.
    """
    ours, serves = logging.getLogger("flashstep"), logging.getLogger("ray.serve")
    ours.setLevel(log_level.upper())
    ours.handlers = list(serves.handlers)
    ours.propagate = False


def model_app_name(model: str) -> str:
    """The Serve application that serves `model`."""
    if not model or "#" in model or "/" in model:
        raise ValueError(
            f"`model` must be a name without '#' or '/' to become a Serve application but is {model!r}"
        )
    return MODEL_APP_PREFIX + model


def model_of_app(app_name: str) -> str | None:
    """The model an application serves, or None for an application that is not a flashstep model."""
    if app_name.startswith(MODEL_APP_PREFIX) and len(app_name) > len(MODEL_APP_PREFIX):
        return app_name[len(MODEL_APP_PREFIX) :]
    return None


def builder_args(settings: Settings) -> dict[str, Any]:
    """The settings an application builder needs, as JSON (`args` of a config application).

    Only the fields that were set (flags, environment), so the config reads short; never the
    admin token (it travels in the ingress's `runtime_env`, see `ingress_app_config`).
    """
    return settings.model_dump(mode="json", exclude_unset=True, exclude=NOT_APPLICATION_SETTINGS)


def engine_options(settings: Settings, model: str) -> dict[str, Any]:
    """`Deployment.options` of one model's engine deployment."""
    max_replicas = settings.ray_max_replicas or settings.ray_replicas
    return {
        "name": ENGINE_DEPLOYMENT,
        "ray_actor_options": {
            "num_cpus": settings.ray_cpus_per_replica,
            "num_gpus": settings.ray_gpus_per_replica,
        },
        "autoscaling_config": {
            "min_replicas": settings.ray_replicas,
            "initial_replicas": settings.ray_replicas,
            "max_replicas": max_replicas,
            # A replica is busy enough when it has a full batch to run: scale out past that.
            "target_ongoing_requests": settings.max_batch_size,
        },
        "max_ongoing_requests": ONGOING_BATCHES_PER_REPLICA * settings.max_batch_size,
        # Per caller (each ingress replica's handle); past it Serve raises BackPressureError -> 429.
        "max_queued_requests": settings.queue_limit,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_s,
        "max_constructor_retry_count": ENGINE_CONSTRUCTOR_RETRIES,
        "user_config": {"path": model, "revision": 0},
    }


def ingress_options(settings: Settings) -> dict[str, Any]:
    """`Deployment.options` of the ingress: no CPU reserved (it awaits), many requests at once."""
    return {
        "name": INGRESS_DEPLOYMENT,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": INGRESS_ONGOING_PER_QUEUE_SLOT * settings.queue_limit,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_s,
        "user_config": {"default_model": settings.default_model},
    }


def admin_options() -> dict[str, Any]:
    """`Deployment.options` of the admin deployment: one replica, one action at a time.

    With `max_ongoing_requests=1` Serve itself queues admin actions from every ingress replica,
    so two read-modify-write edits of the config never interleave.
    """
    return {
        "name": ADMIN_DEPLOYMENT,
        "num_replicas": 1,
        "max_ongoing_requests": 1,
        "ray_actor_options": {"num_cpus": 0},
    }


def ingress_app_config(settings: Settings, default_model: str | None) -> dict[str, Any]:
    """The `flashstep` application: HTTP routes, the admin deployment, the default model."""
    app: dict[str, Any] = {
        "name": INGRESS_APP,
        "route_prefix": "/",
        "import_path": INGRESS_IMPORT_PATH,
        "args": builder_args(settings),
        "deployments": [{"name": INGRESS_DEPLOYMENT, "user_config": {"default_model": default_model}}],
    }
    if settings.admin_token is not None:
        app["runtime_env"] = {"env_vars": {ADMIN_TOKEN_ENV: settings.admin_token.get_secret_value()}}
    return app


def model_app_config(settings: Settings, model: str, path: str, revision: int = 0) -> dict[str, Any]:
    """The application serving `model` from `path` (a name or a folder under the models root)."""
    return {
        "name": model_app_name(model),
        "route_prefix": None,
        "import_path": ENGINE_IMPORT_PATH,
        "args": {**builder_args(settings), "model": model},
        "deployments": [{"name": ENGINE_DEPLOYMENT, "user_config": {"path": path, "revision": revision}}],
    }


def serve_config(
    settings: Settings, models: list[str], default_model: str | None, port: int
) -> dict[str, Any]:
    """The whole deploy config (`ServeDeploySchema`): HTTP on settings.host:`port`, the ingress, each model."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": port},
        "applications": [
            ingress_app_config(settings, default_model),
            *(model_app_config(settings, model, model) for model in models),
        ],
    }


# ----- editing a config (the admin deployment) -----


def model_apps(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """model name -> its application, in config order."""
    found = {}
    for app in config.get("applications", []):
        model = model_of_app(app["name"])
        if model is not None:
            found[model] = app
    return found


def find_app(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((app for app in config.get("applications", []) if app["name"] == name), None)


def deployment_user_config(app: dict[str, Any], deployment: str) -> dict[str, Any] | None:
    """The `user_config` the config sets for `deployment` of `app`, or None when it sets none."""
    for entry in app.get("deployments") or []:
        if entry.get("name") == deployment and "user_config" in entry:
            return entry["user_config"]
    return None


def with_deployment_user_config(
    app: dict[str, Any], deployment: str, user_config: dict[str, Any]
) -> dict[str, Any]:
    """A copy of `app` whose `deployment` gets `user_config` (its other options kept)."""
    app = copy.deepcopy(app)
    entries = app.setdefault("deployments", []) or []
    app["deployments"] = entries
    for entry in entries:
        if entry.get("name") == deployment:
            entry["user_config"] = user_config
            return app
    entries.append({"name": deployment, "user_config": user_config})
    return app


def with_app(config: dict[str, Any], app: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with `app` replacing the application of its name, or added last."""
    config = copy.deepcopy(config)
    apps = config.setdefault("applications", [])
    for i, existing in enumerate(apps):
        if existing["name"] == app["name"]:
            apps[i] = app
            return config
    apps.append(app)
    return config


def without_app(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of `config` without the application `name` (applying it deletes that application)."""
    config = copy.deepcopy(config)
    config["applications"] = [app for app in config.get("applications", []) if app["name"] != name]
    return config
