"""Probes and metrics: GET /healthz (live), GET /readyz (ready to serve), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from flashstep.server.dependencies import BatcherDep, LifecycleDep, ManagerDep, MetricsDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: 200 once every start-up model is loaded and warm")
async def readyz(
    lifecycle: LifecycleDep,
    manager: ManagerDep,
    batcher: BatcherDep,
) -> JSONResponse:
    body = {"status": lifecycle.phase.value, "models": manager.names(), "queue_depth": batcher.depth}
    if lifecycle.error:
        body["error"] = lifecycle.error
    return JSONResponse(body, status_code=200 if lifecycle.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
