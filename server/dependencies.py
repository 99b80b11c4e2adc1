"""FastAPI dependencies: the app's service objects (built by `create_app`) and the admin guard."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flashstep.server.batcher import Batcher
from flashstep.server.errors import AuthenticationError
from flashstep.server.generation import GenerationService
from flashstep.server.image_store import ImageStore
from flashstep.server.lifecycle import Lifecycle
from flashstep.server.metrics import Metrics
from flashstep.server.model_manager import ModelManager
from flashstep.server.request_origin import RequestOrigin
from flashstep.server.settings import Settings
from flashstep.server.worker_pool import WorkerPool

_bearer = HTTPBearer(auto_error=False, description="The server's admin token (FLASHSTEP_ADMIN_TOKEN).")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def get_generation(request: Request) -> GenerationService:
    return request.app.state.generation


def get_pool(request: Request) -> WorkerPool | None:
    """The engine worker processes, or None when engines run in this process."""
    return getattr(request.app.state, "pool", None)


def get_image_store(request: Request) -> ImageStore:
    return request.app.state.image_store


def get_origin(request: Request) -> RequestOrigin:
    return request.app.state.origin


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> None:
    """Pass only `Authorization: Bearer <admin token>` (compared in constant time)."""
    token = get_settings(request).admin_token
    given = credentials.credentials if credentials is not None else ""
    if token is None or not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise AuthenticationError(
            "admin routes need `Authorization: Bearer <admin token>`", headers={"WWW-Authenticate": "Bearer"}
        )


# Annotated dependency types (FastAPI's recommended style) for route signatures.
SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
GenerationDep = Annotated[GenerationService, Depends(get_generation)]
ImageStoreDep = Annotated[ImageStore, Depends(get_image_store)]
OriginDep = Annotated[RequestOrigin, Depends(get_origin)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]
PoolDep = Annotated[WorkerPool | None, Depends(get_pool)]
