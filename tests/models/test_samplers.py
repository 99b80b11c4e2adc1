"""Each family's sampler against an independent reference on a tiny seeded UNet.

References: diffusers' own schedulers stepped by hand (DPM-Solver++, DDIM, TCD) or the papers'
formulas written out (SwiftBrush eps -> x0, InstaFlow's Euler loop, DMD2's re-noising loop).
Tolerance: fp32 throughout, so 1e-5 absolute and relative (1e-4 absolute where a formula divides
by sqrt(abar_999) ~ 0.068, which amplifies float error ~15x).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, TCDScheduler

from flashstep.models.families import family_timesteps
from flashstep.models.families.hypersd import sample_tcd
from flashstep.models.families.instaflow import sample_rf_euler
from flashstep.models.families.lcm import sample_lcm
from flashstep.models.families.swiftbrush import sample_swiftbrush
from flashstep.models.families.teacher import sample_ddim, sample_dpmpp_2m
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.schedule import (
    NoiseSchedule,
    cpu_generators,
    linspace_timesteps,
    randn_per_sample,
    trailing_timesteps,
)
from tests.models.conftest import TinyModel

TOL = dict(rtol=1e-5, atol=1e-5)  # relative too: a random UNet's x0 reaches |x| ~ 50
SEEDS = [11, 12]
# Stable Diffusion 1.5's public scheduler_config.json values (PNDM there; the same betas everywhere).
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False)  # fmt: skip


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(SD15)


def start_noise(seeds=SEEDS) -> torch.Tensor:
    return randn_per_sample(cpu_generators(seeds), (4, 8, 8), torch.device("cpu"), torch.float32)


def test_alphas_cumprod_match_diffusers(schedule):
    reference = DDPMScheduler.from_config(SD15).alphas_cumprod.double()
    torch.testing.assert_close(schedule.alphas_cumprod, reference, rtol=0, atol=1e-7)


def test_ddim_trailing_timesteps_are_hyper_sd_s():
    assert trailing_timesteps(1) == [999]
    assert trailing_timesteps(2) == [999, 499]
    assert trailing_timesteps(4) == [999, 749, 499, 249]
    assert trailing_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]


@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_linspace_timesteps_match_dpm_solver(steps):
    scheduler = DPMSolverMultistepScheduler.from_config(SD15)
    scheduler.set_timesteps(steps)
    assert linspace_timesteps(steps) == scheduler.timesteps.tolist()


def test_family_timestep_rules():
    rule = lambda family, n, **kw: family_timesteps(FlashstepConfig(family=family, **kw), n, 1000)  # noqa: E731
    assert rule("lcm", 4, default_steps=4, allowed_steps=(4,)) == [999, 749, 499, 249]
    assert rule("hypersd", 2, allowed_steps=(1, 2)) == [999, 499]
    assert rule("instaflow", 4, prediction="flow", allowed_steps=(1, 4)) == [1000, 750, 500, 250]
    assert rule("swiftbrush", 1) == [999]
    assert rule("swiftbrush", 1, conditioning_timestep=399) == [399]  # DMD2-SDXL one-step
    assert rule("teacher", 4, allowed_steps=(4,), default_steps=4) == [999, 749, 500, 250]
    listed = {"2": [999, 600]}
    assert rule("hypersd", 2, allowed_steps=(1, 2), timesteps=listed) == [999, 600]


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_dpmpp_2m_matches_diffusers_step_by_step(tiny_unet, schedule, steps):
    scheduler = DPMSolverMultistepScheduler.from_config(SD15)
    scheduler.set_timesteps(steps)
    x = start_noise()
    ours = TinyModel(tiny_unet, batch=2)
    out = sample_dpmpp_2m(ours, x, linspace_timesteps(steps), schedule, cpu_generators(SEEDS))

    reference = TinyModel(tiny_unet, batch=2)
    sample = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        # Same input at every step before the model is called: the trajectories agree step by step.
        torch.testing.assert_close(ours.calls[i][0], sample, **TOL)
        sample = scheduler.step(reference(sample, int(t)), t, sample).prev_sample
    torch.testing.assert_close(out, sample, **TOL)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ddim_trailing_matches_diffusers_step_by_step(tiny_unet, schedule, steps):
    scheduler = DDIMScheduler.from_config({**SD15, "timestep_spacing": "trailing"})
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == trailing_timesteps(steps)
    x = start_noise()
    ours = TinyModel(tiny_unet, batch=2)
    out = sample_ddim(ours, x, trailing_timesteps(steps), schedule, cpu_generators(SEEDS))

    reference = TinyModel(tiny_unet, batch=2)
    sample = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        torch.testing.assert_close(ours.calls[i][0], sample, **TOL)
        sample = scheduler.step(reference(sample, int(t)), t, sample, eta=0.0).prev_sample
    torch.testing.assert_close(out, sample, **TOL)


@pytest.mark.parametrize(("steps", "eta"), [(1, 1.0), (2, 1.0), (4, 0.3), (4, 1.0), (4, 0.0)])
def test_tcd_matches_diffusers_step_by_step(tiny_unet, schedule, steps, eta):
    # One image per run: diffusers draws TCD's noise from one generator for the whole batch.
    scheduler = TCDScheduler.from_config(SD15)
    timesteps = trailing_timesteps(steps)
    scheduler.set_timesteps(timesteps=timesteps)
    x = start_noise([5])
    ours = TinyModel(tiny_unet, batch=1)
    out = sample_tcd(ours, x, timesteps, schedule, cpu_generators([77]), eta=eta)

    reference = TinyModel(tiny_unet, batch=1)
    generator = torch.Generator().manual_seed(77)
    sample = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        torch.testing.assert_close(ours.calls[i][0], sample, **TOL)
        sample = scheduler.step(reference(sample, int(t)), t, sample, eta=eta, generator=generator).prev_sample
    torch.testing.assert_close(out, sample, **TOL)


@pytest.mark.parametrize("t_cond", [999, 399, 800])
def test_swiftbrush_is_one_eps_to_x0_step(tiny_unet, schedule, t_cond):
    z = start_noise()
    model = TinyModel(tiny_unet, batch=2)
    out = sample_swiftbrush(model, z, [t_cond], schedule, cpu_generators(SEEDS))

    abar = DDPMScheduler.from_config(SD15).alphas_cumprod[t_cond]
    eps = TinyModel(tiny_unet, batch=2)(z, t_cond)
    expected = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert len(model.calls) == 1 and model.calls[0][1] == t_cond
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_a_flow_swiftbrush_student_takes_the_flows_one_euler_step_from_pure_noise(tiny_unet, schedule):
    """A student started from an instaflow student's weights keeps its map: x0 = z + v(z, 1000)."""
    z = start_noise()
    model = TinyModel(tiny_unet, batch=2, prediction="flow")
    out = sample_swiftbrush(model, z, [1000], schedule, cpu_generators(SEEDS))

    v = TinyModel(tiny_unet, batch=2)(z, 1000)
    assert len(model.calls) == 1 and model.calls[0][1] == 1000
    torch.testing.assert_close(out, z + v, rtol=0, atol=1e-5)
    # The same UNet read as epsilon at 999 draws something else entirely.
    assert not torch.allclose(out, sample_swiftbrush(TinyModel(tiny_unet, batch=2), z, [999], schedule, []), atol=0.1)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rectified_flow_euler_loop(tiny_unet, schedule, steps):
    z = start_noise()
    timesteps = family_timesteps(FlashstepConfig(family="instaflow", prediction="flow", allowed_steps=(steps,), default_steps=steps), steps, 1000)
    out = sample_rf_euler(TinyModel(tiny_unet, batch=2), z, timesteps, schedule, cpu_generators(SEEDS))

    # InstaFlow's pipeline loop, written out: t = (1 - i/N) * 1000, x += v / N.
    v_model, x = TinyModel(tiny_unet, batch=2), z.clone()
    for i in range(steps):
        x = x + v_model(x, (1.0 - i / steps) * 1000.0) / steps
    torch.testing.assert_close(out, x, **TOL)
    if steps == 1:
        torch.testing.assert_close(out, z + TinyModel(tiny_unet, batch=2)(z, 1000.0), **TOL)


def test_lcm_renoises_x0_to_each_next_timestep(tiny_unet, schedule):
    timesteps = [999, 749, 499, 249]
    z = start_noise()
    model = TinyModel(tiny_unet, batch=2)
    out = sample_lcm(model, z, timesteps, schedule, cpu_generators(SEEDS))

    # DMD2's multi-step loop with diffusers' add_noise, noise drawn per image from its own seed.
    ddpm = DDPMScheduler.from_config(SD15)
    abar = ddpm.alphas_cumprod
    generators = cpu_generators(SEEDS)
    reference, x = TinyModel(tiny_unet, batch=2), z.clone()
    for i, t in enumerate(timesteps):
        eps = reference(x, t)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        if i + 1 < len(timesteps):
            noise = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators])
            x = ddpm.add_noise(x0, noise, torch.tensor([timesteps[i + 1]] * 2))
    assert [t for _, t in model.calls] == timesteps
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
