"""GET /: the playground, one static HTML page that calls POST /generate."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(tags=["playground"])

PLAYGROUND = Path(__file__).resolve().parent.parent / "static" / "index.html"


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(PLAYGROUND, media_type="text/html", headers={"Cache-Control": "no-cache"})
