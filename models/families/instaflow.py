"""instaflow: rectified-flow students whose UNet predicts a velocity from noise towards the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.schedule import NoiseSchedule


@torch.no_grad()
def sample_rf_euler(
    model: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[float],
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Euler on the rectified-flow ODE dx = v dt (Liu et al. 2023, InstaFlow; Liu et al. 2022, Alg. 1).

    Timesteps run from noise (T = num_train_timesteps, usually 1000) towards 0, e.g.
    [1000, 500] for two steps; each step moves x by v * (t_i - t_{i+1}) / T, which is v / N on
    InstaFlow's uniform grid, and the last step goes to 0. One step is x0 = z + v(z, 1000).
    """
    total = float(schedule.num_train_timesteps)
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0.0
        v = model(x, t)  # (B, C, h, w)
        x = x + v * ((float(t) - float(t_next)) / total)
    return x
