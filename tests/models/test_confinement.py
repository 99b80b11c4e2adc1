"""Specs of what a confined load may read (models/confinement.py) and of refusals at load time.

A confined load (the server's) reads only inside the models root and the shipped folder: the
folder, its `base` and `lora`, and every symlink in them. The library loads any folder it is
given, but never one that carries a pickle or names a class outside the allowlist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flashstep.models.confinement import check_path_text, confine, confine_tree
from flashstep.models.engine import Engine, load_engine
from flashstep.models.errors import (
    CheckpointError,
    ForbiddenPathError,
    InvalidRequestError,
    NonFiniteOutputError,
)
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.loading import check_model_index
from flashstep.models.outputs import GenerationRequest
from flashstep.models.registry import SHIPPED_MODELS_DIR, allowed_roots, resolve


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def outside(tmp_path, teacher_dir) -> Path:
    """A valid checkpoint outside the root: a target symlinks and `base` must not reach."""
    return shutil.copytree(teacher_dir, tmp_path / "outside" / "teacher")


@pytest.mark.parametrize(
    "text", ["", "a\x00b", "x" * 256, "ok/" + "y" * 300, "tab\there", "bad\udc80name"], ids=repr
)
def test_strings_no_file_system_takes_are_a_request_error_naming_the_field(text):
    with pytest.raises(InvalidRequestError) as err:
        check_path_text(text, "path")
    assert err.value.field == "path"


def test_restricted_resolve_refuses_such_strings_before_touching_the_disk(root):
    for text in ("a\x00b", "z" * 300, "../" + "z" * 300):
        with pytest.raises(InvalidRequestError):
            resolve(text, root, restrict_to_root=True)


def test_a_symlink_leaving_the_roots_is_forbidden_and_one_inside_is_fine(root, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    model = root / "m"
    (model / "inner").mkdir(parents=True)
    (model / "inside").symlink_to(model / "inner")
    confine_tree(model, [root])
    (model / "escape").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ForbiddenPathError, match="escape"):
        confine_tree(model, [root])
    confine_tree(model, None)  # unconfined: links are the user's business
    with pytest.raises(ForbiddenPathError):
        confine(model / "escape", [root], "folder")


def test_the_shipped_students_links_to_the_teacher_stay_inside():
    links = [p for p in SHIPPED_MODELS_DIR.rglob("*") if p.is_symlink()]
    assert links, "the shipped students are expected to link the teacher's pieces"
    for folder in SHIPPED_MODELS_DIR.iterdir():
        if folder.is_dir():
            confine_tree(folder, allowed_roots(None))


def test_a_folder_whose_piece_is_a_symlink_out_of_the_root_is_refused(root, outside, teacher_dir):
    model = shutil.copytree(teacher_dir, root / "linked")
    shutil.rmtree(model / "unet")
    (model / "unet").symlink_to(outside / "unet")
    with pytest.raises(ForbiddenPathError, match="unet"):
        load_engine("linked", root, restrict_to_root=True)


def test_a_weight_file_symlinked_out_of_the_root_is_refused(root, outside, teacher_dir):
    model = shutil.copytree(teacher_dir, root / "linked-file")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to(outside / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ForbiddenPathError, match="vae"):
        load_engine("linked-file", root, restrict_to_root=True)


@pytest.mark.parametrize("key", ["base", "lora"])
def test_base_or_lora_outside_the_root_is_refused(root, outside, key):
    model = root / f"{key}-outside"
    model.mkdir()
    values = {"base": str(outside), "lora": "x.safetensors"}
    if key == "lora":
        values = {"base": None, "lora": str(outside / "unet" / "diffusion_pytorch_model.safetensors")}
        shutil.copytree(outside, model, dirs_exist_ok=True)
    FlashstepConfig(family="hypersd", default_steps=1, allowed_steps=(1,), resolution=64, **values).save(model)
    with pytest.raises(ForbiddenPathError, match=key):
        load_engine(model.name, root, restrict_to_root=True)


def test_a_pickle_anywhere_is_refused_even_beside_safetensors(teacher_dir, tmp_path):
    model = shutil.copytree(teacher_dir, tmp_path / "pickled")
    (model / "tokenizer" / "extra.pkl").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="tokenizer/extra.pkl"):
        Engine.load(model)


def test_model_index_classes_come_from_the_allowlist(teacher_dir, tmp_path):
    model = shutil.copytree(teacher_dir, tmp_path / "evil-class")
    index = json.loads((model / "model_index.json").read_text())
    check_model_index(index)
    index["text_encoder"] = ["transformers", "AutoModel"]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="transformers.AutoModel"):
        Engine.load(model)
    with pytest.raises(CheckpointError, match="os.system"):
        check_model_index({"unet": ["os", "system"]})


def test_a_non_finite_image_raises_with_the_good_images_kept(swiftbrush):
    requests = [GenerationRequest(prompt="a red circle", seed=s) for s in (1, 2, 3)]

    def poison(module, inputs, output):  # (B, 3, H, W)
        output = output.clone()
        output[1] = float("nan")
        return output

    hook = swiftbrush.vae.decoder.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteOutputError) as err:
            swiftbrush.generate(requests)
    finally:
        hook.remove()
    assert err.value.indices == [1]
    clean = swiftbrush.generate([requests[2]])
    kept = err.value.result.images[2]
    assert kept.tobytes() == clean.images[0].tobytes()
