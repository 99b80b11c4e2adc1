"""Tiny seeded checkpoints for the engine tests, built once per session.

`training.export.export_random` writes one real SD-format folder (64 px images, 8x8x4 latents, a
CLIP text encoder with a 32-token tokenizer); the other families reuse its weights with their
own flashstep.json, which is all a sampler test needs. The SDXL-shaped folder is assembled from
scaled-down modules whose configs match the public SDXL ones in structure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.training.export import export_random


def derive(src: Path, dst: Path, config: FlashstepConfig) -> Path:
    """A copy of checkpoint `src` at `dst` with its flashstep.json replaced by `config`."""
    shutil.copytree(src, dst)
    config.save(dst)
    return dst


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    """Root folder of the session's tiny checkpoints."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def teacher_dir(checkpoints) -> Path:
    config = FlashstepConfig(
        family="teacher",
        default_steps=4,
        allowed_steps=(1, 2, 4),
        default_guidance_scale=5.0,
        resolution=64,
        allowed_resolutions=(32,),
        nasa_alpha=0.1,
    )
    return export_random(checkpoints / "shapes-teacher", config, seed=0)


@pytest.fixture(scope="session")
def student_dir(checkpoints, teacher_dir) -> Path:
    """A second, differently seeded UNet (a stand-in distilled model) with the teacher's other pieces."""
    from diffusers import UNet2DConditionModel

    from flashstep.training.architecture import ShapesArch, build_unet

    folder = derive(teacher_dir, checkpoints / "_student", FlashstepConfig(family="teacher", resolution=64))
    torch.manual_seed(1)
    unet: UNet2DConditionModel = build_unet(ShapesArch.tiny())
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def swiftbrush_dir(checkpoints, student_dir) -> Path:
    config = FlashstepConfig(family="swiftbrush", resolution=64, nasa_alpha=0.1, base="shapes-teacher")
    return derive(student_dir, checkpoints / "shapes-swiftbrush", config)


@pytest.fixture(scope="session")
def lcm_dir(checkpoints, student_dir) -> Path:
    config = FlashstepConfig(
        family="lcm", default_steps=4, allowed_steps=(1, 2, 4), resolution=64, base="shapes-teacher"
    )
    return derive(student_dir, checkpoints / "shapes-lcm", config)


@pytest.fixture(scope="session")
def instaflow_dir(checkpoints, student_dir) -> Path:
    config = FlashstepConfig(
        family="instaflow", prediction="flow", default_steps=1, allowed_steps=(1, 2, 4),
        resolution=64, base="shapes-teacher", default_guidance_scale=0.0,
    )  # fmt: skip
    return derive(student_dir, checkpoints / "shapes-instaflow", config)


@pytest.fixture(scope="session")
def hypersd_unet_dir(checkpoints, student_dir) -> Path:
    """A Hyper-SD-family folder with its own (already fused) UNet: sampler tests without a LoRA."""
    config = FlashstepConfig(
        family="hypersd", default_steps=1, allowed_steps=(1, 2, 4, 8), eta=1.0, resolution=64,
        base="shapes-teacher", timesteps={"2": [999, 499], "4": [999, 749, 499, 249]},
    )  # fmt: skip
    return derive(student_dir, checkpoints / "shapes-hypersd-fused", config)


@pytest.fixture(scope="session")
def models_root(checkpoints, teacher_dir, swiftbrush_dir, lcm_dir, instaflow_dir) -> Path:
    """The checkpoints folder doubles as the models root where `base: shapes-teacher` resolves."""
    return checkpoints


@pytest.fixture(scope="session")
def teacher(teacher_dir, models_root):
    from flashstep.models.engine import Engine

    return Engine.load(teacher_dir, models_root=models_root)


@pytest.fixture(scope="session")
def swiftbrush(swiftbrush_dir, models_root):
    from flashstep.models.engine import Engine

    return Engine.load(swiftbrush_dir, models_root=models_root)


@pytest.fixture(scope="session")
def lcm(lcm_dir, models_root):
    from flashstep.models.engine import Engine

    return Engine.load(lcm_dir, models_root=models_root)


@pytest.fixture(scope="session")
def instaflow(instaflow_dir, models_root):
    from flashstep.models.engine import Engine

    return Engine.load(instaflow_dir, models_root=models_root)


@pytest.fixture(scope="session")
def hypersd(hypersd_unet_dir, models_root):
    from flashstep.models.engine import Engine

    return Engine.load(hypersd_unet_dir, models_root=models_root)


class TinyModel:
    """A sampler's `model(x, t)` backed by a tiny seeded UNet and fixed text states; records its calls."""

    def __init__(self, unet: torch.nn.Module, batch: int, prediction_scale: float = 1.0, prediction: str = "epsilon") -> None:
        torch.manual_seed(3)
        self.unet = unet
        self.prediction = prediction  # what the output is, as a Denoiser says
        self.context = torch.randn(batch, 32, unet.config.cross_attention_dim)  # (B, L, C)
        self.scale = prediction_scale
        self.calls: list[tuple[torch.Tensor, float]] = []

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.calls.append((x.clone(), float(t)))
        timestep = torch.full((x.shape[0],), float(t))
        return self.scale * self.unet(x, timestep, encoder_hidden_states=self.context).sample


@pytest.fixture(scope="session")
def tiny_unet(teacher_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(teacher_dir / "unet").eval()
