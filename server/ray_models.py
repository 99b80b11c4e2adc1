"""The ingress's model manager on Ray: which models the cluster serves, as the routes ask for them.

The routes read `request.app.state.manager` with the one-process `ModelManager`'s methods
(names, default, get, snapshot, lease; load, swap, unload, set_default for the admin routes).
On Ray the engines live in other processes, so `RayModelManager` answers from a picture of
the cluster it keeps up to date:

- which models: the Serve applications named `flashstep-model-<name>` that run (a model stays
  served while its application rolls a swap out), read from `serve.status()` every `POLL_S`
  and right after each admin action;
- what each model is (family, version, allowed steps, memory): a `ModelDescription` one of its
  replicas reports, asked again whenever its application was deployed anew;
- the default model: the ingress deployment's `user_config`, which Serve pushes to every
  ingress replica through `reconfigure`.

Admin actions go to the admin deployment (server/ray_admin.py), which edits the Serve config;
another ingress replica sees the result at its next poll, within `POLL_S`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from flashstep.models.errors import ModelNotFoundError
from flashstep.server.errors import ServerError
from flashstep.server.lifecycle import Lifecycle, Phase
from flashstep.server.model_manager import LoadedModel
from flashstep.server.ray_admin import MODEL_LOAD_TIMEOUT_S
from flashstep.server.ray_config import ENGINE_DEPLOYMENT, model_app_name, model_of_app
from flashstep.server.ray_control import DeployFailedError
from flashstep.server.ray_protocol import ModelDescription, RemoteEngine, RemoteError

logger = logging.getLogger("flashstep.server")

POLL_S = 1.0  # how stale another ingress replica's admin action may look here
DESCRIBE_TIMEOUT_S = 30.0
REFRESH_TIMEOUT_S = 60.0
ADMIN_TIMEOUT_S = 2 * MODEL_LOAD_TIMEOUT_S + 60  # a swap that fails waits for its rollback too


class RayModelManager:
    """The served models as the ingress sees them; admin actions are applied by the admin deployment."""

    def __init__(self, admin: DeploymentHandle, lifecycle: Lifecycle, *, poll_s: float = POLL_S):
        self._admin = admin
        self._lifecycle = lifecycle
        self._poll_s = poll_s
        # Replaced whole by `refresh` (on the event loop), so readers on other threads see one picture.
        self._served: dict[str, LoadedModel] = {}
        self._deployed_at: dict[str, float] = {}
        self._unhealthy: list[str] = []
        self._configured_default: str | None = None
        self._engines: dict[str, DeploymentHandle] = {}
        self._serials = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None
        self._refreshing: asyncio.Lock | None = None
        self._pending: set[asyncio.Task] = set()

    # ----- reading (any thread) -----

    def names(self) -> list[str]:
        return list(self._served)

    @property
    def default(self) -> str | None:
        """The configured default when it is served, else the first served model."""
        served = self._served
        if self._configured_default in served:
            return self._configured_default
        return next(iter(served), None)

    def get(self, name: str | None = None) -> LoadedModel:
        """The model serving `name` (the default when None); ModelNotFoundError lists the served ones."""
        served = self._served
        key = self.default if name is None else name
        if key is None or key not in served:
            loaded = sorted(served)
            if name is None:
                raise ModelNotFoundError(
                    f"no default model is set; `model` must be one of the loaded models {loaded}"
                )
            raise ModelNotFoundError(f"`model` must be one of the loaded models {loaded} but is {name!r}")
        return served[key]

    def snapshot(self) -> list[LoadedModel]:
        return list(self._served.values())

    @contextmanager
    def lease(self, name: str | None) -> Iterator[LoadedModel]:
        """The model as `ModelManager.lease` yields it (its in-flight count includes this lease).

        Nothing needs pinning here: the engine is in its replica, and Serve drains a replica's
        requests before it stops.
        """
        handle = self.get(name)
        yield replace(handle, in_flight=handle.in_flight + 1)

    def unhealthy(self) -> list[str]:
        """Models whose application Serve reports UNHEALTHY (a replica failing its health checks)."""
        return list(self._unhealthy)

    def engine(self, name: str) -> DeploymentHandle:
        """The Serve handle of `name`'s engine deployment."""
        handle = self._engines.get(name)
        if handle is None:
            handle = self._engines[name] = serve.get_deployment_handle(
                ENGINE_DEPLOYMENT, app_name=model_app_name(name)
            )
        return handle

    # ----- changing: the admin routes call these from a worker thread -----

    def load(self, name_or_path: str | Path, *, name: str | None = None) -> LoadedModel:
        """Start serving a model on its own engine replicas; returns once they all run it."""
        description: ModelDescription = self._call_admin("load", str(name_or_path), name)
        self.refresh_now()
        return self._served.get(description.name) or self._loaded(description)

    def swap(self, name: str, name_or_path: str | Path) -> tuple[LoadedModel, LoadedModel]:
        """Swap `name` to a new folder on every replica, in place; returns (old, new)."""
        old, new = self._call_admin("swap", name, str(name_or_path))
        self.refresh_now()
        return self._loaded(old), self._loaded(new)

    def unload(self, name: str) -> LoadedModel:
        """Stop serving `name` now; its replicas stop once the requests they hold are answered."""
        handle = self.get(name)
        ingress = self._call_admin("unload", name)
        self._configured_default = ingress.default_model
        self.refresh_now()
        return handle

    def set_default(self, name: str) -> None:
        """Answer requests naming no model with `name`, on every ingress replica.

        Called on the event loop (the route does not use a thread), so the config update is
        sent without waiting; this replica switches at once, the others through `reconfigure`.
        """
        self.get(name)  # 404 for a model not served, before anything changes
        self._configured_default = name
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # from a worker thread: wait, and let errors reach the caller
            self._call_admin("set_default", name)
            return
        task = loop.create_task(self._persist_default(name))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def set_configured_default(self, name: str | None) -> None:
        """The default the ingress's `user_config` names (from `reconfigure`)."""
        self._configured_default = name

    # ----- keeping the picture current (event loop) -----

    def start(self) -> None:
        """Poll Serve every `poll_s` seconds, from now until `stop`; call it on the event loop."""
        self._loop = asyncio.get_running_loop()
        self._refreshing = asyncio.Lock()
        self._poller = self._loop.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    def refresh_now(self) -> None:
        """Refresh from a worker thread, and return once done (after an admin action)."""
        if self._loop is None:
            raise RuntimeError("RayModelManager.start was not called")
        asyncio.run_coroutine_threadsafe(self.refresh(), self._loop).result(timeout=REFRESH_TIMEOUT_S)

    async def refresh(self) -> None:
        """Read which model applications run, describe the new or redeployed ones, update the lifecycle."""
        async with self._refreshing:
            applications = (await asyncio.to_thread(serve.status)).applications
            served: dict[str, LoadedModel] = {}
            deployed_at: dict[str, float] = {}
            unhealthy: list[str] = []
            starting: list[str] = []
            failed: dict[str, str] = {}
            for app_name, app in applications.items():
                name = model_of_app(app_name)
                if name is None:
                    continue
                known = self._served.get(name)
                redeployed = self._deployed_at.get(name) != app.last_deployed_time_s
                if app.status == ApplicationStatus.RUNNING and (known is None or redeployed):
                    description = await self._describe(name)
                    if description is not None:
                        served[name], deployed_at[name] = self._loaded(description), app.last_deployed_time_s
                        continue
                if known is not None and app.status in (
                    ApplicationStatus.RUNNING, ApplicationStatus.DEPLOYING, ApplicationStatus.UNHEALTHY,
                ):  # fmt: skip
                    # Still served meanwhile: a swap rolls out replica by replica.
                    served[name], deployed_at[name] = known, self._deployed_at[name]
                    if app.status == ApplicationStatus.UNHEALTHY:
                        unhealthy.append(name)
                elif app.status == ApplicationStatus.DEPLOY_FAILED:
                    failed[name] = DeployFailedError.of(app_name, app).reason
                elif app.status != ApplicationStatus.DELETING:
                    starting.append(name)
            self._served, self._deployed_at, self._unhealthy = served, deployed_at, unhealthy
            self._update_lifecycle(starting, failed)

    def _update_lifecycle(self, starting: list[str], failed: dict[str, str]) -> None:
        """Loading until every model application present at start runs; failed if none could.

        `failed` maps a model to why its application failed to deploy.
        """
        if self._lifecycle.phase not in (Phase.STARTING, Phase.LOADING, Phase.FAILED):
            return
        if self._served and not starting:
            self._lifecycle.set(Phase.READY)
            logger.info("ready: models=%s default=%s", self.names(), self.default)
        elif not self._served and not starting and failed:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            self._lifecycle.set(Phase.FAILED, error=f"model applications failed to deploy ({reasons})")
        else:
            self._lifecycle.set(Phase.LOADING)

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("could not refresh the served models from Serve", exc_info=True)
            await asyncio.sleep(self._poll_s)  # a periodic job: the next look at the cluster

    async def _describe(self, name: str) -> ModelDescription | None:
        async def ask():
            return await self.engine(name).describe.remote()

        try:
            reply = await asyncio.wait_for(ask(), DESCRIBE_TIMEOUT_S)
        except Exception as exc:  # a replica busy starting or gone: asked again at the next poll
            logger.warning("model not described yet: model=%s error=%s", name, type(exc).__name__)
            return None
        if isinstance(reply, RemoteError):
            logger.warning("model not described yet: model=%s error=%s", name, reply.message)
            return None
        return reply

    async def _persist_default(self, name: str) -> None:
        try:
            reply = await self._admin.set_default.remote(name)
        except Exception:
            logger.exception("setting the default model in the Serve config failed: model=%s", name)
            return
        if isinstance(reply, RemoteError):
            logger.error(
                "setting the default model in the Serve config failed: model=%s error=%s", name, reply.message
            )

    def _call_admin(self, method: str, *args):
        try:
            reply = getattr(self._admin, method).remote(*args).result(timeout_s=ADMIN_TIMEOUT_S)
        except RayTaskError:
            logger.exception("admin deployment failed: action=%s", method)
            raise ServerError(
                f"the admin action `{method}` failed in the admin deployment (see its log)"
            ) from None
        if isinstance(reply, RemoteError):
            raise reply.rebuild()
        return reply

    def _loaded(self, description: ModelDescription) -> LoadedModel:
        return LoadedModel(
            name=description.name,
            engine=RemoteEngine(description),
            serial=next(self._serials),
            version=description.version,
            loaded_at=description.loaded_at,
            in_flight=description.in_flight,
        )
