"""`flashstep.json`: the few facts a diffusers folder does not carry about how to sample it.

A servable checkpoint is a diffusers-format folder plus this file (shared/DESIGN.md). The
config is frozen, saved beside the weights, and validated on load so a bad value fails with
the key named rather than deep inside a sampler.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from flashstep.models.errors import CheckpointError

CONFIG_NAME = "flashstep.json"
FAMILIES = ("teacher", "swiftbrush", "instaflow", "hypersd", "lcm")
PREDICTIONS = ("epsilon", "v_prediction", "flow", "flow_match")
# Rectified-flow velocities, by the sign the stored UNet outputs: "flow" is flashstep's v (from noise
# towards the image, x0 = z + v(z, 1000)); "flow_match" is diffusers' flow-matching sign, -v = noise - x0
# (x0 = z - u(z, 1000)), the sign vanilla diffusers' flow schedulers expect (models/diffusers_compat.py).
FLOW_PREDICTIONS = ("flow", "flow_match")


@dataclass(frozen=True)
class FlashstepConfig:
    """How to sample one checkpoint.

    family: which sampler family runs it (FAMILIES).
    default_steps / allowed_steps: UNet evaluations a request may ask for.
    prediction: what the UNet outputs (epsilon for SD-style, flow for rectified-flow velocity v,
        flow_match for the same velocity stored with diffusers' sign, -v; FLOW_PREDICTIONS).
    timesteps: explicit per-step-count timesteps, keys are step counts as strings
        (DDIM-trailing for Hyper-SD, [999] for one-step students); empty means the family's rule.
    default_guidance_scale: CFG scale when the request gives none (0 or 1 disables CFG).
    conditioning_timestep: the timestep fed to a one-step UNet (999 for SwiftBrush v1/v2 and
        DMD2-SD1.5; 399 for DMD2-SDXL one-step; 800 for Hyper-SDXL one-step UNet).
    eta: TCD stochasticity (Hyper-SD: 1.0 for one step, lower for more steps).
    base: name or path of the base model (Hyper-SD LoRA base; the diversity hybrid's first step).
    hybrid_guidance_scale: CFG scale of the base model's step in a diversity hybrid when the request
        gives none; None means the base's own default. A separate knob because that step predicts
        x0 from pure noise, where CFG's push is multiplied by sigma/alpha (~15 at t = 999): a scale
        that suits the base's full sampler can overshoot there (measured on shapes: CFG 4 doubled
        the hybrid's FD against CFG 1).
    lora: file name of a LoRA in diffusers/PEFT format inside the folder, fused at load.
    lora_scale: scale of that LoRA when fused.
    nasa_alpha: default NASA negative-attention strength for this model.
    resolution: native image side in pixels; requests may ask for other multiples of 8 only
        if `allowed_resolutions` lists them.
    provenance: how the weights were made (recipe, teacher, steps, commit, hardware).
    """

    family: str
    default_steps: int = 1
    allowed_steps: tuple[int, ...] = (1,)
    prediction: str = "epsilon"
    timesteps: dict[str, list[int]] = field(default_factory=dict)
    default_guidance_scale: float = 0.0
    conditioning_timestep: int = 999
    eta: float = 1.0
    base: str | None = None
    hybrid_guidance_scale: float | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    nasa_alpha: float = 0.1
    resolution: int = 512
    allowed_resolutions: tuple[int, ...] = ()
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise CheckpointError(f"`family` must be one of {list(FAMILIES)} but is {self.family!r}")
        if self.prediction not in PREDICTIONS:
            raise CheckpointError(f"`prediction` must be one of {list(PREDICTIONS)} but is {self.prediction!r}")
        object.__setattr__(self, "allowed_steps", tuple(int(s) for s in self.allowed_steps))
        object.__setattr__(self, "allowed_resolutions", tuple(int(s) for s in self.allowed_resolutions))
        if not self.allowed_steps or any(s < 1 for s in self.allowed_steps):
            raise CheckpointError(f"`allowed_steps` must be positive integers but is {list(self.allowed_steps)}")
        if self.default_steps not in self.allowed_steps:
            raise CheckpointError(
                f"`default_steps` must be one of `allowed_steps` {list(self.allowed_steps)} but is {self.default_steps}"
            )
        if self.hybrid_guidance_scale is not None and self.hybrid_guidance_scale < 0:
            raise CheckpointError(f"`hybrid_guidance_scale` must be >= 0 but is {self.hybrid_guidance_scale}")
        for key, ts in self.timesteps.items():
            if not key.isdigit() or len(ts) != int(key):
                raise CheckpointError(f"`timesteps[{key!r}]` must list {key} timesteps but lists {ts}")

    @property
    def velocity_sign(self) -> float:
        """What the stored UNet's output is multiplied by to give flashstep's velocity v (flow families)."""
        return -1.0 if self.prediction == "flow_match" else 1.0

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Every image side a request may ask for: the native one first."""
        return (self.resolution, *(r for r in self.allowed_resolutions if r != self.resolution))

    def to_json(self) -> str:
        data = asdict(self)
        data["allowed_steps"] = list(self.allowed_steps)
        data["allowed_resolutions"] = list(self.allowed_resolutions)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> FlashstepConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{CONFIG_NAME} has unknown keys {unknown}; known keys are {sorted(known)}")
        if "family" not in data:
            raise CheckpointError(f"{CONFIG_NAME} must name a `family` (one of {list(FAMILIES)})")
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> FlashstepConfig:
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} is missing: pass `family` explicitly for a folder without it") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
