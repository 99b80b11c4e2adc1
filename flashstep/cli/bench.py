"""`flashstep bench NAME [flags]`: the benchmarks under bench/, each with its own flags."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCH_COMMANDS), add_help=False)
    b.set_defaults(func=None)


# `flashstep bench <name> [flags]` -> bench/<module>.main(flags); each has its own --help.
BENCH_COMMANDS = {
    "cpu": ("flashstep.bench.cpu", "the whole CPU set (make bench): latency, load, sd15; bench/results/cpu.json"),
    "latency": ("flashstep.bench.latency", "in-process latency of every shipped model x steps x batch size"),
    "load": ("flashstep.bench.load", "HTTP load on flashstep and its peers (FastAPI per request, LitServe, in-process)"),
    "ray": ("flashstep.bench.ray_scaling", "Ray Serve throughput at 1 and 2 replicas and its overhead over the native server"),
    "sd15": ("flashstep.bench.sd15_cpu", "SD1.5-size random-weight stages on the CPU at 512 px"),
    "soak": ("flashstep.bench.soak", "minutes of mixed valid and hostile HTTP traffic with hot swaps; answers and RSS"),
    "gpu": ("flashstep.bench.gpu", "SD1.5-size fp16 scenarios per attention backend (needs CUDA; see bench/gpu.sh)"),
}


def run(argv: list[str]) -> int:
    import importlib

    usage = "usage: flashstep bench {" + ",".join(BENCH_COMMANDS) + "} [flags]   (flags: flashstep bench NAME --help)\n"
    usage += "\n".join(f"  {name:8} {text}" for name, (_, text) in BENCH_COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in BENCH_COMMANDS:
        print(f"flashstep bench: unknown benchmark {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCH_COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0
