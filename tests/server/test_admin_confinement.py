"""End-to-end specs of what admin load/swap paths may name and what the loaded folder may read.

Any string is a 4xx naming `path`, never a 500; a folder is refused when anything it reads
(sub-folders, weight files, `base`, `lora`) resolves outside the models root, when it carries a
pickle, or when `model_index.json` names a class outside the allowlist.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.server.app import create_app
from flashstep.server.settings import Settings
from tests.server.conftest import ADMIN_TOKEN, LiveServer, _swiftbrush_config


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """A models root holding `swift` and broken variants of it, and a valid model outside the root."""
    from flashstep.training.architecture import ShapesArch
    from flashstep.training.export import export_random

    base = tmp_path_factory.mktemp("confinement")
    root, outside = base / "root", base / "outside"
    swift = export_random(root / "swift", _swiftbrush_config(), arch=ShapesArch.tiny(), seed=2)
    intruder = export_random(outside / "intruder", _swiftbrush_config(), arch=ShapesArch.tiny(), seed=3)

    linked_dir = shutil.copytree(swift, root / "linked-dir")
    shutil.rmtree(linked_dir / "unet")
    (linked_dir / "unet").symlink_to(intruder / "unet")

    linked_file = shutil.copytree(swift, root / "linked-file")
    weights = linked_file / "text_encoder" / "model.safetensors"
    weights.unlink()
    weights.symlink_to(intruder / "text_encoder" / "model.safetensors")

    lora_base = root / "lora-base-outside"
    lora_base.mkdir()
    FlashstepConfig(family="hypersd", resolution=64, base=str(intruder), lora="lora.safetensors").save(lora_base)

    pickled = shutil.copytree(swift, root / "pickled")
    (pickled / "tokenizer" / "vocab.pkl").write_bytes(b"\x80\x04pickle")

    evil = shutil.copytree(swift, root / "evil-class")
    index = json.loads((evil / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "AutoTokenizer"]
    (evil / "model_index.json").write_text(json.dumps(index))

    (root / "escape").symlink_to(intruder)
    return {"root": root, "outside": outside, "intruder": intruder}


@pytest.fixture(scope="module")
def admin(tree) -> Iterator[httpx.Client]:
    settings = Settings(models_root=tree["root"], models=["swift"], admin_token=ADMIN_TOKEN, warmup=False)
    server = LiveServer(create_app(settings)).start().wait_ready()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client
    server.stop()


@pytest.mark.parametrize(
    "path",
    ["a\x00b", "x" * 300, "swift/" + "y" * 256, "", "../outside", "/etc", "/etc/../etc", "tab\tname", "bad\udc80"],
    ids=repr,
)
def test_any_path_string_is_a_4xx_naming_the_field(admin, path):
    def post(url: str, body: dict) -> httpx.Response:
        # json.dumps escapes a lone surrogate as \\udc80, which a JSON parser turns back into one.
        return admin.post(url, content=json.dumps(body), headers={"content-type": "application/json"})

    for response in (
        post("/admin/models", {"path": path, "name": "probe"}),
        post("/admin/models/swift/swap", {"path": path}),
    ):
        assert 400 <= response.status_code < 500, response.text
        error = response.json()["error"]
        assert error["param"] == "path", error


@pytest.mark.parametrize(
    ("folder", "status", "words"),
    [
        ("linked-dir", 403, "unet"),
        ("linked-file", 403, "text_encoder"),
        ("lora-base-outside", 403, "base"),
        ("escape", 403, "outside"),
        ("pickled", 400, "vocab.pkl"),
        ("evil-class", 400, "transformers.AutoTokenizer"),
    ],
)
def test_folders_reading_outside_the_root_or_unsafe_files_are_refused(admin, tree, folder, status, words):
    for response in (
        admin.post("/admin/models", json={"path": folder, "name": "probe"}),
        admin.post("/admin/models", json={"path": str(tree["root"] / folder), "name": "probe"}),
        admin.post("/admin/models/swift/swap", json={"path": folder}),
    ):
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"]
    assert [m["name"] for m in admin.get("/admin/models").json()["models"]] == ["swift"]


@pytest.mark.slow
def test_the_shipped_students_links_to_the_teacher_still_load(admin):
    loaded = admin.post("/admin/models", json={"path": "shapes-swiftbrush", "name": "shipped-student"})
    assert loaded.status_code == 201, loaded.text
    assert admin.delete("/admin/models/shipped-student").status_code == 200
