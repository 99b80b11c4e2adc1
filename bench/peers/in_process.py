"""Peer (c): the vanilla diffusers pipeline called in-process, one image per call: the floor for overhead.

    python -m flashstep.bench.peers.in_process --model-dir models/shipped/shapes-teacher --steps 1 \
        --guidance-scale 0 --resolution 64 --requests 40 --out /tmp/in_process.json

It runs as its own process (like the servers, with the same torch threads) and times what a server
would do for one request with no server around it: the pipeline call and the PNG encoding. The
requests are the load generator's bodies (bench/workload.py), sent one after another after
`--warmup` untimed ones. Writes {"latencies_s": [...], "wall_s": ...} as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flashstep.bench.peers.vanilla import load_pipeline, parse_body, run_pipeline, set_threads, to_png
from flashstep.bench.workload import Workload


def measure(pipe, workload: Workload, requests: int, warmup: int, first_index: int = 0) -> dict:
    """Latency of `requests` sequential pipeline calls + PNG encodes, after `warmup` untimed ones."""
    index = first_index
    for _ in range(warmup):
        to_png(run_pipeline(pipe, [parse_body(workload.body(index))])[0])
        index += 1
    latencies = []
    started = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        png = to_png(run_pipeline(pipe, [parse_body(workload.body(index))])[0])
        latencies.append(time.perf_counter() - t0)
        if not png:
            raise RuntimeError("the pipeline returned an empty PNG")
        index += 1
    return {"latencies_s": latencies, "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--guidance-scale", type=float, required=True)
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    pipe = load_pipeline(args.model_dir, args.device, args.dtype)
    workload = Workload(args.steps, args.guidance_scale, args.resolution)
    result = measure(pipe, workload, args.requests, args.warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
