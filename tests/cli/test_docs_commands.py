"""Every `flashstep ...` command written in README.md and docs/ parses with today's command line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from flashstep.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands(path: Path) -> list[list[str]]:
    """The argv of each `flashstep ...` line in the file's code blocks, continuations joined, `$S` expanded."""
    text = path.read_text().replace("\\\n", " ")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.DOTALL)
    commands, variables = [], {}
    for line in (line.strip() for block in blocks for line in block.splitlines()):
        assignment = re.fullmatch(r"([A-Z]+)=(.*)", line)
        if assignment:
            variables[assignment[1]] = shlex.split(" ".join(shlex.split(assignment[2], comments=True)))
            continue
        line = re.sub(r"^(\.venv/bin/)?flashstep ", "flashstep ", line)
        if not line.startswith("flashstep "):
            continue
        argv = []
        for word in shlex.split(line, comments=True)[1:]:
            argv += variables.get(word[1:], [word]) if word.startswith("$") else [word]
        commands.append(argv)
    return commands


CASES = [(path.name, argv) for path in DOCS for argv in documented_commands(path)]


def test_the_docs_do_write_commands():
    assert {name for name, _ in CASES} >= {"README.md", "training.md"}
    assert any(argv[:2] == ["train", "hypersd-refine"] for _, argv in CASES)


@pytest.mark.parametrize(("doc", "argv"), CASES, ids=[f"{d}:{' '.join(a[:3])}" for d, a in CASES])
def test_a_documented_command_parses(doc, argv):
    if argv[0] in {"serve", "bench"}:  # these hand their flags to their own parsers
        return
    build_parser().parse_args(argv)
