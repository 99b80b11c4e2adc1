"""The noise schedule and timestep rules every sampler shares: all schedule math lives here.

`NoiseSchedule` turns a folder's `scheduler/scheduler_config.json` (num_train_timesteps,
beta_start, beta_end, beta_schedule) into the cumulative products abar_t of Ho et al. 2020
(DDPM, eq. 4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. It holds no per-request state, so
one instance is shared by every concurrent batch.

Per-sample noise also lives here: each image draws from its own `torch.Generator` (on the CPU,
so a seed gives the same noise on any device), which is what makes a request's image independent
of the batch it is served in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashstep.models.errors import CheckpointError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_for_cosine(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17: betas from the squared-cosine abar(t)."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete-time variance-preserving schedule: abar_t for t = 0 .. T-1 (float64, CPU).

    final_alpha_cumprod: abar used after the last step by DDIM-style updates (1.0 when the
    config says `set_alpha_to_one`, the diffusers default; abar_0 for SD1.x's own config).
    """

    alphas_cumprod: torch.Tensor  # (T,) float64
    final_alpha_cumprod: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict (unknown keys are ignored)."""
        num = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        # Betas in float32, as diffusers builds them, so samplers match its schedulers closely.
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(start, end, num, dtype=torch.float32)
        elif kind == "scaled_linear":
            # Stable Diffusion's schedule: linear in sqrt(beta).
            betas = torch.linspace(start**0.5, end**0.5, num, dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = torch.tensor(_betas_for_cosine(num), dtype=torch.float32)
        else:
            raise CheckpointError(f"`beta_schedule` must be one of {list(BETA_SCHEDULES)} but is {kind!r}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).double()
        final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
        return cls(alphas_cumprod=alphas_cumprod, final_alpha_cumprod=final)

    @classmethod
    def from_folder(cls, folder: str | Path) -> NoiseSchedule:
        """Read `scheduler/scheduler_config.json` of a diffusers folder."""
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        try:
            return cls.from_config(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint is missing the noise schedule: {path} not found") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc

    def abar(self, t: float) -> float:
        """abar_t for an integer timestep t in [0, T-1]; t < 0 means "after the last step"."""
        t = int(t)
        return self.final_alpha_cumprod if t < 0 else float(self.alphas_cumprod[t])

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(sqrt(abar_t), sqrt(1 - abar_t)): the signal and noise scales of x_t."""
        a = self.abar(t)
        return math.sqrt(a), math.sqrt(1.0 - a)


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Invert x_t = alpha x0 + sigma eps for x0 (DDPM eq. 15)."""
    return (x - sigma * eps) / alpha


# ----- timestep rules: step count -> descending timesteps (`leading` is not used by any family) -----


def linspace_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' `linspace` spacing (DPMSolverMultistep default): [999, 749, 500, 250] for 4 of 1000."""
    ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    return [int(t) for t in ts]


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """`trailing` spacing (Lin et al. 2023, Table 2): [999], [999, 499], [999, 749, 499, 249]."""
    ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    return [int(t) for t in ts]


# Where a rectified-flow UNet sees pure noise: its timestep is (1 - t) * 1000 on x_t = t x + (1 - t) z.
FLOW_NOISE_TIMESTEP = 1000


def rectified_flow_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """InstaFlow's Euler grid: [(1 - i/N) * 1000 for i in range(N)], noise at 1000."""
    return [(1.0 - i / num_steps) * num_train_timesteps for i in range(num_steps)]


# ----- per-sample noise -----


def cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded by its request: noise independent of batch and device."""
    return [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]


def randn_per_sample(
    generators: Sequence[torch.Generator],
    shape: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of shape (len(generators), *shape), row i drawn from generators[i]."""
    rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


def noise_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Fresh per-sample noise with x's shape (B, C, h, w), dtype and device."""
    if len(generators) != x.shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} generators for batch {x.shape[0]}")
    return randn_per_sample(generators, x.shape[1:], x.device, x.dtype)
