"""A one-step sample touched up by the teacher: re-noised with its own noise, then a few guided DDIM steps.

The one-step LoRA learns by regression onto a one-step source's map (`SourceRegressionConfig`), and
it lands below its source: the target's own errors (neighbouring hues,
circles drawn as squares) become the LoRA's. SDEdit (Meng et al. 2022, arXiv:2108.01073) shows a
sample noised part-way and denoised again keeps its layout and takes the denoiser's detail; here the
denoiser is the guided teacher at the scale it names colours best. The re-noising reuses the very
noise z the source started from, so the refined target stays a deterministic function of z, as the
regression needs: one z, one target, the same map a LoRA can fit, only with the teacher's colours.

The defaults (t = 300, 2 steps, CFG 2) cost 4 extra teacher evaluations per target; from much
higher up, one or two steps cannot remove the noise again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashstep.training.distill import Teacher, autocast, cfg_eps, ddim_jump


@dataclass(frozen=True)
class TeacherRefinement:
    """Where the source's sample is re-noised to, how many teacher DDIM steps take it back, at what CFG."""

    timestep: int = 300
    steps: int = 2
    guidance: float = 2.0
    # The teacher's steps under bfloat16 autocast: faster on CPUs with bfloat16 support, and the target
    # moves far less than what the regression leaves.
    bf16: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.timestep <= 999:
            raise ValueError(f"`timestep` must be in [1, 999] but is {self.timestep}")
        if not 1 <= self.steps <= self.timestep:
            raise ValueError(f"`steps` must be in [1, timestep={self.timestep}] but is {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"`guidance` must be >= 0 but is {self.guidance}")

    @property
    def recipe(self) -> str:
        return f"refined by the teacher (t={self.timestep}, {self.steps} DDIM steps, CFG {self.guidance:g})"

    def timesteps(self) -> list[int]:
        """The DDIM grid from `timestep` down to 0, evenly spaced: e.g. [300, 150, 0]."""
        return [int(t) for t in np.linspace(self.timestep, 0, self.steps + 1).round()]


@torch.no_grad()
def refine_with_teacher(
    teacher: Teacher, x0: torch.Tensor, z: torch.Tensor, cond: torch.Tensor, cfg: TeacherRefinement
) -> torch.Tensor:
    """x0 re-noised to `cfg.timestep` with z, then the guided teacher's deterministic DDIM to its x0 prediction.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) z; each step predicts x0 from eps and jumps to the next grid
    point (DDIM, Song et al. 2021, eq. 12, sigma = 0); the last returns the x0 prediction itself.
    """
    n = len(z)
    abar = teacher.alphas_cumprod
    uncond = teacher.empty_prompt_embeds.expand(n, -1, -1)
    grid = cfg.timesteps()
    x = abar[grid[0]].sqrt() * x0 + (1 - abar[grid[0]]).sqrt() * z
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        with autocast(teacher.unet, cfg.bf16):
            eps = cfg_eps(teacher.unet, x, torch.full((n,), t), cond, uncond, cfg.guidance)
        landing = abar[s] if s > 0 else torch.ones(())  # abar = 1: the last jump lands on the x0 prediction
        x = ddim_jump(x, eps.float(), abar[t].expand(n), landing.expand(n))
    return x
