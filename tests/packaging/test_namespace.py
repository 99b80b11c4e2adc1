"""flashstep installs one import package and shadows no other distribution's.

The user's layout keeps `server/`, `models/`, `kernels/`, `training/` and `bench/` at the top of the
repository; they are imported only as `flashstep.<folder>`. Hugging Face's `kernels` package has
the same name as our folder and transformers imports it, so these tests run exactly that pairing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
USER_FOLDERS = ("server", "models", "kernels", "training", "bench")


def test_the_user_folders_are_not_importable_packages_of_their_own():
    """No top-level folder holds an __init__.py: from the repository root they cannot shadow a package."""
    for folder in USER_FOLDERS:
        assert (REPO / folder).is_dir()
        assert not (REPO / folder / "__init__.py").exists(), folder
        assert (REPO / "flashstep" / folder).resolve() == (REPO / folder).resolve(), folder


@pytest.mark.slow
def test_hf_kernels_transformers_and_flashstep_share_a_process_and_diffusers_loads_a_lora():
    """From the repository root (cwd first on sys.path, as `python -m` puts it), `import kernels` is
    Hugging Face's, and diffusers' PEFT path loads the shipped Hyper-SD LoRA onto the teacher."""
    script = textwrap.dedent(
        """
        import importlib.metadata, sys
        import kernels, transformers
        import flashstep.kernels.dispatch, flashstep.models.registry
        from diffusers import StableDiffusionPipeline
        from flashstep.models.registry import SHIPPED_MODELS_DIR

        assert "site-packages" in kernels.__file__, kernels.__file__
        assert importlib.metadata.version("kernels")
        assert flashstep.kernels.dispatch.__file__.startswith(sys.argv[1]), flashstep.kernels.dispatch.__file__
        import torch
        pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODELS_DIR / "shapes-teacher")
        unet = pipe.unet
        x = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 4, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before = unet(x, 999, text).sample
            pipe.load_lora_weights(SHIPPED_MODELS_DIR / "shapes-hypersd", weight_name="pytorch_lora_weights.safetensors")
            after = unet(x, 999, text).sample
        changed = (after - before).abs().max().item()
        assert changed > 1e-3, f"the LoRA left the UNet's output unchanged ({changed})"
        print("transformers", transformers.__version__, "changed", changed)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "changed" in run.stdout


@pytest.mark.slow
def test_the_wheel_has_exactly_one_top_level_package(tmp_path):
    """`pip wheel --no-deps .` ships `flashstep` and nothing else at the top, with the package data."""
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = tmp_path.glob("flashstep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"flashstep"}, top
    for expected in (
        "flashstep/server/app.py",
        "flashstep/server/static/index.html",
        "flashstep/kernels/dispatch.py",
        "flashstep/models/shipped/shapes-teacher/flashstep.json",
        "flashstep/training/assets/judge.safetensors",
        "flashstep/bench/load.py",
    ):
        assert expected in names, expected
