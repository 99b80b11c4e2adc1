"""Reading a servable folder: its pieces, safetensors weights only, device and dtype, a version hash.

A folder is a diffusers pipeline layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`; SDXL adds `text_encoder_2/`, `tokenizer_2/`) plus `flashstep.json`.
A LoRA checkpoint (Hyper-SD) may hold only its LoRA file and flashstep.json; pieces it lacks come
from its base folder. Pickled weights (`.bin`, `.ckpt`, `.pt`, `.pth`) are never unpickled: a
piece that has only those is refused with the conversion to safetensors spelled out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from flashstep.models.confinement import CONVERT_HINT, PICKLE_SUFFIXES, confine_tree
from flashstep.models.errors import CheckpointError, UnknownFamilyError
from flashstep.models.families import FAMILY_SPECS, FLOW_FAMILIES
from flashstep.models.flashstep_config import CONFIG_NAME, FLOW_PREDICTIONS, FlashstepConfig
from flashstep.models.schedule import FLOW_NOISE_TIMESTEP

PIECES = {
    "unet": "the denoising UNet",
    "vae": "the VAE that decodes latents to pixels",
    "text_encoder": "the text encoder",
    "tokenizer": "the tokenizer",
    "scheduler": "the noise schedule (scheduler_config.json)",
    "text_encoder_2": "SDXL's second text encoder",
    "tokenizer_2": "SDXL's second tokenizer",
    "vae_tiny": "the tiny decoder (AutoencoderTiny)",
}
WEIGHT_PIECES = ("unet", "vae", "text_encoder", "text_encoder_2", "vae_tiny")
# Classes `model_index.json` may name, per library: the ones the engine knows how to load, plus
# the pieces of public pipelines it never opens (safety checker, feature extractor), so those
# checkpoints still load. Anything else is refused before any module is built: a class name is
# an import the checkpoint would choose.
SCHEDULER_CLASSES = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
})  # fmt: skip
ALLOWED_CLASSES = {
    "diffusers": frozenset({"UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny"}) | SCHEDULER_CLASSES,
    "transformers": frozenset({
        "CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer", "CLIPTokenizerFast",
        "CLIPImageProcessor", "CLIPFeatureExtractor", "CLIPVisionModelWithProjection",
    }),  # fmt: skip
    "stable_diffusion": frozenset({"StableDiffusionSafetyChecker"}),
}


# ----- device and dtype -----


def pick_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """The given dtype, else fp16 on CUDA and fp32 on CPU (fp16 weights are upcast there)."""
    if isinstance(dtype, str):
        names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
        if dtype not in names:
            raise ValueError(f"`dtype` must be one of {sorted(names)} but is {dtype!r}")
        return names[dtype]
    if dtype is not None:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.float32


# ----- the folder and its pieces -----


def read_json(path: Path, what: str) -> dict:
    """A JSON file's content, or a CheckpointError naming `what` is missing or malformed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint is missing {what}: {path} not found") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def read_model_index(folder: Path) -> dict:
    """`model_index.json`: which class each piece of the diffusers pipeline is, from `ALLOWED_CLASSES` only."""
    return check_model_index(read_json(folder / "model_index.json", "`model_index.json` (the diffusers pipeline index)"))


def check_model_index(model_index: dict) -> dict:
    """`model_index` unchanged when every piece names an allowed class, else CheckpointError naming it."""
    if not isinstance(model_index, dict):
        raise CheckpointError("`model_index.json` must hold a JSON object")
    for piece, entry in model_index.items():
        if piece.startswith("_") or not isinstance(entry, list):
            continue  # `_class_name`, `_diffusers_version`, flags such as `requires_safety_checker`
        if len(entry) != 2:
            raise CheckpointError(f"`model_index.json` entry `{piece}` must be [library, class] but is {entry!r}")
        library, class_name = entry
        if library is None and class_name is None:
            continue  # a piece the pipeline does without
        if class_name not in ALLOWED_CLASSES.get(library, ()):
            allowed = sorted(f"{lib}.{cls}" for lib, classes in ALLOWED_CLASSES.items() for cls in classes)
            raise CheckpointError(
                f"`model_index.json` entry `{piece}` names class {library}.{class_name}, which flashstep does not "
                f"load; allowed classes are {allowed}"
            )
    return model_index


def is_sdxl(model_index: dict) -> bool:
    """True for an SDXL-class pipeline (two text encoders)."""
    entry = model_index.get("text_encoder_2")
    return isinstance(entry, list) and entry[0] is not None


def weight_variant(piece_dir: Path, piece: str) -> str | None:
    """The safetensors variant to load ("fp16" when only that exists), refusing pickled weights.

    Raises CheckpointError naming the piece when it has no weights, or naming the pickled file
    and how to convert it when it has only pickled ones.
    """
    safetensors = sorted(p.name for p in piece_dir.glob("*.safetensors"))
    safetensors += sorted(p.name for p in piece_dir.glob("*.safetensors.index*.json"))
    if safetensors:
        plain = [n for n in safetensors if ".fp16." not in n]
        return None if plain else "fp16"
    pickled = sorted(p for p in piece_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"`{piece}/` ({PIECES.get(piece, piece)}) has only pickled weights {pickled[0]}: {CONVERT_HINT}"
        )
    raise CheckpointError(f"`{piece}/` ({PIECES.get(piece, piece)}) in {piece_dir.parent} has no *.safetensors weights")


def piece_dir(folder: Path, piece: str, fallback: Path | None = None) -> Path:
    """`folder/piece`, else `fallback/piece` (a LoRA checkpoint's base), else a CheckpointError naming it."""
    for root in (folder, fallback):
        if root is not None and (root / piece).is_dir():
            return root / piece
    where = str(folder) if fallback is None else f"{folder} or its base {fallback}"
    raise CheckpointError(f"checkpoint is missing `{piece}/` ({PIECES.get(piece, piece)}) in {where}")


def check_pieces(folder: Path, pieces: list[str], fallback: Path | None = None) -> dict[str, Path]:
    """Every piece's directory, its config present and weights safetensors: fail before loading any."""
    found = {}
    for piece in pieces:
        path = piece_dir(folder, piece, fallback)
        if piece in WEIGHT_PIECES:
            if not (path / "config.json").is_file():
                raise CheckpointError(f"`{piece}/` ({PIECES[piece]}) has no config.json in {path}")
            weight_variant(path, piece)
        found[piece] = path
    return found


def refuse_pickles(folder: Path) -> None:
    """Refuse a folder with a pickled file anywhere in it (tokenizer folders included).

    Nothing pickled is ever unpickled, but a pickle beside safetensors is one `use_safetensors`
    flag away from running code, so such a folder is refused whole.
    """
    confine_tree(folder, None)


# ----- flashstep.json -----


def config_defaults_for(family: str, folder: Path, fallback: Path | None = None) -> FlashstepConfig:
    """flashstep.json values for a public checkpoint that has none: the family's defaults.

    The native resolution is the UNet's `sample_size` times the VAE's downsampling factor (512 for
    SD1.5, 1024 for SDXL); the prediction type comes from the scheduler config.
    """
    if family not in FAMILY_SPECS:
        raise UnknownFamilyError(f"`family` must be one of {sorted(FAMILY_SPECS)} but is {family!r}")
    unet = read_json(piece_dir(folder, "unet", fallback) / "config.json", "`unet/config.json`")
    vae = read_json(piece_dir(folder, "vae", fallback) / "config.json", "`vae/config.json`")
    sched = read_json(
        piece_dir(folder, "scheduler", fallback) / "scheduler_config.json", "`scheduler/scheduler_config.json`"
    )
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample_size = unet.get("sample_size", 64)
    sample_size = sample_size[0] if isinstance(sample_size, list) else sample_size
    values = dict(FAMILY_SPECS[family].defaults)
    values.setdefault("prediction", sched.get("prediction_type", "epsilon"))
    if family == "hypersd":
        loras = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(loras) == 1:
            values["lora"] = loras[0]
    return FlashstepConfig(family=family, resolution=int(sample_size) * scale, **values)


def load_config(folder: Path, family: str | None) -> FlashstepConfig:
    """flashstep.json (with `family` overriding its family when given), or the family's defaults."""
    path = folder / CONFIG_NAME
    if path.is_file():
        data = read_json(path, CONFIG_NAME)
        named = data.get("family")
        if named is not None and named not in FAMILY_SPECS and family is None:
            raise UnknownFamilyError(
                f"{path}: `family` must be one of {sorted(FAMILY_SPECS)} but is {named!r}"
            )
        if family is not None:
            if family not in FAMILY_SPECS:
                raise UnknownFamilyError(f"`family` must be one of {sorted(FAMILY_SPECS)} but is {family!r}")
            data["family"] = family
        config = FlashstepConfig.from_dict(data)
    elif family is None:
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}: pass `family` (one of {sorted(FAMILY_SPECS)}) for a public checkpoint"
        )
    else:
        return config_defaults_for(family, folder)
    return config


def check_config(config: FlashstepConfig) -> FlashstepConfig:
    """Family-specific facts flashstep.json must respect."""
    if config.family == "swiftbrush" and config.allowed_steps != (1,):
        raise CheckpointError(f"swiftbrush is one-step: `allowed_steps` must be [1] but is {list(config.allowed_steps)}")
    if config.family == "instaflow" and config.prediction not in FLOW_PREDICTIONS:
        raise CheckpointError(
            f"family instaflow predicts a velocity: `prediction` must be one of {list(FLOW_PREDICTIONS)} "
            f"but is {config.prediction!r}"
        )
    if config.prediction in FLOW_PREDICTIONS and config.family not in FLOW_FAMILIES:
        raise CheckpointError(
            f"`prediction` {config.prediction!r} belongs to families {list(FLOW_FAMILIES)} only, but family is {config.family!r}"
        )
    if config.prediction in FLOW_PREDICTIONS and config.family == "swiftbrush" and config.conditioning_timestep != FLOW_NOISE_TIMESTEP:
        raise CheckpointError(
            f"a flow swiftbrush student starts from pure noise at t = {FLOW_NOISE_TIMESTEP}: "
            f"`conditioning_timestep` must be {FLOW_NOISE_TIMESTEP} but is {config.conditioning_timestep}"
        )
    if not 0.0 <= config.nasa_alpha <= 1.0:
        raise CheckpointError(f"`nasa_alpha` must be in [0, 1] but is {config.nasa_alpha}")
    return config


# ----- version -----

_FULL_HASH_LIMIT = 64 << 20
_CHUNK = 4 << 20


def fingerprint(files: list[Path], config: FlashstepConfig) -> str:
    """Short sha256 of the config and the weight files (whole files up to 64 MiB, else size + ends)."""
    digest = hashlib.sha256(config.to_json().encode())
    for path in sorted(files):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_CHUNK))
                fh.seek(size - _CHUNK)
                digest.update(fh.read(_CHUNK))
    return digest.hexdigest()[:10]


def weight_files(piece_dirs: list[Path]) -> list[Path]:
    """The safetensors files of the given piece directories (what `fingerprint` hashes)."""
    return [p for d in piece_dirs for p in sorted(d.glob("*.safetensors"))]
