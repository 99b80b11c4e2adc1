"""InstaFlow: the reflow target by hand, and the whole recipe on a tiny teacher end to end."""

import json

import torch
from diffusers import StableDiffusionPipeline

from models.engine import Engine
from models.flashstep_config import FlashstepConfig
from models.outputs import GenerationRequest
from training.instaflow import InstaFlowTrainConfig, load_pairs, reflow_target, train_instaflow

TINY = InstaFlowTrainConfig(
    pairs=6, pair_steps=2, pair_batch=4, reflow_steps=3, distill_steps=3, perceptual_steps=1,
    batch_size=2, save_every=2, warmup=1,
)


def test_reflow_target_matches_a_hand_computation():
    z = torch.tensor([[[[1.0]]], [[[-2.0]]]])  # (2, 1, 1, 1)
    x = torch.tensor([[[[3.0]]], [[[0.5]]]])
    t = torch.tensor([0.25, 1.0])
    xt, timestep, target = reflow_target(z, x, t)
    # x_t = t x + (1 - t) z: 0.25 * 3 + 0.75 * 1 = 1.5; at t = 1 it is the data, 0.5.
    assert torch.allclose(xt.flatten(), torch.tensor([1.5, 0.5]))
    # The UNet's timestep counts noise: (1 - t) * 1000.
    assert torch.allclose(timestep, torch.tensor([750.0, 0.0]))
    # The velocity is constant along the path: x - z.
    assert torch.allclose(target.flatten(), torch.tensor([2.0, 2.5]))
    # One Euler step of the target velocity from the noise end lands on the data.
    assert torch.allclose((z + target), x)


def test_instaflow_recipe_trains_resumes_and_exports_servable_folders(tiny_teacher_dir, random_judge, tmp_path):
    run = tmp_path / "run"
    report = train_instaflow(
        TINY, run, tmp_path / "2rf", tmp_path / "one", teacher_dir=tiny_teacher_dir, judge=random_judge, progress=False
    )
    z, x, captions = load_pairs(run / "pairs")
    assert z.shape == x.shape == (6, 4, 8, 8) and len(captions) == 6
    assert torch.isfinite(x).all() and not torch.allclose(z, x)
    for stage in ("reflow", "distill"):
        meta = json.loads((run / stage / "seconds.json").read_text())
        assert meta["seconds"] > 0
    assert report["config"]["reflow_steps"] == 3

    # Resuming a finished run trains nothing more and exports the same weights.
    again = train_instaflow(
        TINY, run, tmp_path / "2rf-again", None, teacher_dir=tiny_teacher_dir, judge=random_judge, progress=False
    )
    assert again["reflow_seconds"] >= report["reflow_seconds"] - 1

    two = FlashstepConfig.load(tmp_path / "2rf")
    one = FlashstepConfig.load(tmp_path / "one")
    assert (two.family, two.prediction, two.default_steps) == ("instaflow", "flow", 2)
    assert two.hybrid_guidance_scale == 1.0  # the teacher's hybrid step runs without CFG
    assert (one.family, one.default_steps, one.allowed_steps) == ("instaflow", 1, (1,))
    assert one.provenance["teacher"] == "tiny-teacher"

    for folder, steps in ((tmp_path / "2rf", 2), (tmp_path / "one", 1)):
        engine = Engine.load(folder)
        result = engine.generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=steps)])
        assert result.unet_evals == steps
        assert result.images[0].size == (64, 64)
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        assert pipe.unet.config.in_channels == 4
