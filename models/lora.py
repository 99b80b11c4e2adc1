"""Fusing a LoRA file into a UNet (and text encoders) at load: W <- W + scale * (alpha / r) * B @ A.

Reads the key formats public LoRA files use (Hyper-SD, LCM-LoRA and kohya-trained files):
- diffusers / PEFT: `unet.<module>.lora_A.weight` (A, r x in) and `.lora_B.weight` (B, out x r),
  optional `unet.<module>.alpha`; also `text_encoder.` / `text_encoder_2.` prefixes;
- diffusers' older attention-processor form: `unet.<...>.processor.to_q_lora.down.weight` / `.up.weight`;
- kohya: `lora_unet_<module with dots as underscores>.lora_down.weight` / `.lora_up.weight` and
  `.alpha`; `lora_te_`, `lora_te1_`, `lora_te2_` for the text encoders.
Kohya names are matched against the module's own names with dots replaced by underscores, so
no name table is needed for diffusers-layout UNets. Conv layers get (out, r, 1, 1) @ (r, in, k, k).
Without `alpha` the factor alpha / r is 1 (PEFT's default when alpha equals the rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashstep.models.errors import CheckpointError

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}  # fmt: skip
_DOT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                 "base_model.model.": "unet"}  # fmt: skip


@dataclass
class LoraLayer:
    """One low-rank update: delta W = (alpha / rank) * up @ down."""

    target: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # module name inside the target (dotted) or kohya's underscored name
    down: torch.Tensor | None = None  # A: (r, in) or (r, in, k, k)
    up: torch.Tensor | None = None  # B: (out, r) or (out, r, 1, 1)
    alpha: float | None = None

    def delta(self) -> torch.Tensor:
        """The weight update in float32, shaped like the layer's weight."""
        down, up = self.down.float(), self.up.float()
        rank = down.shape[0]
        scale = 1.0 if self.alpha is None else self.alpha / rank
        if down.ndim == 4:  # conv: (out, r, 1, 1) @ (r, in, k, k)
            return scale * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
        return scale * (up @ down)


def _split(key: str) -> tuple[str, str, str] | None:
    """key -> (target, module, part) with part in {down, up, alpha}; None for keys that are not LoRA."""
    for prefix, target in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
                if name.endswith(suffix):
                    return target, name[: -len(suffix)], part
            return None
    target, name = "unet", key
    for prefix, tgt in _DOT_PREFIXES.items():
        if key.startswith(prefix):
            target, name = tgt, key[len(prefix):]
            break
    for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                         (".lora.up.weight", "up"), (".alpha", "alpha")):  # fmt: skip
        if name.endswith(suffix):
            return target, name[: -len(suffix)], part
    # diffusers' attention-processor form: <attn>.processor.to_q_lora.down.weight -> <attn>.to_q
    match = re.fullmatch(r"(.*)\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight", name)
    if match:
        proj = "to_out.0" if match.group(2) == "to_out" else match.group(2)
        return target, f"{match.group(1)}.{proj}", match.group(3)
    return None


def read_lora(path: str | Path) -> list[LoraLayer]:
    """Parse a LoRA safetensors file into layers (weights on the CPU, as stored)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"LoRA file {path} must be *.safetensors; pickled LoRA files are refused")
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} named by flashstep.json `lora` is missing")
    state = load_file(str(path))
    layers: dict[tuple[str, str], LoraLayer] = {}
    ignored = []
    for key, tensor in state.items():
        parsed = _split(key)
        if parsed is None:
            ignored.append(key)
            continue
        target, module, part = parsed
        layer = layers.setdefault((target, module), LoraLayer(target, module))
        if part == "alpha":
            layer.alpha = float(tensor.float().item())
        else:
            setattr(layer, part, tensor)
    incomplete = [f"{t}:{m}" for (t, m), layer in layers.items() if layer.down is None or layer.up is None]
    if incomplete:
        raise CheckpointError(f"LoRA file {path} has layers without both down/A and up/B weights: {incomplete[:5]}")
    if not layers:
        raise CheckpointError(f"LoRA file {path} holds no LoRA weights in a known key format (e.g. {ignored[:3]})")
    return list(layers.values())


def _lookup(table: dict[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    """The module `name` refers to; CLIP text-encoder names may carry or lack the `text_model.` level
    (transformers 5 dropped it from CLIPTextModel, public LoRA files keep it)."""
    for candidate in (name, name.removeprefix("text_model.").removeprefix("text_model_"),
                      f"text_model.{name}", f"text_model_{name}"):  # fmt: skip
        if candidate in table:
            return table[candidate]
    return None


def fuse_lora(modules: dict[str, torch.nn.Module], layers: list[LoraLayer], scale: float = 1.0) -> int:
    """Add `scale * delta` to each targeted layer's weight in place; return how many layers changed.

    `modules` maps target names ("unet", "text_encoder", ...) to modules. Every layer must find its
    module: an unmatched name is an error (a LoRA for another architecture), not a silent skip.
    """
    tables: dict[str, dict[str, torch.nn.Module]] = {}
    for target, module in modules.items():
        named = dict(module.named_modules())
        tables[target] = {**named, **{name.replace(".", "_"): m for name, m in named.items()}}
    found = {id(layer): _lookup(tables.get(layer.target, {}), layer.module) for layer in layers}
    missing = [f"{layer.target}:{layer.module}" for layer in layers if found[id(layer)] is None]
    if missing:
        raise CheckpointError(
            f"LoRA names {len(missing)} layers the model does not have, e.g. {missing[:3]}: "
            "is it for another base architecture?"
        )
    with torch.no_grad():
        for layer in layers:
            target = found[id(layer)]
            weight = target.weight
            delta = layer.delta()
            if delta.shape != weight.shape:
                raise CheckpointError(
                    f"LoRA layer {layer.module} has shape {tuple(delta.shape)} but the model's weight is {tuple(weight.shape)}"
                )
            weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))
    return len(layers)
