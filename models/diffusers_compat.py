"""What a servable folder needs so that vanilla diffusers samples it correctly.

`StableDiffusionPipeline.from_pretrained(folder)` builds the scheduler named in `model_index.json`
from `scheduler/scheduler_config.json` and runs `latents * init_noise_sigma`, `scale_model_input`,
`set_timesteps(n, device=...)` and `step(...)`. For an epsilon UNet (teacher, Hyper-SD base) the SD
scheduler config the exporter writes is right. A rectified-flow UNet (flashstep.json `prediction`
"flow": v from noise towards the image, one step x0 = z + v(z, 1000)) has no such config, measured
on diffusers 0.42:

- `FlowMatchEulerDiscreteScheduler` does not run in `StableDiffusionPipeline` (it has no
  `init_noise_sigma` and no `scale_model_input`).
- Every scheduler that does run there and knows flows (`UniPCMultistepScheduler`,
  `DPMSolverMultistepScheduler`, DEIS, SA-Solver with `use_flow_sigmas` and `prediction_type`
  "flow_prediction") forms x0 = x_t - sigma * u: it expects u = noise - x0 = -v, and feeds the UNet
  t = sigma * 1000, so no config flips the sign without also flipping the timestep. The diffusion
  schedulers (DDIM, Euler, LCM, TCD, EDM) put a coefficient below 1 on x_t or feed other timesteps.

So the sign is folded into the weights: the UNet's last layer `conv_out` (weight and bias) is
negated, which negates the UNet's output exactly (fp16 negation is exact and a convolution is odd
in its weights), the folder's flashstep.json `prediction` becomes "flow_match" (diffusers' sign)
so flashstep negates it back, and the scheduler becomes UniPC on flow sigmas, first order (an Euler
step on the flow). UniPC feeds t = 999 (int) where flashstep feeds 1000 and steps from sigma
1 - 1e-6: images differ from flashstep's by at most ~0.09 on a [-1, 1] pixel scale and the judge reads
the same attributes. Pass `sigmas=vanilla_sigmas(n)` to the pipeline for flashstep's multi-step
grid (diffusers' default for n steps is linspace(1, 1/1000, n + 1)[:-1]).

The exporter calls `make_diffusers_compatible(folder)` once the folder is written; flashstep code
that loads a "flow_match" UNet for anything other than the samplers (a training warm start) calls
`to_flashstep_convention(unet, config)` to get flashstep's sign back in memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flashstep.models.flashstep_config import CONFIG_NAME, FlashstepConfig

SIGN_LAYER = ("conv_out.weight", "conv_out.bias")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CLASS = "UniPCMultistepScheduler"

# Stable Diffusion's betas stay in the config: diffusers ignores them on flow sigmas, flashstep's
# NoiseSchedule reads them (the hybrid's base step and x0 conversions use the same schedule as before).
VANILLA_FLOW_SCHEDULER = {
    "_class_name": SCHEDULER_CLASS,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "flow_shift": 1.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "solver_order": 1,
    "solver_type": "bh2",
    "steps_offset": 1,
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
}


def vanilla_flow_scheduler_config(schedule: dict | None = None) -> dict:
    """The scheduler_config.json of a flow folder: UniPC on flow sigmas, keeping `schedule`'s betas."""
    config = dict(VANILLA_FLOW_SCHEDULER)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas"):
        if schedule and schedule.get(key) is not None:
            config[key] = schedule[key]
    return config


def vanilla_sigmas(num_steps: int) -> np.ndarray:
    """`sigmas=` for `StableDiffusionPipeline.__call__` that gives flashstep's grid 1 - i/N (t = 1000 (1 - i/N))."""
    return np.array([1.0 - i / num_steps for i in range(num_steps)], dtype=np.float64)


def fold_flow_sign(weights: str | Path) -> None:
    """Negate `conv_out` (weight and bias) in a UNet safetensors file, in place, dtypes and metadata kept.

    A symlinked file (weights shared with another folder) is replaced by a real file so the other
    folder is untouched.
    """
    weights = Path(weights)
    with safe_open(weights, "pt") as fh:
        metadata = fh.metadata()
    state = load_file(weights)
    missing = [k for k in SIGN_LAYER if k not in state]
    if missing:
        raise ValueError(f"{weights} has no {missing}: not a diffusers UNet2DConditionModel")
    for key in SIGN_LAYER:
        state[key] = -state[key]
    if weights.is_symlink():
        weights.unlink()
    save_file(state, weights, metadata=metadata)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_flow_scheduler(folder: Path) -> None:
    """scheduler/scheduler_config.json and model_index.json's scheduler entry for a flow folder."""
    sched_path = folder / "scheduler" / "scheduler_config.json"
    old = json.loads(sched_path.read_text()) if sched_path.is_file() else {}
    config = vanilla_flow_scheduler_config(old)
    config["_diffusers_version"] = old.get("_diffusers_version", _diffusers_version())
    if sched_path.is_symlink():
        sched_path.unlink()
    sched_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(sched_path, config)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", SCHEDULER_CLASS]
    _write_json(index_path, index)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def make_diffusers_compatible(folder: str | Path) -> list[str]:
    """Make `folder` sample correctly in vanilla `StableDiffusionPipeline`; returns what it changed.

    A "flow" folder gets its UNet's sign folded (`fold_flow_sign`), flashstep.json `prediction`
    "flow_match" and the UniPC flow scheduler. A "flow_match" folder only gets its scheduler files
    (re)written, so a second call changes no weights. Epsilon and v-prediction folders, and LoRA
    folders without a UNet, are left as they are. flashstep samples the folder to the same images
    before and after (the samplers negate a "flow_match" output back, exactly).
    """
    folder = Path(folder)
    config = FlashstepConfig.load(folder)
    changed: list[str] = []
    if config.prediction not in ("flow", "flow_match") or not (folder / "unet").is_dir():
        return changed
    if config.prediction == "flow":
        weights = folder / "unet" / UNET_WEIGHTS
        fold_flow_sign(weights)
        changed.append(str(weights))
        dataclasses.replace(config, prediction="flow_match").save(folder)
        changed.append(str(folder / CONFIG_NAME))
    write_flow_scheduler(folder)
    changed += [str(folder / "scheduler" / "scheduler_config.json"), str(folder / "model_index.json")]
    return changed


@torch.no_grad()
def to_flashstep_convention(unet: torch.nn.Module, config: FlashstepConfig) -> FlashstepConfig:
    """In memory: give a "flow_match" UNet flashstep's sign back (negate `conv_out`) and say "flow".

    For code that uses the UNet's output directly (training warm starts, probes); the samplers
    handle "flow_match" themselves. Other predictions are returned unchanged.
    """
    if config.prediction != "flow_match":
        return config
    unet.conv_out.weight.neg_()
    unet.conv_out.bias.neg_()
    return dataclasses.replace(config, prediction="flow")
