"""Model names -> checkpoint folders: the shipped models plus an operator's models root.

A model is a folder holding `model_index.json` (a diffusers pipeline) or `flashstep.json` (a
LoRA checkpoint that borrows its base's pieces). Shipped models live in `models/shipped/`; the
direct children of `models_root` are added and win on a name clash, so an operator can replace a
shipped model without touching the package. `engine.load_engine` loads what `resolve` finds.
"""

from __future__ import annotations

from pathlib import Path

from flashstep.models.confinement import check_path_text, is_inside, resolved_roots
from flashstep.models.errors import ForbiddenPathError, ModelNotFoundError
from flashstep.models.flashstep_config import CONFIG_NAME

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "shipped"
# The model a server with no `default_model` answers with: the best one-step student by ShapesBench.
SHIPPED_DEFAULT_MODEL = "shapes-instaflow"
_MARKERS = ("model_index.json", CONFIG_NAME)


def _is_model(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).is_file() for marker in _MARKERS)


def _children(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if _is_model(p)}


def discover(models_root: Path | None = None) -> dict[str, Path]:
    """name -> folder for every shipped model and every model folder directly under `models_root`."""
    found = _children(SHIPPED_MODELS_DIR)
    if models_root is not None:
        found.update(_children(Path(models_root)))
    return found


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith((".", "~"))


def is_bare_name(text: str) -> bool:
    """No path separator: a model name, never a path (even ".", ".." or "~")."""
    return "/" not in text and "\\" not in text


def _not_found(name_or_path: str, known: dict[str, Path]) -> ModelNotFoundError:
    return ModelNotFoundError(f"no model named {name_or_path!r}; known models are {sorted(known)}")


def allowed_roots(models_root: str | Path | None) -> list[Path]:
    """The folders a restricted load may read from: the shipped models and `models_root`, resolved."""
    return resolved_roots([SHIPPED_MODELS_DIR, *([models_root] if models_root is not None else [])])


def resolve(
    name_or_path: str, models_root: Path | None = None, *, restrict_to_root: bool = False, field: str = "path"
) -> Path:
    """The folder of a model name (see `discover`) or of a path to a model folder.

    restrict_to_root: for untrusted input (the server). A bare name (no path separator) is only
    looked up among the known models, never in the working directory. A path must lie, once
    `..` and symlinks are resolved, inside `models_root` or the shipped models folder, else
    ForbiddenPathError (checked before the path's existence, so nothing about it leaks); the
    resolved folder is returned, so what was checked is what gets loaded. A string no file
    system could take (empty, NUL, control characters, a component over NAME_MAX) is an
    InvalidRequestError naming `field` rather than an OSError from deep inside `stat`.
    Raises ModelNotFoundError listing the known names when nothing matches.
    """
    known = discover(models_root)
    if restrict_to_root:
        # The string first: NUL or an over-long component would fail inside os.stat otherwise.
        # An empty name stays a lookup miss, which lists the known models.
        if name_or_path:
            check_path_text(name_or_path, field)
        if is_bare_name(name_or_path):
            if name_or_path in known:
                return known[name_or_path]
            raise _not_found(name_or_path, known)
        try:
            path = Path(name_or_path).expanduser()
        except RuntimeError:  # "~user/..." of an unknown user: not provably inside
            path = None
        if path is None or not is_inside(path, allowed_roots(models_root)):
            raise ForbiddenPathError(
                f"`model` path {name_or_path!r} lies outside the models root {models_root} and the shipped models"
            )
        path = path.resolve()
        if _is_model(path):
            return path
        raise _not_found(name_or_path, known)
    if name_or_path in known and not _looks_like_path(name_or_path):
        return known[name_or_path]
    path = Path(name_or_path).expanduser()
    if _is_model(path):
        return path
    raise _not_found(name_or_path, known)
