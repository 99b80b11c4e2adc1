"""Probes and metrics: GET /healthz (live), GET /readyz (ready to serve), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from flashstep.server.dependencies import BatcherDep, LifecycleDep, ManagerDep, MetricsDep, PoolDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 while a model is loaded and warm, every device thread lives and a worker process serves")
async def readyz(
    lifecycle: LifecycleDep,
    manager: ManagerDep,
    batcher: BatcherDep,
    pool: PoolDep,
) -> JSONResponse:
    models = manager.names()
    dead = batcher.dead_workers()
    body = {"status": lifecycle.phase.value, "models": models, "queue_depth": batcher.depth}
    if pool is not None:
        body["workers"] = pool.status()
    if lifecycle.error:
        body["error"] = lifecycle.error
    # Ready means able to serve now: a model to answer with and a live worker on every device.
    if lifecycle.ready and not models:
        body["status"], body["error"] = "unavailable", "no model is loaded"
    elif lifecycle.ready and dead:
        body["status"], body["error"] = "unavailable", f"device workers died and await restart: {dead}"
    elif lifecycle.ready and pool is not None and pool.serving == 0:
        # One live worker process is enough to serve (slower); none is not ready.
        body["status"], body["error"] = "unavailable", "every engine worker process is restarting"
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
