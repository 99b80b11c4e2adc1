"""Fixtures the distillation tests share: a tiny random teacher folder and an untrained judge.

The teacher is random (tests check the machinery, not quality), exported exactly as a real
teacher is, so every recipe loads it through the same `load_teacher` path as the shipped one.
"""

import pytest
import torch

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.training.architecture import ShapesArch
from flashstep.training.export import export_random
from flashstep.training.judge import Judge
from flashstep.training.rectified_flow import InstaFlowTrainConfig

# The instaflow recipe in seconds: what its tests and the distribution-matching refinement's run.
INSTAFLOW_TINY = InstaFlowTrainConfig(
    pairs=6, pair_steps=2, pair_batch=4, reflow_steps=3, distill_steps=3, perceptual_steps=1,
    batch_size=2, save_every=2, warmup=1,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    config = FlashstepConfig(
        family="teacher", default_steps=4, allowed_steps=(1, 2, 4, 8), default_guidance_scale=4.0, resolution=64
    )
    return export_random(tmp_path_factory.mktemp("distill") / "tiny-teacher", config, ShapesArch.tiny(), seed=1)


@pytest.fixture(scope="session")
def tiny_instaflow_dir(tmp_path_factory):
    """A random one-step instaflow student, the source a take-over or a regression term reads its targets from."""
    config = FlashstepConfig(family="instaflow", default_steps=1, allowed_steps=(1,), resolution=64)
    return export_random(tmp_path_factory.mktemp("source") / "tiny-instaflow", config, ShapesArch.tiny(), seed=5)


@pytest.fixture(scope="session")
def random_judge():
    torch.manual_seed(0)
    return Judge().eval()
