"""One copy of each weight file in a models root: identical files become relative symlinks.

The distilled students are exported as whole diffusers folders, so each carries the teacher's VAE
and text encoder byte for byte (training never touches them). Git stores one blob for the four
copies, but a checkout writes four, and the shipped set's 40 MB budget is what a checkout holds.
Linking the copies to one file keeps every folder a complete diffusers folder (`from_pretrained`
follows the link, the registry resolves it inside the shipped folder) at the cost of one file.

The file kept is the one in a folder whose `flashstep.json` says `family: teacher` (the students'
source), else the first by path. Links are relative, so the root can be copied whole (`cp -a`, the
Dockerfile's seeding of /models); copying one linked folder out on its own breaks its links.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from flashstep.models.flashstep_config import CONFIG_NAME, FlashstepConfig


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_teacher_file(root: Path, path: Path) -> bool:
    folder = root / path.relative_to(root).parts[0]
    return (folder / CONFIG_NAME).is_file() and FlashstepConfig.load(folder).family == "teacher"


def link_identical_weights(root: str | Path) -> list[tuple[Path, Path]]:
    """Replace every safetensors file under `root` that duplicates another by a relative symlink to it.

    Returns (link, target) for each link made; files already linked are left as they are, so a second
    run makes none.
    """
    root = Path(root).resolve()
    groups: dict[tuple[int, str], list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.safetensors")):
        if not path.is_symlink():
            groups[(path.stat().st_size, _digest(path))].append(path)
    made = []
    for paths in groups.values():
        if len(paths) < 2:
            continue
        keep = next((p for p in paths if _is_teacher_file(root, p)), paths[0])
        for path in paths:
            if path == keep:
                continue
            target = Path(os.path.relpath(keep, path.parent))
            path.unlink()
            path.symlink_to(target)
            made.append((path, keep))
    return made


def unique_weight_bytes(*roots: str | Path) -> int:
    """Bytes of the distinct safetensors files under `roots`, a symlink counted once with what it points to."""
    files = {p.resolve() for root in roots for p in Path(root).rglob("*.safetensors")}
    return sum(f.stat().st_size for f in files)
