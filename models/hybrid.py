"""The diversity hybrid (Gandikota & Bau 2025, "Distilling Diversity and Control in Diffusion Models").

Distilled models lose sample diversity mostly in their first step. The hybrid lets the base
model take that step (t = the distilled schedule's first timestep, 999, with the base's CFG),
predicts x0, re-noises it with fresh per-sample noise to the distilled model's second timestep,
and lets the distilled model finish with guidance 0 (models/engine.py runs the rest).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.schedule import NoiseSchedule, noise_like, x0_from_eps


@torch.no_grad()
def base_first_step(
    base: Denoiser,
    x: torch.Tensor,
    t_first: float,
    t_next: float,
    *,
    prediction: str,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """x_T (B, C, h, w) -> latents at the distilled model's `t_next`, via the base model's x0 at `t_first`.

    `base` predicts epsilon (the base is an SD-style diffusion model). `prediction` and `schedule`
    are the distilled model's: "flow" re-noises on the rectified-flow path
    x_t = (1 - t/T) x0 + (t/T) n (noise at t = T); the others on the diffusion path
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n.
    """
    t_base = min(int(t_first), base.schedule.num_train_timesteps - 1)  # InstaFlow's 1000 -> 999
    alpha, sigma = base.schedule.alpha_sigma(t_base)
    x0 = x0_from_eps(x, base(x, t_base), alpha, sigma)
    noise = noise_like(x0, generators)
    if prediction == "flow":
        frac = float(t_next) / schedule.num_train_timesteps
        return (1.0 - frac) * x0 + frac * noise
    alpha_next, sigma_next = schedule.alpha_sigma(t_next)
    return alpha_next * x0 + sigma_next * noise
