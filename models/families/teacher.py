"""teacher: multistep samplers for an epsilon-prediction SD model with classifier-free guidance.

DPM-Solver++(2M) is the default (it matches diffusers' `DPMSolverMultistepScheduler` with
`algorithm_type="dpmsolver++"`, `solver_order=2`, `final_sigmas_type="zero"`); DDIM is the
simple deterministic alternative, also used by Hyper-SD with trailing timesteps. Both take the
shared sampler signature `(model, x, timesteps, schedule, generators) -> x0 latents`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.schedule import NoiseSchedule, x0_from_eps


def _lambda(schedule: NoiseSchedule, t: float) -> float:
    """Half log-SNR, lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, Sec. 2)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return math.log(alpha) - math.log(sigma)


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[float],
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2): data-prediction multistep, order 2.

    The first step is first order (no history yet); the last goes to sigma = 0, where the
    first-order update is exactly x0, as diffusers does with `final_sigmas_type="zero"`.
    """
    x0_prev, t_prev = None, None
    for i, t in enumerate(timesteps):
        alpha, sigma = schedule.alpha_sigma(t)
        x0 = x0_from_eps(x, model(x, t), alpha, sigma)  # (B, C, h, w)
        if i == len(timesteps) - 1:
            return x0
        t_next = timesteps[i + 1]
        alpha_next, sigma_next = schedule.alpha_sigma(t_next)
        h = _lambda(schedule, t_next) - _lambda(schedule, t)
        phi = math.expm1(-h)  # exp(-h) - 1
        if x0_prev is None:
            # DPM-Solver++(1), eq. (5): the DDIM step written in lambda.
            x = (sigma_next / sigma) * x - alpha_next * phi * x0
        else:
            # Multistep second order: D1 is the backward difference of x0 over lambda.
            r = (_lambda(schedule, t) - _lambda(schedule, t_prev)) / h
            d1 = (x0 - x0_prev) / r
            x = (sigma_next / sigma) * x - alpha_next * phi * x0 - 0.5 * alpha_next * phi * d1
        x0_prev, t_prev = x0, t
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[float],
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0) from t_i to t_{i+1}.

    After the last timestep it steps to `schedule.final_alpha_cumprod` (1.0 = exactly x0), as
    diffusers' `DDIMScheduler` does with the same `set_alpha_to_one`.
    """
    for i, t in enumerate(timesteps):
        alpha, sigma = schedule.alpha_sigma(t)
        eps = model(x, t)  # (B, C, h, w)
        x0 = x0_from_eps(x, eps, alpha, sigma)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        alpha_next, sigma_next = schedule.alpha_sigma(t_next)
        x = alpha_next * x0 + sigma_next * eps
    return x
