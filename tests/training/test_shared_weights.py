"""`flashstep link-weights`: a student's byte-identical copy of the teacher's VAE and text encoder
becomes a relative symlink, and every folder still loads, in flashstep and in vanilla diffusers."""

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from flashstep.cli import main as flashstep_main
from flashstep.models.engine import load_engine
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.training.architecture import ShapesArch
from flashstep.training.export import export_random
from flashstep.training.shared_weights import link_identical_weights, unique_weight_bytes

SHARED = ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


@pytest.fixture
def root(tmp_path):
    """A models root with a teacher and a student that carries copies of the teacher's VAE and text encoder.

    The student's folder name sorts first, so keeping the teacher's files is the rule at work, not the order.
    """
    root = tmp_path / "models"
    teacher_cfg = FlashstepConfig(family="teacher", default_steps=2, allowed_steps=(1, 2), default_guidance_scale=4.0, resolution=64)
    export_random(root / "shapes-teacher", teacher_cfg, ShapesArch.tiny(), seed=1)
    student_cfg = FlashstepConfig(family="instaflow", default_steps=1, allowed_steps=(1,), prediction="flow", resolution=64)
    export_random(root / "a-student", student_cfg, ShapesArch.tiny(), seed=2)
    for rel in SHARED:
        shutil.copyfile(root / "shapes-teacher" / rel, root / "a-student" / rel)
    return root


def _image(root, name):
    result = load_engine(name, root, restrict_to_root=True).generate([GenerationRequest(prompt="a red circle", seed=3)])
    return torch.tensor(list(result.images[0].get_flattened_data()), dtype=torch.float32)


@pytest.mark.slow
def test_duplicates_become_relative_links_to_the_teachers_files_and_the_folders_draw_the_same(root):
    before = {name: _image(root, name) for name in ("shapes-teacher", "a-student")}
    total = unique_weight_bytes(root)
    copies = sum((root / "a-student" / rel).stat().st_size for rel in SHARED)
    made = link_identical_weights(root)

    assert sorted(str(link.relative_to(root)) for link, _ in made) == [f"a-student/{rel}" for rel in sorted(SHARED)]
    for link, target in made:
        assert link.is_symlink() and not link.readlink().is_absolute()
        assert link.resolve() == target == root.resolve() / "shapes-teacher" / link.relative_to(root / "a-student")
    assert unique_weight_bytes(root) == total - copies  # the student's copies no longer count
    assert link_identical_weights(root) == []  # a second run has nothing left to link
    for name, image in before.items():
        assert torch.equal(_image(root, name), image)
    pipe = StableDiffusionPipeline.from_pretrained(root / "a-student", safety_checker=None)
    assert pipe.vae is not None and pipe.text_encoder is not None


def test_a_copy_of_the_whole_root_keeps_its_links(root, tmp_path):
    link_identical_weights(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)  # what `cp -a` does when the Dockerfile seeds /models
    assert (copy / "a-student" / SHARED[0]).is_symlink()
    assert (copy / "a-student" / SHARED[0]).resolve().is_relative_to(copy.resolve())
    assert _image(copy, "a-student").shape == _image(root, "a-student").shape


def test_link_weights_from_the_command_line(root, capsys):
    assert flashstep_main(["link-weights", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"a-student/{SHARED[0]} -> shapes-teacher/{SHARED[0]}" in out
    assert f"{unique_weight_bytes(root):,} bytes of distinct weights" in out
