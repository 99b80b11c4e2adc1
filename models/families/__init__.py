"""Generator families: which sampler runs a checkpoint, on which timesteps, with which options.

Every sampler is a flat function with one signature (k-diffusion style):

    sampler(model, x, timesteps, schedule, generators, **extras) -> x0 latents (B, C, h, w)

`model` is a `models.denoiser.Denoiser` (x_t, t -> epsilon or velocity, CFG and NASA inside);
`x` the starting latents (pure noise, or the hybrid's re-noised latents); `generators` one per
image for any fresh noise. `FAMILY_SPECS` says, per family, which samplers it accepts (the first
is the default), whether it takes classifier-free guidance, and its timestep rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flashstep.models.denoiser import Denoiser
from flashstep.models.errors import CheckpointError, UnknownFamilyError
from flashstep.models.families.hypersd import sample_tcd
from flashstep.models.families.instaflow import sample_rf_euler
from flashstep.models.families.lcm import sample_lcm
from flashstep.models.families.swiftbrush import sample_swiftbrush
from flashstep.models.families.teacher import sample_ddim, sample_dpmpp_2m
from flashstep.models.flashstep_config import FAMILIES, FlashstepConfig
from flashstep.models.schedule import (
    NoiseSchedule,
    linspace_timesteps,
    rectified_flow_timesteps,
    trailing_timesteps,
)

Sampler = Callable[[Denoiser, torch.Tensor, Sequence[float], NoiseSchedule, Sequence[torch.Generator]], torch.Tensor]

SAMPLERS: dict[str, Sampler] = {
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "swiftbrush": sample_swiftbrush,
    "rf_euler": sample_rf_euler,
    "tcd": sample_tcd,
    "lcm": sample_lcm,
}


@dataclass(frozen=True)
class FamilySpec:
    """What a family needs from the engine.

    samplers: names in SAMPLERS it may run, the default first.
    guided: accepts a classifier-free guidance scale (> 1 turns CFG on).
    timestep_rule: step count -> timesteps, used when flashstep.json lists none for that count.
    defaults: flashstep.json values for a public checkpoint that carries no flashstep.json.
    """

    samplers: tuple[str, ...]
    guided: bool
    timestep_rule: Callable[[int, int], list[float]]
    defaults: dict


FAMILY_SPECS: dict[str, FamilySpec] = {
    "teacher": FamilySpec(
        ("dpmpp_2m", "ddim"),
        guided=True,
        timestep_rule=linspace_timesteps,
        defaults=dict(default_steps=25, allowed_steps=tuple(range(1, 51)), default_guidance_scale=7.5),
    ),
    "swiftbrush": FamilySpec(
        ("swiftbrush",),
        guided=False,
        timestep_rule=lambda n, total: [total - 1] * n,  # replaced by conditioning_timestep
        defaults=dict(default_steps=1, allowed_steps=(1,)),
    ),
    "instaflow": FamilySpec(
        ("rf_euler",),
        guided=True,  # 2-rectified-flow checkpoints sample with CFG (InstaFlow uses 1.5)
        timestep_rule=rectified_flow_timesteps,
        defaults=dict(default_steps=1, allowed_steps=(1, 2, 4, 8, 16, 25), prediction="flow"),
    ),
    "hypersd": FamilySpec(
        ("tcd", "ddim"),
        guided=True,  # Hyper-SD's CFG-preserving LoRAs take a scale; the default is 0
        timestep_rule=trailing_timesteps,
        defaults=dict(default_steps=1, allowed_steps=(1, 2, 4, 8), eta=1.0),
    ),
    "lcm": FamilySpec(
        ("lcm",),
        guided=False,
        timestep_rule=trailing_timesteps,  # [999, 749, 499, 249] for 4 steps
        defaults=dict(default_steps=4, allowed_steps=(1, 2, 4)),
    ),
}
assert set(FAMILY_SPECS) == set(FAMILIES)

# Families whose UNet may predict a rectified-flow velocity: instaflow always, swiftbrush when its
# student started from an instaflow student's weights (SwiftBrush v2 starts from a one-step model).
FLOW_FAMILIES = ("instaflow", "swiftbrush")


def family_spec(family: str) -> FamilySpec:
    """The spec of `family`, or UnknownFamilyError listing the known families."""
    if family not in FAMILY_SPECS:
        raise UnknownFamilyError(f"`family` must be one of {sorted(FAMILY_SPECS)} but is {family!r}")
    return FAMILY_SPECS[family]


def family_timesteps(config: FlashstepConfig, num_steps: int, num_train_timesteps: int) -> list[float]:
    """The timesteps of an N-step run: flashstep.json's list for N, else the family's rule.

    swiftbrush always uses `conditioning_timestep` (the setting the one-step UNet was trained with).
    """
    if config.family == "swiftbrush":
        return [float(config.conditioning_timestep)]
    listed = config.timesteps.get(str(num_steps))
    if listed:
        return [float(t) for t in listed]
    return [float(t) for t in FAMILY_SPECS[config.family].timestep_rule(num_steps, num_train_timesteps)]


def bind_sampler(config: FlashstepConfig, name: str | None = None) -> tuple[str, Sampler]:
    """The family's sampler `name` (default: its first) with checkpoint options bound (TCD's eta)."""
    spec = family_spec(config.family)
    name = name or spec.samplers[0]
    if name not in spec.samplers:
        raise CheckpointError(f"`sampler` must be one of {list(spec.samplers)} for family {config.family!r} but is {name!r}")
    sampler = SAMPLERS[name]
    if name == "tcd":
        sampler = functools.partial(sampler, eta=config.eta)
    return name, sampler
