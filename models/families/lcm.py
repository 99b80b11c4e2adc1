"""lcm: few-step students sampled by predicting x0 and re-noising (LCM multistep, DMD2 multi-step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.schedule import NoiseSchedule, noise_like, x0_from_eps


@torch.no_grad()
def sample_lcm(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[float],
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Multistep consistency sampling (Luo et al. 2023, LCM Alg. 3; DMD2, Yin et al. 2024, Sec. 4.5).

    At each timestep (e.g. [999, 749, 499, 249]) predict x0 from epsilon; between steps re-noise
    x0 to the next timestep with fresh per-sample noise, x = sqrt(abar) x0 + sqrt(1 - abar) n.
    Returns the last x0.
    """
    for i, t in enumerate(timesteps):
        alpha, sigma = schedule.alpha_sigma(t)
        x0 = x0_from_eps(x, model(x, t), alpha, sigma)  # (B, C, h, w)
        if i == len(timesteps) - 1:
            return x0
        alpha_next, sigma_next = schedule.alpha_sigma(timesteps[i + 1])
        x = alpha_next * x0 + sigma_next * noise_like(x0, generators)
    return x
