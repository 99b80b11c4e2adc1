"""Model names -> folders: shipped models, a models root that shadows them, and path restrictions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flashstep.models import registry
from flashstep.models.engine import load_engine
from flashstep.models.errors import ForbiddenPathError, ModelNotFoundError


@pytest.fixture
def shipped(tmp_path, monkeypatch, teacher_dir):
    """A stand-in shipped folder holding one model, `shapes-teacher`."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    shutil.copytree(teacher_dir, folder / "shapes-teacher")
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", folder.resolve())
    return folder


@pytest.fixture
def root(tmp_path, teacher_dir):
    folder = tmp_path / "root"
    folder.mkdir()
    shutil.copytree(teacher_dir, folder / "shapes-teacher")
    shutil.copytree(teacher_dir, folder / "my-model")
    (folder / "not-a-model").mkdir()
    return folder


def test_the_shipped_folder_is_models_shipped():
    assert registry.SHIPPED_MODELS_DIR.parts[-2:] == ("models", "shipped")


def test_discover_lists_shipped_and_root_models_and_the_root_wins(shipped, root):
    assert registry.discover() == {"shapes-teacher": shipped / "shapes-teacher"}
    found = registry.discover(root)
    assert set(found) == {"shapes-teacher", "my-model"}
    assert found["shapes-teacher"] == root / "shapes-teacher"


def test_resolve_names_and_paths(shipped, root):
    assert registry.resolve("my-model", root) == root / "my-model"
    assert registry.resolve(str(root / "my-model")) == root / "my-model"
    with pytest.raises(ModelNotFoundError) as err:
        registry.resolve("nope", root)
    assert "my-model" in str(err.value) and "shapes-teacher" in str(err.value)


def test_restrict_to_root_forbids_paths_outside(shipped, root, tmp_path, teacher_dir):
    assert registry.resolve(str(root / "my-model"), root, restrict_to_root=True) == root / "my-model"
    assert registry.resolve(str(shipped / "shapes-teacher"), root, restrict_to_root=True)
    with pytest.raises(ModelNotFoundError):  # a bare unknown name is not looked up in the working directory
        registry.resolve("models", root, restrict_to_root=True)
    for outside in (str(teacher_dir), str(root / ".." / "shipped" / ".." / "x"), "/etc", "../../secret"):
        with pytest.raises(ForbiddenPathError):
            registry.resolve(outside, root, restrict_to_root=True)


def test_restrict_to_root_looks_bare_names_up_among_known_models_only(shipped, root, tmp_path, teacher_dir, monkeypatch):
    assert registry.resolve("my-model", root, restrict_to_root=True) == root / "my-model"
    assert registry.resolve("shapes-teacher", None, restrict_to_root=True) == shipped / "shapes-teacher"
    # A model folder in the working directory, and the working directory itself a model inside the root:
    # neither is reachable by a name without a path separator.
    cwd = tmp_path / "cwd"
    shutil.copytree(teacher_dir, cwd / "cwd-model")
    monkeypatch.chdir(cwd)
    assert registry.resolve("cwd-model", root) == Path("cwd-model")  # unrestricted: paths are trusted
    for bare in ("cwd-model", "", ".", ".."):
        with pytest.raises(ModelNotFoundError) as err:
            registry.resolve(bare, root, restrict_to_root=True)
        assert "my-model" in str(err.value) and "shapes-teacher" in str(err.value)
    monkeypatch.chdir(root / "my-model")
    for bare in (".", "~", "~root"):
        with pytest.raises(ModelNotFoundError):
            registry.resolve(bare, root, restrict_to_root=True)


def test_restrict_to_root_resolves_dot_dots_and_symlinks_before_checking(shipped, root, tmp_path, teacher_dir, monkeypatch):
    (root / "escape").symlink_to(teacher_dir, target_is_directory=True)  # inside by name, outside in fact
    (tmp_path / "alias").symlink_to(root / "my-model", target_is_directory=True)  # outside by name, inside in fact
    monkeypatch.chdir(root)
    for outside in (
        str(root / "escape"), "escape/", "./escape", "my-model/../../outside",
        "~nosuchuser-flashstep/x", str(tmp_path),
    ):
        with pytest.raises(ForbiddenPathError, match="outside the models root"):
            registry.resolve(outside, root, restrict_to_root=True)
    assert registry.resolve(str(tmp_path / "alias"), root, restrict_to_root=True) == (root / "my-model").resolve()
    assert registry.resolve("./my-model", root, restrict_to_root=True) == (root / "my-model").resolve()
    assert registry.resolve("not-a-model/../my-model", root, restrict_to_root=True) == (root / "my-model").resolve()
    with pytest.raises(ModelNotFoundError):  # inside the root, but no model there
        registry.resolve("./not-a-model", root, restrict_to_root=True)
    with pytest.raises(ForbiddenPathError):  # without a models root only the shipped folder is allowed
        registry.resolve(str(root / "my-model"), None, restrict_to_root=True)


def test_load_engine_names_the_engine_after_the_model(shipped, root):
    engine = load_engine("my-model", root)
    assert engine.name == "my-model" and engine.version.startswith("my-model@")
