"""Peer (b): LitServe with its dynamic batching, on the same pipeline call.

    python -m flashstep.bench.peers.litserve_peer --model-dir models/shipped/shapes-teacher --port 8102 \
        --max-batch-size 8 --batch-timeout 0.01

`LitAPI(max_batch_size, batch_timeout)` as flashstep's `max_batch_size` and `max_wait_ms`: LitServe
collects up to that many requests or waits that long, hands the list to `predict`, which runs one
pipeline call per group of compatible requests (same steps, guidance and size: in a benchmark run,
all of them), and `encode_response` turns each image into a PNG response. The pipeline loads in
`setup`, in LitServe's inference worker process; /health answers 200 once it has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import litserve as ls

from flashstep.bench.peers.vanilla import load_pipeline, parse_body, run_pipeline, set_threads, to_png


class DiffusersBatchedAPI(ls.LitAPI):
    """Prompts batched into one `StableDiffusionPipeline` call per group of compatible requests."""

    def __init__(self, model_dir: Path, dtype: str, threads: int | None, **kwargs):
        super().__init__(api_path="/generate", **kwargs)
        self.model_dir = model_dir
        self.dtype = dtype
        self.threads = threads

    def setup(self, device: str) -> None:
        set_threads(self.threads)
        self.pipe = load_pipeline(self.model_dir, device, self.dtype)

    def decode_request(self, request: dict):
        from fastapi import HTTPException

        try:
            return parse_body(request)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, jobs: list) -> list:
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        images: list = [None] * len(jobs)
        for indices in groups.values():
            for i, image in zip(indices, run_pipeline(self.pipe, [jobs[i] for i in indices]), strict=True):
                images[i] = image
        return images

    def unbatch(self, output: list) -> list:
        return list(output)

    def encode_response(self, image):
        from fastapi import Response

        return Response(to_png(image), media_type="image/png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01, help="seconds")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    api = DiffusersBatchedAPI(
        args.model_dir, args.dtype, args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
