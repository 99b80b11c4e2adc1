"""DMD distribution matching: the gradient by hand, the fake score, and a refinement that trains with it."""

import math
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from flashstep.models.engine import Engine
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.training.checkpointing import TRAIN_STATE
from flashstep.training.distill import add_noise, load_teacher, student_unet, unet_eps
from flashstep.training.distribution_matching import (
    DistributionMatching,
    DistributionMatchingConfig,
    dmd_grad,
    predicted_x0,
)
from flashstep.training.lora import adapters_off
from flashstep.training.perceptual import JudgePerceptual
from flashstep.training.recipes.instaflow import train_instaflow
from flashstep.training.recipes.instaflow_refine import refine_instaflow
from flashstep.training.rectified_flow import one_step, one_step_loss
from tests.training.conftest import INSTAFLOW_TINY as TINY


def test_dmd_gradient_matches_a_hand_computation():
    x = torch.tensor([1.0, 3.0, 0.0, 0.0]).view(2, 2, 1, 1)  # (B=2, C=2, 1, 1)
    x0_real = torch.tensor([0.0, 1.0, 0.5, -0.5]).view(2, 2, 1, 1)
    x0_fake = torch.tensor([2.0, 1.0, 0.0, 0.5]).view(2, 2, 1, 1)
    grad = dmd_grad(x, x0_real, x0_fake)
    # (x0_fake - x0_real) / mean|x - x0_real| per sample: sample 0 divides by (1 + 2) / 2, sample 1 by 0.5.
    want = torch.tensor([2.0 / 1.5, 0.0, -0.5 / 0.5, 1.0 / 0.5]).view(2, 2, 1, 1)
    assert torch.allclose(grad, want)


def test_predicted_x0_undoes_the_forward_noising_given_the_true_noise():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((3, 4, 2, 2), generator=gen), torch.randn((3, 4, 2, 2), generator=gen)
    abar = torch.tensor([0.9, 0.3, 0.01])
    assert torch.allclose(predicted_x0(add_noise(x0, noise, abar), noise, abar), x0, atol=1e-4)


def test_the_config_refuses_a_fake_score_that_never_updates_and_a_timestep_range_off_the_schedule():
    with pytest.raises(ValueError, match="fake_updates"):
        DistributionMatchingConfig(fake_updates=0)
    with pytest.raises(ValueError, match="t_range"):
        DistributionMatchingConfig(t_range=(500, 1000))


@pytest.mark.slow
def test_with_no_guidance_and_an_untrained_fake_score_the_gradient_is_zero(tiny_teacher_dir):
    # The fake score starts equal to the teacher; with the real score unguided the two agree, so
    # the matching term must not move the student until the fake score has learned its samples.
    teacher = load_teacher(tiny_teacher_dir)
    matching = DistributionMatching(teacher, DistributionMatchingConfig(guidance=1.0))
    x = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(1)).requires_grad_(
        True
    )
    embeds = teacher.encode_prompts(["a red circle", "a blue star"])
    loss = matching.loss(x, embeds, torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(loss, x)
    # (Up to rounding: CFG at scale 1 computes e_u + (e_c - e_u), not e_c.)
    assert loss.item() < 1e-10 and grad.abs().max() < 1e-8

    guided = DistributionMatching(teacher, DistributionMatchingConfig(guidance=4.0))
    (grad,) = torch.autograd.grad(guided.loss(x, embeds, torch.Generator().manual_seed(2)), x)
    # Guided, the real score leaves the fake one and the term pulls x.
    assert grad.abs().max() > 1e-6 and math.isfinite(grad.norm().item())


@pytest.mark.slow
def test_fitting_the_fake_score_trains_only_its_lora_and_the_real_score_stays_the_teacher(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    matching = DistributionMatching(teacher, DistributionMatchingConfig(fake_updates=3, lora_lr=1e-2))
    x = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(1))
    embeds = teacher.encode_prompts(["a red circle", "a blue star"])
    xt, t = torch.randn_like(x), torch.tensor([500, 900])
    before = unet_eps(matching.scores, xt, t, embeds).detach()
    matching.fit(x, embeds, torch.Generator().manual_seed(3))
    after = unet_eps(matching.scores, xt, t, embeds).detach()
    assert not torch.allclose(before, after), "three fake-score updates left it unchanged"
    with adapters_off(matching.scores):
        assert torch.allclose(unet_eps(matching.scores, xt, t, embeds), unet_eps(teacher.unet, xt, t, embeds))
    modules, optimizers = matching.state()
    assert set(modules) == set(optimizers) == {"fake_score"}
    assert all("lora_" in name for name, _ in modules["fake_score"].named_parameters())


@pytest.mark.slow
def test_a_refinement_with_distribution_matching_saves_its_fake_score_and_records_the_term(
    tiny_teacher_dir, random_judge, tmp_path
):
    train_instaflow(
        TINY,
        tmp_path / "run",
        None,
        tmp_path / "one",
        teacher_dir=tiny_teacher_dir,
        judge=random_judge,
        progress=False,
    )
    dm = DistributionMatchingConfig(weight=0.5, fake_warmup=1, lora_rank=4)
    refine = replace(TINY, distribution_matching=dm)
    refine_instaflow(refine, tmp_path / "refine", tmp_path / "one", tmp_path / "refined",
                     teacher_dir=tiny_teacher_dir, judge=random_judge, progress=False)  # fmt: skip

    with safe_open(str(tmp_path / "refine" / "refine" / TRAIN_STATE), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("module.fake_score.") for k in keys)  # a resumed run keeps its fake score
    assert any(k.startswith("optim.fake_score") for k in keys)
    leg = FlashstepConfig.load(tmp_path / "refined").provenance["refinements"][0]
    assert leg["distribution_matching"]["weight"] == 0.5 and leg["distribution_matching"]["guidance"] == 4.0
    result = Engine.load(tmp_path / "refined").generate([GenerationRequest(prompt="a red circle", seed=3)])
    assert result.unet_evals == 1 and result.images[0].size == (64, 64)


@pytest.mark.slow
def test_the_one_step_loss_matches_distributions_on_fresh_noise_not_on_the_pairs_noise(tiny_teacher_dir, random_judge):
    # The student fits its fixed set of pair noises far better than new noise; the served case is new noise.
    teacher = load_teacher(tiny_teacher_dir)
    seen = []

    class Recording(DistributionMatching):
        def loss(self, x, embeds, gen):
            seen.append(x.detach().clone())
            return super().loss(x, embeds, gen)

    matching = Recording(teacher, DistributionMatchingConfig(fake_warmup=0, lora_rank=4))
    loss_fn = one_step_loss(replace(TINY, perceptual_steps=0), JudgePerceptual(teacher, random_judge), matching)
    unet = student_unet(teacher)
    z = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    embeds = teacher.encode_prompts(["a red circle", "a blue star"])
    value = loss_fn(unet, z, torch.zeros_like(z), embeds, 0, torch.Generator().manual_seed(1))
    assert torch.isfinite(value) and len(seen) == 1
    with torch.no_grad():
        on_pairs = one_step(unet, z, embeds)
    assert seen[0].shape == on_pairs.shape and not torch.allclose(seen[0], on_pairs)
