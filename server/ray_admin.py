"""The admin deployment: load, swap, unload and set-default as edits of the running Serve config.

    POST /admin/models            -> add application flashstep-model-<name>; wait until it runs
    POST /admin/models/<n>/swap   -> engine user_config {"path": new, "revision": +1}; Serve calls each
                                     replica's reconfigure in place (a rolling update: the other
                                     replicas keep serving); wait until all have
    DELETE /admin/models/<n>      -> remove the application; Serve drains its replicas' requests
    PUT /admin/default            -> ingress user_config {"default_model": n}

One replica with `max_ongoing_requests=1`: Serve queues the actions of every ingress replica,
so two read-modify-write edits of the config never interleave. Errors come back as
`RemoteError` values with the one-process server's meaning: 403 for a path outside the models
root, 404 for an unknown model, 409 for a name in use, 400 for a checkpoint that fails to load
(the config is then put back as it was).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from pathlib import Path
from typing import Any

from ray import serve

from flashstep.models import registry
from flashstep.models.errors import CheckpointError, FlashstepError, InvalidRequestError, ModelNotFoundError
from flashstep.server.errors import ModelConflictError, RequestTimeoutError, ServerError
from flashstep.server.ray_config import (
    ADMIN_DEPLOYMENT,
    ENGINE_DEPLOYMENT,
    INGRESS_APP,
    INGRESS_DEPLOYMENT,
    deployment_user_config,
    find_app,
    model_app_config,
    model_app_name,
    model_apps,
    send_logs_to_serve,
    with_app,
    with_deployment_user_config,
    without_app,
)
from flashstep.server.ray_control import (
    DeployFailedError,
    apply,
    controller_client,
    running_config,
    wait_running,
)
from flashstep.server.ray_protocol import EngineUserConfig, IngressUserConfig, ModelDescription, RemoteError
from flashstep.server.settings import Settings

logger = logging.getLogger("flashstep.server")

# A model load or swap (weights read, warmup on every replica) taking longer is given up and undone.
MODEL_LOAD_TIMEOUT_S = 600.0
DESCRIBE_TIMEOUT_S = 60.0


@serve.deployment(name=ADMIN_DEPLOYMENT)
class FlashstepAdmin:
    """Applies one admin action at a time to the Serve config; every method returns a value or a RemoteError."""

    def __init__(self, settings: Settings):
        send_logs_to_serve(settings.log_level)
        self.settings = settings
        self._lock = threading.Lock()  # Serve sends one call at a time; this keeps it so if that changes

    async def load(self, path: str, name: str | None) -> ModelDescription | RemoteError:
        return await asyncio.to_thread(self._run, self._load, path, name)

    async def swap(self, name: str, path: str) -> tuple[ModelDescription, ModelDescription] | RemoteError:
        return await asyncio.to_thread(self._run, self._swap, name, path)

    async def unload(self, name: str) -> IngressUserConfig | RemoteError:
        return await asyncio.to_thread(self._run, self._unload, name)

    async def set_default(self, name: str) -> IngressUserConfig | RemoteError:
        return await asyncio.to_thread(self._run, self._set_default, name)

    def _run(self, action, *args):
        with self._lock:
            try:
                return action(*args)
            except (FlashstepError, ServerError) as exc:
                return RemoteError.of(exc)
            except DeployFailedError as exc:  # Serve's reason, not its traceback
                return RemoteError.of(CheckpointError(str(exc)))
            except TimeoutError as exc:
                return RemoteError.of(RequestTimeoutError(str(exc)))

    # ----- actions (worker thread) -----

    def _load(self, path: str, name: str | None) -> ModelDescription:
        name = name or Path(path).name  # the folder's name, as ModelManager.load
        client = controller_client()
        config = self._config(client)
        served = model_apps(config)
        if name in served:
            raise ModelConflictError(
                f"a model named {name!r} is loaded already; swap it or pick another name", param="name"
            )
        self._check_path(path)
        try:
            app = self._new_model_app(served, name, path)
        except ValueError as exc:
            raise InvalidRequestError("name", str(exc)) from None
        apply(client, with_app(config, app))
        try:
            wait_running([app["name"]], MODEL_LOAD_TIMEOUT_S)
        except (DeployFailedError, TimeoutError) as exc:
            apply(client, without_app(self._config(client), app["name"]))  # nothing half-loaded stays
            logger.error("model load failed, application removed: model=%s path=%s error=%s", name, path, exc)
            if isinstance(exc, TimeoutError):
                raise RequestTimeoutError(
                    f"model {name!r} did not start within {MODEL_LOAD_TIMEOUT_S:g} s"
                ) from None
            raise CheckpointError(f"model {name!r} from {path!r} failed to load: {exc.reason}") from None
        logger.info("model loaded: name=%s path=%s application=%s", name, path, app["name"])
        return self._describe(name)

    def _swap(self, name: str, path: str) -> tuple[ModelDescription, ModelDescription]:
        client = controller_client()
        config = self._config(client)
        app = self._model_app(config, name)
        self._check_path(path)
        old = self._describe(name)
        current = EngineUserConfig.parse(deployment_user_config(app, ENGINE_DEPLOYMENT) or {"path": name})
        wanted = EngineUserConfig(path=path, revision=current.revision + 1)
        apply(
            client, with_app(config, with_deployment_user_config(app, ENGINE_DEPLOYMENT, wanted.model_dump()))
        )
        wait_running([app["name"]], MODEL_LOAD_TIMEOUT_S)
        new = self._describe(name)
        if new.revision != wanted.revision:  # the replica kept its engine: put every replica back on it
            apply(client, with_app(self._config(client), app))
            wait_running([app["name"]], MODEL_LOAD_TIMEOUT_S)
            logger.error(
                "swap failed and was rolled back: model=%s path=%s replica=%s", name, path, new.served_by
            )
            if new.swap_error is not None:
                raise new.swap_error.rebuild()
            raise CheckpointError(f"`path` {path!r} did not load on replica {new.served_by}")
        logger.info("model swapped: name=%s old_version=%s new_version=%s", name, old.version, new.version)
        return old, new

    def _unload(self, name: str) -> IngressUserConfig:
        client = controller_client()
        config = self._config(client)
        self._model_app(config, name)
        config = without_app(config, model_app_name(name))
        ingress = IngressUserConfig.parse(
            deployment_user_config(find_app(config, INGRESS_APP), INGRESS_DEPLOYMENT)
        )
        if ingress.default_model == name:  # as ModelManager.unload: the next model becomes the default
            ingress = IngressUserConfig(default_model=next(iter(model_apps(config)), None))
            config = self._with_ingress(config, ingress)
        apply(client, config)  # Serve stops routing to it now; its replicas finish what they hold
        logger.info("model unloaded: name=%s default=%s", name, ingress.default_model)
        return ingress

    def _set_default(self, name: str) -> IngressUserConfig:
        client = controller_client()
        config = self._config(client)
        self._model_app(config, name)
        ingress = IngressUserConfig(default_model=name)
        apply(client, self._with_ingress(config, ingress))
        logger.info("default model set: name=%s", name)
        return ingress

    # ----- helpers -----

    def _config(self, client) -> dict[str, Any]:
        config = running_config(client)
        if find_app(config, INGRESS_APP) is None:
            raise ModelConflictError(
                f"admin actions edit the Serve config, but application {INGRESS_APP!r} was not deployed from one "
                "(use `flashstep serve --ray`, `serve deploy` or `serve run` with a config file)"
            )
        return config

    def _model_app(self, config: dict[str, Any], name: str) -> dict[str, Any]:
        served = model_apps(config)
        if name not in served:
            raise ModelNotFoundError(
                f"`model` must be one of the loaded models {sorted(served)} but is {name!r}"
            )
        return served[name]

    def _check_path(self, path: str) -> None:
        """403 outside the models root, 404 for nothing there: before any replica is asked to load it."""
        registry.resolve(path, self.settings.models_root, restrict_to_root=True)

    def _new_model_app(self, served: dict[str, dict[str, Any]], name: str, path: str) -> dict[str, Any]:
        """A new model's application, configured like the models already served (else from the settings)."""
        fresh = EngineUserConfig(path=path).model_dump()
        if not served:
            return model_app_config(self.settings, name, path)
        app = copy.deepcopy(next(iter(served.values())))
        app["name"] = model_app_name(name)
        app["args"] = {**(app.get("args") or {}), "model": name}
        return with_deployment_user_config(app, ENGINE_DEPLOYMENT, fresh)

    def _with_ingress(self, config: dict[str, Any], ingress: IngressUserConfig) -> dict[str, Any]:
        app = with_deployment_user_config(
            find_app(config, INGRESS_APP), INGRESS_DEPLOYMENT, ingress.model_dump()
        )
        return with_app(config, app)

    def _describe(self, name: str) -> ModelDescription:
        engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=model_app_name(name))
        reply = engine.describe.remote().result(timeout_s=DESCRIBE_TIMEOUT_S)
        if isinstance(reply, RemoteError):
            raise reply.rebuild()
        return reply
