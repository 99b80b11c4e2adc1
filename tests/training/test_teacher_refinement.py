"""The teacher's touch-up of a one-step source's sample: the grid, the refusals, and the DDIM arithmetic."""

import pytest
import torch

from flashstep.training.distill import load_teacher
from flashstep.training.teacher_refinement import TeacherRefinement, refine_with_teacher


def test_the_grid_runs_evenly_from_the_timestep_to_zero():
    assert TeacherRefinement().timesteps() == [300, 150, 0]
    assert TeacherRefinement(timestep=200, steps=1).timesteps() == [200, 0]
    assert TeacherRefinement(timestep=999, steps=4).timesteps() == [999, 749, 500, 250, 0]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"timestep": 0}, "`timestep` must be in \\[1, 999\\] but is 0"),
        ({"timestep": 1000}, "`timestep` must be in \\[1, 999\\] but is 1000"),
        ({"steps": 0}, "`steps` must be in \\[1, timestep=300\\] but is 0"),
        ({"timestep": 3, "steps": 4}, "`steps` must be in \\[1, timestep=3\\] but is 4"),
        ({"guidance": -1.0}, "`guidance` must be >= 0 but is -1.0"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        TeacherRefinement(**fields)


def test_with_a_teacher_that_predicts_no_noise_each_step_keeps_the_renoised_latent_as_its_x0(tiny_teacher_dir):
    """eps = 0 everywhere (the UNet's last conv zeroed): x_300 = sqrt(abar) x0 + sqrt(1 - abar) z, the first
    step's x0 prediction is x_300 / sqrt(abar_300), and the second step (eps 0 again) returns it unchanged."""
    teacher = load_teacher(tiny_teacher_dir)
    teacher.unet.conv_out.weight.data.zero_()
    teacher.unet.conv_out.bias.data.zero_()
    gen = torch.Generator().manual_seed(0)
    x0, z = (torch.randn((2, *teacher.latent_shape), generator=gen) for _ in range(2))
    cond = teacher.encode_prompts(["a red circle", "a blue star"])
    abar = teacher.alphas_cumprod[300]
    expected = x0 + ((1 - abar) / abar).sqrt() * z
    torch.testing.assert_close(refine_with_teacher(teacher, x0, z, cond, TeacherRefinement()), expected)


def test_the_target_is_a_function_of_the_noise_and_the_teacher_moves_it(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    gen = torch.Generator().manual_seed(1)
    x0, z, other = (torch.randn((2, *teacher.latent_shape), generator=gen) for _ in range(3))
    cond = teacher.encode_prompts(["a red circle", "a blue star"])
    cfg = TeacherRefinement(timestep=200, steps=2, guidance=2.0)
    first = refine_with_teacher(teacher, x0, z, cond, cfg)
    torch.testing.assert_close(refine_with_teacher(teacher, x0, z, cond, cfg), first)  # one z, one target
    assert not torch.allclose(refine_with_teacher(teacher, x0, other, cond, cfg), first)
    assert first.shape == x0.shape and torch.isfinite(first).all()
    assert not torch.allclose(first, x0, atol=1e-3)


def test_a_bf16_touch_up_runs_the_teacher_in_bfloat16_and_lands_near_the_fp32_one(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    gen = torch.Generator().manual_seed(2)
    x0, z = (torch.randn((2, *teacher.latent_shape), generator=gen) for _ in range(2))
    cond = teacher.encode_prompts(["a red circle", "a blue star"])
    exact = refine_with_teacher(teacher, x0, z, cond, TeacherRefinement(timestep=200, steps=2))
    fast = refine_with_teacher(teacher, x0, z, cond, TeacherRefinement(timestep=200, steps=2, bf16=True))
    assert fast.dtype == torch.float32 and not torch.equal(fast, exact)  # autocast ran, and handed back fp32
    torch.testing.assert_close(fast, exact, atol=0.05 * exact.abs().max().item(), rtol=0)
