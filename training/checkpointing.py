"""Resumable training checkpoints, kept apart from the slim servable export.

A training checkpoint holds what `train.py` needs to continue (modules, EMA, optimizer state,
step, config); the export holds only inference weights. Both are safetensors: the optimizer's
nested state dict is flattened to named tensors and its scalars go into the JSON metadata, so
no pickle is ever written or read.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TRAIN_STATE = "train_state.safetensors"


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.state.{idx}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + ".state."):
            idx, key = name[len(prefix) + 7 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def config_dict(cfg) -> dict:
    """A frozen config dataclass as plain JSON types (tuples as lists): the `config` saved with train state."""
    return json.loads(json.dumps(asdict(cfg), default=list))


def save_train_state(
    folder: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    config: dict,
) -> Path:
    """Write modules (e.g. {"unet": ..., "ema": ...}), optimizers and step atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update({f"module.{name}.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()})
    opt_meta = {}
    for name, opt in optimizers.items():
        t, m = _flatten_optimizer(opt, f"optim.{name}")
        tensors.update(t)
        opt_meta[name] = m
    metadata = {"step": str(step), "config": json.dumps(config), "optimizers": json.dumps(opt_meta)}
    tmp = folder / (TRAIN_STATE + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, folder / TRAIN_STATE)
    return folder / TRAIN_STATE


def load_train_state(
    folder: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]
) -> int | None:
    """Restore in place and return the step, or None when the folder holds no state yet."""
    path = Path(folder) / TRAIN_STATE
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    opt_meta = json.loads(metadata["optimizers"])
    for name, opt in optimizers.items():
        _unflatten_optimizer(opt, f"optim.{name}", tensors, opt_meta[name])
    return int(metadata["step"])


class EMA:
    """Exponential moving average of a module's parameters (kept as a module, saved alongside).

    `warmup` (as in many diffusion codebases) caps the decay at (1 + step) / (10 + step), so early averages
    follow the weights away from their random init; the cap stays below 0.995 until step 1,790 and below
    0.999 until step 8,990, so a short run averages over ~step / 9 steps whatever its decay. A run that
    starts from trained weights (a refinement leg) has no init to forget and turns it off.
    """

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True):
        import copy

        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for e, p in zip(self.module.parameters(), module.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.module.buffers(), module.buffers(), strict=True):
            e.copy_(b)
