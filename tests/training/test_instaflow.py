"""InstaFlow: the reflow target by hand, and the whole recipe on a tiny teacher end to end."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from flashstep.models.engine import Engine
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.training.distill import load_teacher
from flashstep.training.distribution_matching import DistributionMatchingConfig
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.recipes.instaflow import train_instaflow
from flashstep.training.recipes.instaflow_refine import refine_instaflow
from flashstep.training.rectified_flow import (
    generate_pairs,
    load_pairs,
    one_step,
    one_step_loss,
    reflow_target,
    teacher_pairs,
)
from flashstep.training.teacher_refinement import TeacherRefinement
from tests.training.conftest import INSTAFLOW_TINY as TINY


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


def test_pairs_are_seeded_by_index_so_a_leg_can_start_past_the_pairs_earlier_legs_fitted(tiny_teacher_dir, tmp_path):
    teacher = load_teacher(tiny_teacher_dir)
    first = replace(TINY, pairs=8)  # two chunks of 4
    later = replace(first, pairs=4, pair_start=4)
    generate_pairs(teacher, first, tmp_path / "first", progress=False)
    generate_pairs(teacher, later, tmp_path / "later", progress=False)
    assert [p.name for p in (tmp_path / "later").iterdir()] == ["pairs_0001.safetensors"]
    z_all, x_all, captions_all = load_pairs(tmp_path / "first")
    z, x, captions = load_pairs(tmp_path / "later", later)
    assert torch.equal(z, z_all[4:]) and captions == captions_all[4:]
    assert torch.allclose(x, x_all[4:], atol=1e-5)
    # With a config, only its chunks load, whatever else the folder holds.
    assert torch.equal(load_pairs(tmp_path / "first", later)[0], z)
    with pytest.raises(ValueError, match="multiple of pair_batch"):
        generate_pairs(teacher, replace(first, pair_start=2), tmp_path / "odd", progress=False)


def test_bf16_teacher_pairs_are_fp32_latents_close_to_the_fp32_ones(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    captions = ["a red circle", "a blue star", "a small green square", "a yellow triangle"]
    z = torch.randn((4, *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    x32 = teacher_pairs(teacher, captions, z, 4, 4.0)
    x16 = teacher_pairs(teacher, captions, z, 4, 4.0, bf16=True)
    assert x16.dtype == torch.float32 and not torch.equal(x16, x32)  # autocast acted, the result is fp32
    assert (x16 - x32).pow(2).mean() < 1e-2 * x32.var()


@pytest.mark.slow
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
    assert (two.family, two.prediction, two.default_steps) == ("instaflow", "flow_match", 2)  # exported with diffusers' flow sign
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


@pytest.mark.slow
def test_refining_a_one_step_student_continues_its_training_and_records_each_leg(tiny_teacher_dir, random_judge, tmp_path):
    train_instaflow(TINY, tmp_path / "run", None, tmp_path / "one", teacher_dir=tiny_teacher_dir, judge=random_judge, progress=False)
    refine = replace(TINY, pairs=8, distill_steps=2, perceptual_steps=2)
    legs = [(tmp_path / "one", tmp_path / "refined"), (tmp_path / "refined", tmp_path / "refined-twice")]
    for i, (student, out) in enumerate(legs):
        report = refine_instaflow(refine, tmp_path / f"refine{i}", student, out, teacher_dir=tiny_teacher_dir,
                                  judge=random_judge, progress=False)  # fmt: skip
        assert set(report) == {"pairs_seconds", "refine_seconds", "config"}
        assert (tmp_path / f"refine{i}" / "refine" / "train_state.safetensors").is_file()
    assert len(load_pairs(tmp_path / "refine0" / "pairs")[0]) == 8

    before = FlashstepConfig.load(tmp_path / "one")
    after = FlashstepConfig.load(tmp_path / "refined-twice")
    assert replace(after, provenance={}) == replace(before, provenance={})  # serves exactly as the student did
    assert after.provenance["recipe"] == before.provenance["recipe"]
    assert [(leg["student"], leg["steps"], leg["pairs"]) for leg in after.provenance["refinements"]] == [
        ("one", 2, 8), ("refined", 2, 8)
    ]
    old = UNet2DConditionModel.from_pretrained(tmp_path / "one" / "unet").state_dict()
    new = UNet2DConditionModel.from_pretrained(tmp_path / "refined-twice" / "unet").state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old), "refinement left the weights unchanged"
    result = Engine.load(tmp_path / "refined-twice").generate([GenerationRequest(prompt="a red circle", seed=3)])
    assert result.unet_evals == 1 and result.images[0].size == (64, 64)


@pytest.mark.slow
def test_refining_a_2_rectified_flow_continues_its_reflow_on_the_pairs(tiny_teacher_dir, random_judge, tmp_path):
    train_instaflow(TINY, tmp_path / "run", tmp_path / "2rf", None, teacher_dir=tiny_teacher_dir, judge=random_judge, progress=False)
    refine = replace(TINY, pairs=8, reflow_steps=60, lr=3e-3, warmup=1, ema_decay=0.0, batch_size=8)
    refine_instaflow(refine, tmp_path / "refine", tmp_path / "2rf", tmp_path / "refined", teacher_dir=tiny_teacher_dir,
                     judge=random_judge, progress=False)  # fmt: skip

    before, after = FlashstepConfig.load(tmp_path / "2rf"), FlashstepConfig.load(tmp_path / "refined")
    assert replace(after, provenance={}) == replace(before, provenance={})  # still served at 2 to 8 steps
    (leg,) = after.provenance["refinements"]
    assert (leg["recipe"], leg["steps"], leg["pairs"]) == ("reflow", 60, 8)
    assert "perceptual_steps" not in leg

    # The leg fitted the velocity of the straight lines between its pairs' ends.
    teacher = load_teacher(tiny_teacher_dir)
    z, x, captions = load_pairs(tmp_path / "refine" / "pairs")
    embeds = teacher.encode_prompts(captions)
    t = torch.linspace(0.05, 0.95, len(z))
    xt, timestep, target = reflow_target(z, x, t)

    def velocity_error(folder) -> float:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet").float()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(unet(xt, timestep, encoder_hidden_states=embeds).sample, target).item()

    assert velocity_error(tmp_path / "refined") < 0.8 * velocity_error(tmp_path / "2rf")
    result = Engine.load(tmp_path / "refined").generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=2)])
    assert result.unet_evals == 2

    with pytest.raises(ValueError, match="multi-step rectified flow: `distribution_matching` acts on one-step samples only"):
        refine_instaflow(replace(refine, distribution_matching=DistributionMatchingConfig()), tmp_path / "dmd",
                         tmp_path / "2rf", tmp_path / "out", teacher_dir=tiny_teacher_dir, judge=random_judge,
                         progress=False)  # fmt: skip


def test_self_refinement_regresses_the_students_sample_onto_the_teachers_touch_up_of_it(tiny_teacher_dir, random_judge):
    """A teacher that predicts eps = 0 refines x0 to x0 + sqrt((1 - abar_300) / abar_300) z (see
    test_teacher_refinement), so the loss of a batch with no pair latent is exactly that offset's mean
    square, whatever the student draws, and its gradient pulls the sample along +z."""
    teacher = load_teacher(tiny_teacher_dir)
    teacher.unet.conv_out.weight.data.zero_()
    teacher.unet.conv_out.bias.data.zero_()
    student = load_teacher(tiny_teacher_dir).unet.requires_grad_(True)
    cfg = replace(TINY, perceptual_steps=0, self_refine=TeacherRefinement(timestep=300, steps=2))
    loss = one_step_loss(cfg, JudgePerceptual(teacher, random_judge), teacher=teacher)
    z = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    embeds = teacher.encode_prompts(["a red circle", "a blue star"])
    abar = teacher.alphas_cumprod[300]
    value = loss(student, z, None, embeds, 0, torch.Generator())
    torch.testing.assert_close(value, ((1 - abar) / abar) * z.pow(2).mean())

    # The target carries no gradient: were it not detached, pred - (pred + c z) would leave the student
    # nothing to learn. Its gradients are those of the MSE to a fixed pred + c z.
    value.backward()
    reference = load_teacher(tiny_teacher_dir).unet.requires_grad_(True)
    pred = one_step(reference, z, embeds)
    torch.nn.functional.mse_loss(pred, (pred + ((1 - abar) / abar).sqrt() * z).detach()).backward()
    grads = [(p.grad, r.grad) for p, r in zip(student.parameters(), reference.parameters(), strict=True)]
    assert any(g.abs().sum() > 0 for g, _ in grads)
    for got, want in grads:
        torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in teacher.unet.parameters())

    without = one_step_loss(replace(cfg, self_refine=None), JudgePerceptual(teacher, random_judge), teacher=teacher)
    with pytest.raises(ValueError, match="needs `self_refine` and the teacher"):
        without(student, z, None, embeds, 0, torch.Generator())


@pytest.mark.slow
def test_a_self_refined_leg_needs_no_pairs_and_records_its_target(tiny_teacher_dir, random_judge, tmp_path):
    train_instaflow(TINY, tmp_path / "run", tmp_path / "2rf", tmp_path / "one", teacher_dir=tiny_teacher_dir,
                    judge=random_judge, progress=False)  # fmt: skip
    refine = replace(TINY, distill_steps=2, perceptual_steps=2, self_refine=TeacherRefinement(timestep=200, steps=1))
    report = refine_instaflow(refine, tmp_path / "self", tmp_path / "one", tmp_path / "refined",
                              teacher_dir=tiny_teacher_dir, judge=random_judge, progress=False)  # fmt: skip
    assert report["pairs_seconds"] == 0 and not (tmp_path / "self" / "pairs").exists()
    (leg,) = FlashstepConfig.load(tmp_path / "refined").provenance["refinements"]
    assert (leg["steps"], leg["pairs"], leg["self_refine"]) == (2, 0, {"timestep": 200, "steps": 1, "guidance": 2.0, "bf16": False})
    assert leg["target"] == "its own one-step sample of fresh noise, refined by the teacher (t=200, 1 DDIM steps, CFG 2)"
    assert "pair_start" not in leg
    old = UNet2DConditionModel.from_pretrained(tmp_path / "one" / "unet").state_dict()
    new = UNet2DConditionModel.from_pretrained(tmp_path / "refined" / "unet").state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old), "the leg left the weights unchanged"
    assert Engine.load(tmp_path / "refined").generate([GenerationRequest(prompt="a red circle", seed=3)]).unet_evals == 1

    with pytest.raises(ValueError, match="multi-step rectified flow: `self_refine` acts on one-step samples only"):
        refine_instaflow(refine, tmp_path / "rf", tmp_path / "2rf", tmp_path / "out", teacher_dir=tiny_teacher_dir,
                         judge=random_judge, progress=False)  # fmt: skip


def test_only_an_instaflow_student_can_be_refined(tiny_teacher_dir, random_judge, tmp_path):
    with pytest.raises(ValueError, match="not an instaflow student \\(family teacher\\)"):
        refine_instaflow(TINY, tmp_path / "run", tiny_teacher_dir, tmp_path / "out", teacher_dir=tiny_teacher_dir,
                         judge=random_judge, progress=False)  # fmt: skip


def test_the_perceptual_loss_can_weigh_colour_pooled_to_16_by_16(tiny_teacher_dir, random_judge):
    teacher = load_teacher(tiny_teacher_dir)
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn((2, 4, 8, 8), generator=gen), torch.randn((2, 4, 8, 8), generator=gen)
    plain, coloured = JudgePerceptual(teacher, random_judge), JudgePerceptual(teacher, random_judge, colour_weight=2.0)
    assert coloured(target, target).item() == pytest.approx(0.0, abs=1e-6)

    def pooled(latents):  # the decoded image's mean colour over 4 x 4 pixel cells (64 / 16)
        with torch.no_grad():
            images = teacher.vae.decode(latents / teacher.vae.config.scaling_factor).sample.clamp(-1, 1)
        return torch.nn.functional.avg_pool2d(images, 4)

    colour = (pooled(pred) - pooled(target)).pow(2).mean().item()
    assert colour > 0
    assert coloured(pred, target).item() == pytest.approx(plain(pred, target).item() + 2.0 * colour, rel=1e-4)
