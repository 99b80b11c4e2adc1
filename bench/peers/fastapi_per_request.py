"""Peer (a): the common pattern, a FastAPI app that calls a diffusers pipeline once per request.

    python -m flashstep.bench.peers.fastapi_per_request --model-dir models/shipped/shapes-teacher --port 8101

A sync route (FastAPI runs it in its thread pool) takes the pipeline's lock and calls it for its
one image. The lock is what makes the pattern correct at all: a diffusers pipeline keeps scheduler
state and is not safe for concurrent calls, so without it concurrent requests corrupt each other.
No batching: requests wait their turn. The pipeline loads in the lifespan, before the port opens.
"""

from __future__ import annotations

import argparse
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from flashstep.bench.peers.vanilla import load_pipeline, parse_body, run_pipeline, set_threads, to_png


def create_app(model_dir: Path, device: str, dtype: str):
    from fastapi import FastAPI, HTTPException, Response

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["pipe"] = load_pipeline(model_dir, device, dtype)
        state["lock"] = threading.Lock()
        yield
        state.clear()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: dict) -> Response:
        try:
            job = parse_body(body)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        with state["lock"]:
            image = run_pipeline(state["pipe"], [job])[0]
        return Response(to_png(image), media_type="image/png")

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import uvicorn

    uvicorn.run(create_app(args.model_dir, args.device, args.dtype), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
