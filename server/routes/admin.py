"""Admin routes under /admin, behind `Authorization: Bearer <admin token>`.

Mounted only when the server has an admin token. Loading, swapping and unloading block
(weights, warmup), so they run in a worker thread; generation keeps going meanwhile.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, status
from starlette.concurrency import run_in_threadpool

from flashstep.models.errors import ModelNotFoundError
from flashstep.server.dependencies import ManagerDep, require_admin
from flashstep.server.errors import error_responses
from flashstep.server.model_manager import LoadedModel
from flashstep.server.schemas import (
    AdminModel,
    AdminModelList,
    LoadModelRequest,
    SetDefaultRequest,
    SwapModelRequest,
    SwapResponse,
    UnloadResponse,
)

# Every admin route can refuse the token (401) or a body at the edge (400/408/413).
router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 408, 413),
)  # fmt: skip


def _describe(handle: LoadedModel, default: str | None) -> AdminModel:
    """`handle` as the admin sees it; call it under a lease (which it leaves out of `in_flight`)."""
    engine = handle.engine
    return AdminModel(
        name=handle.name,
        path=str(engine.path),
        family=engine.family,
        version=str(engine.version),
        device=str(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        memory_bytes=int(engine.memory_bytes()),
        in_flight=handle.in_flight - 1,
        default=handle.name == default,
        loaded_at=handle.loaded_at,
    )


@router.get("/models", response_model=AdminModelList, summary="Loaded models with their memory use")
async def list_models(manager: ManagerDep) -> AdminModelList:
    def collect() -> AdminModelList:
        default = manager.default
        models = []
        for name in manager.names():
            try:
                with manager.lease(name) as handle:  # pinned: not closed while it is read
                    models.append(_describe(handle, default))
            except ModelNotFoundError:  # unloaded meanwhile
                continue
        return AdminModelList(default=default, models=models)

    return await run_in_threadpool(collect)


@router.post(
    "/models", response_model=AdminModel, status_code=status.HTTP_201_CREATED, summary="Load a model from the models root",
    responses=error_responses(403, 404, 409, 503),
)
async def load_model(body: LoadModelRequest, manager: ManagerDep) -> AdminModel:
    """Load, warm and serve `path` (a folder under the models root) as `name`. 403 outside the root."""

    def load() -> AdminModel:
        handle = manager.load(body.path, name=body.name)
        with manager.lease(handle.name) as pinned:
            return _describe(pinned, manager.default)

    return await run_in_threadpool(load)


@router.delete(
    "/models/{name}", response_model=UnloadResponse, summary="Unload a model and free its memory",
    responses=error_responses(404, 409),
)
async def unload_model(name: str, manager: ManagerDep) -> UnloadResponse:
    """Stop serving `name` now; its memory is freed when its in-flight batches end."""
    await run_in_threadpool(manager.unload, name)
    return UnloadResponse(name=name, default=manager.default)


@router.post(
    "/models/{name}/swap", response_model=SwapResponse, summary="Hot-swap a model to a new folder",
    responses=error_responses(403, 404, 409, 503),
)
async def swap_model(name: str, body: SwapModelRequest, manager: ManagerDep) -> SwapResponse:
    """Load and warm `path`, switch `name` to it atomically, free the old engine after its batches."""
    old, new = await run_in_threadpool(manager.swap, name, body.path)
    return SwapResponse(name=name, old_version=old.version, new_version=new.version)


@router.put("/default", response_model=AdminModelList, summary="Set the default model", responses=error_responses(404))
async def set_default(body: SetDefaultRequest, manager: ManagerDep) -> AdminModelList:
    await run_in_threadpool(manager.set_default, body.model)  # a Ray Serve manager saves it to the cluster
    return await list_models(manager)
