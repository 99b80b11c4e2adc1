"""hypersd: Hyper-SD LoRA models (TSCD), sampled with TCD; DDIM-trailing is `teacher.sample_ddim`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.schedule import NoiseSchedule, noise_like, x0_from_eps


@torch.no_grad()
def sample_tcd(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[float],
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    *,
    eta: float = 1.0,
) -> torch.Tensor:
    """Strategic stochastic sampling of TCD (Zheng et al. 2024, arXiv:2402.19159, Alg. 4), gamma = eta.

    Step t -> t': predict x0, go deterministically to s = floor((1 - eta) t'), then re-noise from
    s up to t' with fresh per-sample noise (skipped after the last step). eta = 0 is DDIM; the last
    step ends at t' = 0 (abar_0), exactly as diffusers' `TCDScheduler.step`.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"`eta` must be in [0, 1] but is {eta}")
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        t_prev = int(timesteps[i + 1]) if i < last else 0
        t_s = math.floor((1.0 - eta) * t_prev)
        alpha, sigma = schedule.alpha_sigma(t)
        eps = model(x, t)  # (B, C, h, w)
        x0 = x0_from_eps(x, eps, alpha, sigma)
        alpha_s, sigma_s = schedule.alpha_sigma(t_s)
        x = alpha_s * x0 + sigma_s * eps  # x_s
        if eta > 0 and i < last:
            ratio = schedule.abar(t_prev) / schedule.abar(t_s)  # abar_t' / abar_s
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise_like(x, generators)
    return x
