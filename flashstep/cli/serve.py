"""`flashstep serve [flags]`: the HTTP server; its flags are its own (`flashstep serve --help`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the HTTP server (flags: flashstep serve --help)", add_help=False)
    s.set_defaults(func=None)


def run(argv: list[str]) -> int:
    from flashstep.server.serve import serve_main

    return serve_main(argv) or 0
