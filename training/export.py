"""Export trained modules as a servable folder: diffusers format plus `flashstep.json`.

The folder is what `models` loads and what vanilla `StableDiffusionPipeline.from_pretrained`
loads, so users and the peer benchmarks can run it without flashstep. Weights are written as
safetensors; UNet and VAE in fp16 by default to keep the shipped set small (diffusers and the
engine upcast them on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from flashstep.models.diffusers_compat import make_diffusers_compatible
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.training.architecture import ShapesArch, build_text_encoder, build_unet, build_vae
from flashstep.training.tokenizer import build_tokenizer

# Stable Diffusion 1.x's noise schedule: every family's timestep arithmetic assumes it.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


def training_scheduler() -> DDPMScheduler:
    """The forward-noising schedule used in training (SD1.x's)."""
    return DDPMScheduler(**SD_SCHEDULE, clip_sample=False)


def hardware(device: torch.device | str | None = None) -> str:
    """The machine a run trained on, for provenance: the CPU's core count, plus the GPU's name when
    the run trained on `device` and that is a CUDA device."""
    cpu = f"{os.cpu_count()}-core CPU"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return f"{cpu}, {torch.cuda.get_device_name(device)}"
    return cpu


def git_commit() -> str:
    """The project's commit, asked of the checkout this file lies in, whatever the run's working folder."""
    try:
        repo = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=repo)
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export_servable(
    folder: str | Path,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    config: FlashstepConfig,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a diffusers StableDiffusionPipeline folder plus flashstep.json to `folder`."""
    folder = Path(folder)
    for module in (unet, vae):
        _name_source_by_folder(module)
    # diffusers reads what the UNet outputs from the scheduler; a flow UNet has no diffusers name for it.
    prediction = config.prediction if config.prediction != "flow" else SD_SCHEDULE["prediction_type"]
    scheduler = DPMSolverMultistepScheduler(**{**SD_SCHEDULE, "prediction_type": prediction})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(dtype)
    # transformers >= 5 loads a text encoder in its stored dtype ("auto") while diffusers loads
    # UNet and VAE as float32, so an fp16 text encoder would break vanilla CPU pipelines. It is
    # the smallest module; it stays float32.
    text_encoder.to(torch.float32)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    _write_slow_tokenizer_files(folder / "tokenizer")
    config.save(folder)
    # A velocity UNet gets diffusers' flow-matching sign and scheduler, so vanilla pipelines sample it too.
    make_diffusers_compatible(folder)
    return folder


def _name_source_by_folder(module: UNet2DConditionModel | AutoencoderKL) -> None:
    """Keep only `<model folder>/<component>` of the folder a module was loaded from.

    diffusers writes that folder into the exported config as `_name_or_path`; whole, it would ship
    the training machine's paths in every model folder.
    """
    source = module.config.get("_name_or_path")
    if source:
        path = Path(source)
        module.register_to_config(_name_or_path=f"{path.parent.name}/{path.name}")


def _write_slow_tokenizer_files(tokenizer_dir: Path) -> None:
    """vocab.json + merges.txt beside tokenizer.json, for transformers versions that read only those."""
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def export_random(
    folder: str | Path, config: FlashstepConfig, arch: ShapesArch | None = None, seed: int = 0
) -> Path:
    """A randomly initialised servable folder: for tests and smoke runs of the machinery only."""
    arch = arch or ShapesArch.tiny()
    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = build_tokenizer(folder / "_tokenizer_build", model_max_length=arch.text_max_length)
    text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    out = export_servable(
        folder,
        unet=build_unet(arch),
        vae=build_vae(arch),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        config=config,
        dtype=torch.float32,
    )
    for f in (folder / "_tokenizer_build").iterdir():
        f.unlink()
    (folder / "_tokenizer_build").rmdir()
    return out


def read_provenance(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "flashstep.json").read_text()).get("provenance", {})
