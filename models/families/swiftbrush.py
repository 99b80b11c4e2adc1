"""swiftbrush: one-step students fed pure noise (SwiftBrush v1/v2, DMD2 one-step, Hyper-SDXL 1-step UNet)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.schedule import NoiseSchedule, x0_from_eps


@torch.no_grad()
def sample_swiftbrush(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[float],
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """SwiftBrush (Nguyen & Tran 2024, Sec. 3.2): x0 = (z - sqrt(1 - abar_t) eps(z, t)) / sqrt(abar_t).

    `timesteps` is the one conditioning timestep: 999 for SwiftBrush and DMD2-SD1.5, 399 for
    DMD2-SDXL one-step, 800 for the Hyper-SDXL one-step UNet (flashstep.json
    `conditioning_timestep`). z is pure noise whatever t is, as those models were trained.

    A student whose UNet predicts a rectified-flow velocity (one started from an instaflow
    student's weights, as SwiftBrush v2 starts from SD-Turbo's) takes the flow's one Euler step
    instead, x0 = z + v(z, t) at t = 1000, the pure-noise end of that path.
    """
    if len(timesteps) != 1:
        raise ValueError(f"swiftbrush samples in one step but was given timesteps {list(timesteps)}")
    t = timesteps[0]
    if model.prediction == "flow":
        return x + model(x, t)  # (B, C, h, w)
    alpha, sigma = schedule.alpha_sigma(t)
    return x0_from_eps(x, model(x, t), alpha, sigma)  # (B, C, h, w)
