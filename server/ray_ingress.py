"""The ingress deployment: flashstep's HTTP API on Ray Serve, from the same routers as `create_app`.

The routers (server/routes/) read their services from `request.app.state`; here those are the
Ray-backed ones -- `RayModelManager` (models are Serve applications), `RayGenerationService`
(images come from engine replicas), `RayQueue` -- beside the same settings, metrics, lifecycle,
image store and request origin. The error boundary, body limits, admin guard and every answer
are the one-process server's.

The app is built in the replica (`__serve_build_asgi_app__`), after the constructor, so it is
made from the settings the application builder bound. Its lifespan starts the model poller; on
shutdown new requests get 503 while Serve lets the ones in flight finish.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from flashstep.server.app import assemble_app
from flashstep.server.image_store import ImageStore, open_image_store
from flashstep.server.lifecycle import Lifecycle, Phase
from flashstep.server.metrics import Metrics
from flashstep.server.ray_config import INGRESS_DEPLOYMENT, send_logs_to_serve
from flashstep.server.ray_generation import RayGenerationService, RayQueue
from flashstep.server.ray_models import RayModelManager
from flashstep.server.ray_protocol import IngressUserConfig
from flashstep.server.settings import Settings

logger = logging.getLogger("flashstep.server")

IMAGE_FOLDER_NAME = "flashstep-images"


def image_store_folder(settings: Settings) -> Path:
    """Where url images are kept: `image_store_dir`, else a folder under this node's Ray temp dir.

    The Ray temp dir is per node: every ingress replica on one node shares it, but an image
    stored on one node cannot be fetched through another. Several nodes need a shared path.
    """
    if settings.image_store_dir is not None:
        return settings.image_store_dir
    context = ray.get_runtime_context()
    folder = Path(context.get_temp_dir()) / IMAGE_FOLDER_NAME / context.get_session_name()
    logger.info(
        "image_store_dir not set: url images kept under the Ray temp dir of this node: folder=%s "
        "(set image_store_dir to a shared path when ingress replicas run on several nodes)",
        folder,
    )
    return folder


def create_ray_app(
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    metrics: Metrics,
    manager: RayModelManager,
    queue: RayQueue,
    generation: RayGenerationService,
    image_store: ImageStore,
) -> FastAPI:
    """The flashstep FastAPI app over Ray-backed services (what `create_app` builds in one process)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.set(Phase.LOADING)
        manager.start()
        yield
        lifecycle.begin_shutdown()
        await manager.stop()
        logger.info("ingress replica shut down")

    return assemble_app(
        settings,
        lifespan=lifespan,
        summary="One-step and few-step text-to-image diffusion, batched (on Ray Serve).",
        metrics=metrics,
        lifecycle=lifecycle,
        manager=manager,
        batcher=queue,
        generation=generation,
        image_store=image_store,
    )


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class FlashstepIngress:
    """HTTP in, engine deployments behind: one replica's services for the routers."""

    def __init__(self, settings: Settings, admin_deployment: DeploymentHandle):
        send_logs_to_serve(settings.log_level)
        self.settings = settings
        self.lifecycle = Lifecycle()
        self.metrics = Metrics(settings.max_batch_size)
        self.manager = RayModelManager(admin_deployment, self.lifecycle)
        self.queue = RayQueue(self.manager, self.metrics)
        self.generation = RayGenerationService(
            self.manager,
            self.queue,
            self.lifecycle,
            self.metrics,
            request_timeout_s=settings.request_timeout_s,
            queue_limit=settings.queue_limit,
        )
        self.image_store = open_image_store(
            max_bytes=settings.image_store_bytes,
            client_share=settings.image_store_client_share,
            ttl_s=settings.image_ttl_s,
            folder=image_store_folder(settings),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_ray_app(
            self.settings,
            lifecycle=self.lifecycle,
            metrics=self.metrics,
            manager=self.manager,
            queue=self.queue,
            generation=self.generation,
            image_store=self.image_store,
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Serve pushes the ingress's `user_config` here: the default model."""
        self.manager.set_configured_default(IngressUserConfig.parse(user_config).default_model)
