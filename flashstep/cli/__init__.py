"""`flashstep`: one command line for serving, generating, training, evaluating and benchmarking.

One module per command: each adds its subparser (`add_parser`) and runs it (`run`), handing typed
values to the package that owns the work. Heavy imports happen inside `run`, so `flashstep --help`
and `flashstep train STAGE --help` stay instant. `serve` and `bench` hand their flags on untouched.
"""

from __future__ import annotations

import argparse
import sys

from flashstep.cli import bench, evaluate, generate, link_weights, models, report, serve, train

COMMANDS = (generate, models, train, evaluate, report, link_weights, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    """The `flashstep` parser: one subcommand per module in `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="flashstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `flashstep ARGV`; returns the exit code (argparse errors exit 2 through SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve.run(argv[1:])
    if argv and argv[0] == "bench":
        return bench.run(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
