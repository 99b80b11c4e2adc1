"""Keeping what a checkpoint reads inside the folders an operator allowed.

The server loads folders named by untrusted admin input, so a path string, and everything the
folder then points to, must stay inside the models root or the shipped models folder:

    check_path_text(text, field)   the string itself: not empty, no NUL or control characters,
                                   encodable, no component longer than NAME_MAX (4xx, not a 500)
    confine(path, roots, what)     `path`, symlinks and `..` resolved, lies inside one of `roots`
    confine_tree(folder, roots)    every symlink below `folder` (files and sub-folders) resolves
                                   inside `roots`, and no file below it is a pickle

Symlinks that stay inside are fine: the shipped students link the teacher's VAE and text
encoder (`../../shapes-teacher/...`), which resolve inside the shipped folder. The library and
the CLI load any folder the user names; only a caller that passes roots (the server) is confined.
Checks happen before loading, so a link swapped between check and load is not caught: the
models root is the operator's folder, and only its writers could race the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flashstep.models.errors import CheckpointError, ForbiddenPathError, InvalidRequestError

NAME_MAX = 255  # bytes per path component on Linux, macOS and Windows file systems
PATH_MAX = 4096
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
CONVERT_HINT = (
    "flashstep loads safetensors only and never unpickles weights; convert once in a trusted "
    "environment, e.g. `DiffusionPipeline.from_pretrained(folder, use_safetensors=False)"
    ".save_pretrained(folder, safe_serialization=True)` (or `safetensors.torch.save_file` on the "
    "loaded state dict), then remove the pickled file"
)


def check_path_text(text: str, field: str = "path") -> str:
    """`text` unchanged if the OS could take it as a path, else InvalidRequestError naming `field`.

    Without this, a NUL byte or an over-long component reaches `os.stat` and fails there with
    a ValueError or OSError that nobody maps to a client error.
    """
    if not isinstance(text, str) or not text:
        raise InvalidRequestError(field, f"`{field}` must be a non-empty folder name or path")
    if "\x00" in text:
        raise InvalidRequestError(field, f"`{field}` must not contain a NUL byte")
    if len(text) > PATH_MAX:  # first, so no message below echoes a huge string
        raise InvalidRequestError(field, f"`{field}` must be at most {PATH_MAX} characters but has {len(text)}")
    if not text.isprintable():
        raise InvalidRequestError(field, f"`{field}` must not contain control characters but is {text!r}")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\udc80" from JSON
        raise InvalidRequestError(field, f"`{field}` must be valid UTF-8 but is {text!r}") from exc
    if len(encoded) > PATH_MAX:
        raise InvalidRequestError(field, f"`{field}` must be at most {PATH_MAX} bytes but has {len(encoded)}")
    for part in text.replace("\\", "/").split("/"):
        if len(part.encode("utf-8")) > NAME_MAX:
            raise InvalidRequestError(
                field, f"`{field}` components must be at most {NAME_MAX} bytes but one has {len(part.encode('utf-8'))}"
            )
    return text


def resolved_roots(roots: Sequence[str | Path]) -> list[Path]:
    """`roots` with symlinks resolved, so that `is_relative_to` compares real locations."""
    return [Path(root).resolve() for root in roots]


def is_inside(path: Path, roots: Sequence[Path]) -> bool:
    """True when `path`, fully resolved, lies inside one of the (resolved) `roots`."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop or an unusable name: not provably inside
        return False
    return any(real.is_relative_to(root) for root in roots)


def confine(path: str | Path, roots: Sequence[Path], what: str) -> Path:
    """`path` resolved, or ForbiddenPathError when it leaves every root. `what` names it in the error."""
    path = Path(path)
    roots = resolved_roots(roots)
    if not is_inside(path, roots):
        raise ForbiddenPathError(f"{what} {str(path)!r} lies outside the models root and the shipped models")
    return path.resolve()


def confine_tree(folder: Path, roots: Sequence[Path] | None) -> None:
    """Refuse pickles anywhere below `folder`; with `roots`, also any symlink that leaves them.

    Walks symlinked sub-folders too (once each), since the loader reads through them.
    """
    folder = Path(folder)
    real_roots = resolved_roots(roots) if roots is not None else None
    seen: set[Path] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real = current.resolve()
        if real in seen:
            continue  # a link back into the tree: already checked
        seen.add(real)
        try:
            entries = sorted(current.iterdir())
        except OSError as exc:
            raise CheckpointError(f"cannot list {current}: {exc.strerror}") from exc
        for entry in entries:
            where = entry.relative_to(folder) if entry.is_relative_to(folder) else entry
            if entry.is_symlink() and real_roots is not None and not is_inside(entry, real_roots):
                raise ForbiddenPathError(
                    f"`{where}` in checkpoint {folder.name} is a symlink that leaves the models root"
                )
            if entry.is_dir():
                stack.append(entry)
            elif entry.suffix in PICKLE_SUFFIXES:
                raise CheckpointError(f"`{where}` in {folder} is a pickled file ({entry}): {CONVERT_HINT}")
