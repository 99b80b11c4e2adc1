"""`Engine`: one loaded checkpoint that turns batches of `GenerationRequest`s into images.

The engine holds modules only (UNet, VAE, text encoder(s), tokenizer(s), optional tiny decoder)
and runs stateless sampling functions (models/families), so concurrent `generate` calls from
different threads share nothing mutable but the prompt cache (locked) and the lazily loaded
hybrid base (locked). `generate` runs the pipeline's steps in order:

    validate -> encode prompts (LRU cache) -> per-request noise -> family sampler -> VAE decode

Loading is described in models/loading.py; families and timesteps in models/families.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

import kernels
from models.denoiser import Conditioning, Denoiser
from models.errors import CheckpointError, InvalidRequestError, ModelNotFoundError
from models.families import FAMILY_SPECS, bind_sampler, family_timesteps
from models.flashstep_config import CONFIG_NAME, FlashstepConfig
from models.hybrid import base_first_step
from models.loading import (
    check_config,
    check_pieces,
    fingerprint,
    is_sdxl,
    load_config,
    pick_device,
    pick_dtype,
    read_json,
    read_model_index,
    refuse_pickles,
    weight_files,
    weight_variant,
)
from models.lora import fuse_lora, read_lora
from models.nasa import install_nasa_processors
from models.outputs import GenerationRequest, GenerationResult, StageTimings
from models.prompts import PromptEncoder
from models.schedule import NoiseSchedule, cpu_generators, randn_per_sample

logger = logging.getLogger("flashstep.models")

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 30.0
TEACHER_DEFAULT_GUIDANCE = FAMILY_SPECS["teacher"].defaults["default_guidance_scale"]


def _load_text_module(model_index: dict, piece: Path, dtype: torch.dtype, *, tokenizer: bool):
    """A transformers text encoder or tokenizer of the class `model_index.json` names for `piece`."""
    import transformers

    entry = model_index.get(piece.name)
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise CheckpointError(f"`model_index.json` names no class for `{piece.name}/` ({entry!r})")
    library, class_name = entry
    if library != "transformers" or not hasattr(transformers, class_name):
        raise CheckpointError(f"`{piece.name}` names class {library}.{class_name}, which flashstep cannot load")
    cls = getattr(transformers, class_name)
    if tokenizer:
        return cls.from_pretrained(piece)
    variant = weight_variant(piece, piece.name)
    return cls.from_pretrained(piece, use_safetensors=True, variant=variant).to(dtype)


class Engine:
    """A servable checkpoint, loaded: validate requests, batch them, generate images."""

    name: str
    path: Path
    config: FlashstepConfig
    version: str
    device: torch.device
    dtype: torch.dtype
    max_prompt_tokens: int
    family: str

    def __init__(self) -> None:
        raise TypeError("use Engine.load(path, ...) to build an Engine")

    # ----- loading -----

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        family: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        models_root: str | Path | None = None,
        sampler: str | None = None,
        attention_backend: str | None = None,
        prompt_cache_size: int = 1024,
    ) -> Engine:
        """Load a servable folder (diffusers layout + flashstep.json).

        family: required for a folder without flashstep.json (a public checkpoint); overrides it otherwise.
        device/dtype: default CUDA fp16 when available, else CPU fp32.
        models_root: where `config.base` names are looked up (besides the shipped models).
        sampler: one of the family's samplers (teacher: dpmpp_2m | ddim; hypersd: tcd | ddim).
        attention_backend: kernels backend for the UNet's attention (default: kernels' active one).
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {path} does not exist or is not a folder")
        refuse_pickles(path)
        config = check_config(load_config(path, family))
        self = object.__new__(cls)
        self.name = name or path.name
        self.path = path
        self.config = config
        self.family = config.family
        self.models_root = None if models_root is None else Path(models_root)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.attention_backend = attention_backend
        self._lock = threading.Lock()
        self._base: Engine | None = None
        self.base_path, self._base_error = self._find_base()
        if config.lora is not None and self.base_path is None and not (path / "unet").is_dir():
            raise CheckpointError(f"LoRA checkpoint {path} needs its base {config.base!r}: {self._base_error}")
        self.sampler_name, self.sampler = bind_sampler(config, sampler)
        self._load_modules(prompt_cache_size)
        self.max_prompt_tokens = self.prompts.max_tokens
        logger.info(
            "engine loaded: name=%s version=%s family=%s sampler=%s device=%s dtype=%s sdxl=%s",
            self.name, self.version, self.family, self.sampler_name, self.device, self.dtype, self.sdxl,
        )  # fmt: skip
        return self

    def _find_base(self) -> tuple[Path | None, str | None]:
        """The base folder named by flashstep.json: a path (absolute, or relative to this folder) or a name."""
        base = self.config.base
        if base is None:
            return None, f"{self.name} names no `base` model"
        candidate = Path(base).expanduser()
        if not candidate.is_absolute():
            candidate = self.path / candidate
        if candidate.is_dir():
            return candidate, None
        from models.registry import resolve

        try:
            return resolve(base, self.models_root), None
        except ModelNotFoundError as exc:
            logger.warning("base model not found: model=%s base=%s error=%s", self.name, base, exc)
            return None, str(exc)

    def _load_modules(self, prompt_cache_size: int) -> None:
        from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

        # 1. Which pieces, from where: a LoRA checkpoint borrows what it lacks from its base.
        fallback = self.base_path if self.config.lora is not None else None
        index_root = self.path if (self.path / "model_index.json").is_file() or fallback is None else fallback
        model_index = read_model_index(index_root)
        self.sdxl = is_sdxl(model_index)
        self.force_zeros_for_empty_prompt = bool(model_index.get("force_zeros_for_empty_prompt", self.sdxl))
        names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
        if self.sdxl:
            names += ["text_encoder_2", "tokenizer_2"]
        if (self.path / "vae_tiny").is_dir():
            names.append("vae_tiny")
        pieces = check_pieces(self.path, names, fallback)

        # 2. Modules, in the serving dtype, safetensors only.
        def diffusers_module(cls, piece: str):
            variant = weight_variant(pieces[piece], piece)
            return cls.from_pretrained(pieces[piece], torch_dtype=self.dtype, use_safetensors=True, variant=variant)

        self.unet = diffusers_module(UNet2DConditionModel, "unet")
        self.vae = diffusers_module(AutoencoderKL, "vae")
        if self.sdxl and self.dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        self.vae_tiny = diffusers_module(AutoencoderTiny, "vae_tiny") if "vae_tiny" in pieces else None
        encoders = [_load_text_module(model_index, pieces["text_encoder"], self.dtype, tokenizer=False)]
        tokenizers = [_load_text_module(model_index, pieces["tokenizer"], self.dtype, tokenizer=True)]
        if self.sdxl:
            encoders.append(_load_text_module(model_index, pieces["text_encoder_2"], self.dtype, tokenizer=False))
            tokenizers.append(_load_text_module(model_index, pieces["tokenizer_2"], self.dtype, tokenizer=True))
        self.text_encoders = encoders

        # 3. LoRA fused into the weights (Hyper-SD), before anything reads them.
        if self.config.lora is not None:
            targets = {"unet": self.unet, "text_encoder": encoders[0]}
            if self.sdxl:
                targets["text_encoder_2"] = encoders[1]
            fused = fuse_lora(targets, read_lora(self.path / self.config.lora), self.config.lora_scale)
            logger.info("lora fused: model=%s file=%s layers=%d scale=%s", self.name, self.config.lora, fused, self.config.lora_scale)

        # 4. Device, eval mode, attention processors: NASA on cross-attention, kernels on the rest.
        for module in self._modules():
            module.to(self.device)
            module.eval()
            module.requires_grad_(False)
        install_nasa_processors(self.unet, self.attention_backend)
        kernels.install_attention_backend(self.unet, self.attention_backend)

        self.prompts = PromptEncoder(tokenizers, encoders, sdxl=self.sdxl, device=self.device, cache_size=prompt_cache_size)
        self.schedule = NoiseSchedule.from_config(
            read_json(pieces["scheduler"] / "scheduler_config.json", "`scheduler/scheduler_config.json`")
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.unet.config.in_channels)
        files = weight_files([pieces[p] for p in names if p in ("unet", "vae", "text_encoder", "text_encoder_2", "vae_tiny")])
        if self.config.lora is not None:
            files.append(self.path / self.config.lora)
        self.version = f"{self.name}@{fingerprint(files, self.config)}"
        self._base_guidance = self._read_base_guidance()

    def _modules(self) -> list[torch.nn.Module]:
        if getattr(self, "unet", None) is None:
            raise RuntimeError(f"engine {self.name} is closed")
        mods = [self.unet, self.vae, *self.text_encoders]
        return mods + ([self.vae_tiny] if self.vae_tiny is not None else [])

    def _read_base_guidance(self) -> float:
        if self.config.hybrid_guidance_scale is not None:
            return self.config.hybrid_guidance_scale
        if self.base_path is None:
            return TEACHER_DEFAULT_GUIDANCE
        if (self.base_path / CONFIG_NAME).is_file():
            return FlashstepConfig.load(self.base_path).default_guidance_scale
        return TEACHER_DEFAULT_GUIDANCE

    def base_engine(self) -> Engine:
        """The hybrid's base model, loaded on first use (same device and dtype), then kept."""
        with self._lock:
            if self._base is None:
                if self.base_path is None:
                    raise InvalidRequestError("hybrid", f"`hybrid` needs a base model but {self._base_error}")
                family = None if (self.base_path / CONFIG_NAME).is_file() else "teacher"
                base = Engine.load(
                    self.base_path, family=family, device=self.device, dtype=self.dtype,
                    models_root=self.models_root, attention_backend=self.attention_backend,
                )  # fmt: skip
                if base.config.prediction not in ("epsilon", "v_prediction") or base.sdxl != self.sdxl or (
                    base.latent_channels != self.latent_channels
                ):
                    raise CheckpointError(
                        f"base {base.name} cannot start {self.name}'s hybrid: it must be an SD-style diffusion "
                        "model with the same latent space"
                    )
                self._base = base
            return self._base

    # ----- requests -----

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """A copy of `request` with the model's defaults filled in, or InvalidRequestError naming the field."""
        r, cfg = request, self.config
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise InvalidRequestError("prompt", f"`prompt` must be a non-empty string but is {r.prompt!r}")
        self._check_tokens("prompt", r.prompt)
        if r.negative_prompt is not None:
            if not isinstance(r.negative_prompt, str):
                raise InvalidRequestError("negative_prompt", f"`negative_prompt` must be a string but is {r.negative_prompt!r}")
            self._check_tokens("negative_prompt", r.negative_prompt)
        if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed <= MAX_SEED:
            raise InvalidRequestError("seed", f"`seed` must be an integer in [0, 2**63 - 1] but is {r.seed!r}")

        steps = cfg.default_steps if r.num_inference_steps is None else r.num_inference_steps
        if steps not in cfg.allowed_steps:
            raise InvalidRequestError(
                "num_inference_steps",
                f"`num_inference_steps` must be one of {list(cfg.allowed_steps)} for {self.name} but is {steps!r}",
            )
        if r.hybrid:
            if self.base_path is None:
                raise InvalidRequestError("hybrid", f"`hybrid` needs a base model but {self._base_error}")
            if steps < 2:
                raise InvalidRequestError(
                    "hybrid", f"`hybrid` needs at least 2 steps (the base takes the first) but `num_inference_steps` is {steps}"
                )

        guidance = self._check_guidance(r, hybrid=r.hybrid)
        alpha = cfg.nasa_alpha if r.nasa_alpha is None else r.nasa_alpha
        if not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
            raise InvalidRequestError("nasa_alpha", f"`nasa_alpha` must be in [0, 1] but is {alpha!r}")
        if r.negative_prompt:
            self._check_negative_prompt_is_used(guidance, alpha, hybrid=r.hybrid)

        sizes = {}
        for field in ("height", "width"):
            value = getattr(r, field)
            value = cfg.resolution if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value % 8 != 0 or value not in cfg.resolutions:
                raise InvalidRequestError(
                    field, f"`{field}` must be one of {list(cfg.resolutions)} (multiples of 8) for {self.name} but is {value!r}"
                )
            sizes[field] = value
        if r.tiny_decoder and self.vae_tiny is None:
            raise InvalidRequestError("tiny_decoder", f"`tiny_decoder` is unavailable: {self.name} has no vae_tiny/ folder")
        return replace(
            r, num_inference_steps=steps, guidance_scale=float(guidance), nasa_alpha=float(alpha), **sizes
        )

    def _check_tokens(self, field: str, text: str) -> None:
        n = self.prompts.count_tokens(text)
        if n > self.max_prompt_tokens:
            raise InvalidRequestError(
                field, f"`{field}` is {n} tokens long but {self.name} takes at most {self.max_prompt_tokens}"
            )

    def _check_guidance(self, r: GenerationRequest, *, hybrid: bool) -> float:
        """Guidance given or defaulted. In a hybrid run it is the base model's CFG scale for its step."""
        g = r.guidance_scale
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g)
                              or not 0.0 <= g <= MAX_GUIDANCE):  # fmt: skip
            raise InvalidRequestError("guidance_scale", f"`guidance_scale` must be in [0, {MAX_GUIDANCE:g}] but is {g!r}")
        if hybrid:
            return self._base_guidance if g is None else g
        if FAMILY_SPECS[self.family].guided:
            return self.config.default_guidance_scale if g is None else g
        if g not in (None, 0, 0.0):
            raise InvalidRequestError(
                "guidance_scale",
                f"`guidance_scale` must be 0 or left out for family {self.family} (it takes no guidance) but is {g!r}",
            )
        return 0.0

    def _check_negative_prompt_is_used(self, guidance: float, alpha: float, *, hybrid: bool) -> None:
        """Refuse a negative prompt that neither NASA (alpha > 0) nor CFG (guidance > 1) would read.

        Silently dropping it would return an image the caller believes was steered away from it.
        CFG applies to guided families and to a hybrid's base step (a teacher with CFG).
        """
        if alpha > 0.0:
            return
        takes_cfg = FAMILY_SPECS[self.family].guided or hybrid
        if takes_cfg and guidance > 1.0:
            return
        where = f"`negative_prompt` has no effect on {self.name} (family {self.family}) with `nasa_alpha` 0"
        if takes_cfg:
            raise InvalidRequestError(
                "negative_prompt",
                f"{where} and `guidance_scale` {guidance:g} (classifier-free guidance is off at <= 1): "
                "set `nasa_alpha` in (0, 1] or `guidance_scale` > 1, or leave `negative_prompt` out",
            )
        raise InvalidRequestError(
            "negative_prompt",
            f"{where} (the family takes no classifier-free guidance, so only NASA reads it): "
            "set `nasa_alpha` in (0, 1] or leave `negative_prompt` out",
        )

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys can share one `generate` call (one UNet batch)."""
        r = self.validate(request)
        return self._key(r)

    @staticmethod
    def _key(r: GenerationRequest) -> tuple:
        cfg_on = r.guidance_scale > 1.0
        nasa_on = bool(r.negative_prompt) and r.nasa_alpha > 0.0
        return (r.num_inference_steps, r.height, r.width, cfg_on, r.hybrid, nasa_on, r.tiny_decoder)

    # ----- generation -----

    def generate(self, requests: list[GenerationRequest]) -> GenerationResult:
        """Images for `requests` (one batch_key), in order, with per-stage timings and UNet evaluations."""
        if not requests:
            raise InvalidRequestError("requests", "`requests` must hold at least one request but is empty")
        reqs = [self.validate(r) for r in requests]
        keys = {self._key(r) for r in reqs}
        if len(keys) > 1:
            raise InvalidRequestError(
                "requests", f"requests in one generate() call must share a batch_key but have {sorted(keys, key=str)}"
            )
        first = reqs[0]
        self._modules()  # raises if closed
        with torch.inference_mode():
            # 1. Encode the prompts (and the base model's, for the hybrid).
            start = time.perf_counter()
            if first.hybrid:
                base = self.base_engine()
                base_cond = base._conditioning(reqs, cfg=first.guidance_scale > 1.0)
                cond = self._conditioning(reqs, cfg=False)
            else:
                base, base_cond = None, None
                cond = self._conditioning(reqs, cfg=first.guidance_scale > 1.0)
            self._sync()
            encoded = time.perf_counter()

            # 2. Denoise from each request's own noise.
            latents, evals = self._denoise(reqs, cond, base, base_cond)
            self._sync()
            denoised = time.perf_counter()

            # 3. Decode.
            images = self._decode(latents, tiny=first.tiny_decoder)
            decoded = time.perf_counter()
        timings = StageTimings(encode=encoded - start, denoise=denoised - encoded, decode=decoded - denoised)
        return GenerationResult(
            images=images, timings=timings, unet_evals=evals, batch_size=len(reqs), model_version=self.version
        )

    def _conditioning(self, reqs: list[GenerationRequest], *, cfg: bool) -> Conditioning:
        prompts = self.prompts.encode([r.prompt for r in reqs])
        cond = Conditioning(prompt_embeds=torch.stack([e.hidden for e in prompts]))  # (B, L, C)
        if self.sdxl:
            cond.pooled_embeds = torch.stack([e.pooled for e in prompts])  # (B, P)
            cond.time_ids = torch.tensor(
                [[r.height, r.width, 0, 0, r.height, r.width] for r in reqs], device=self.device, dtype=self.dtype
            )  # (B, 6): original size, crop corner, target size
        nasa_rows = [bool(r.negative_prompt) and r.nasa_alpha > 0.0 for r in reqs]
        if not cfg and not any(nasa_rows):
            return cond
        negatives = self.prompts.encode([r.negative_prompt or "" for r in reqs])
        negative_hidden = torch.stack([e.hidden for e in negatives])  # (B, L, C)
        if cfg:
            uncond_hidden = negative_hidden
            uncond_pooled = torch.stack([e.pooled for e in negatives]) if self.sdxl else None
            if self.sdxl and self.force_zeros_for_empty_prompt:
                # SDXL pipelines feed zeros, not the encoded empty prompt, when no negative is given.
                keep = torch.tensor([bool(r.negative_prompt) for r in reqs], device=self.device)
                uncond_hidden = uncond_hidden * keep.view(-1, 1, 1).to(uncond_hidden.dtype)
                uncond_pooled = uncond_pooled * keep.view(-1, 1).to(uncond_pooled.dtype)
            cond.uncond_embeds, cond.uncond_pooled = uncond_hidden, uncond_pooled
            cond.guidance_scale = torch.tensor([r.guidance_scale for r in reqs], device=self.device)
        if any(nasa_rows):
            cond.nasa_embeds = negative_hidden
            cond.nasa_alpha = tuple(r.nasa_alpha if on else 0.0 for r, on in zip(reqs, nasa_rows, strict=True))
        return cond

    def _denoise(
        self,
        reqs: list[GenerationRequest],
        cond: Conditioning,
        base: Engine | None,
        base_cond: Conditioning | None,
    ) -> tuple[torch.Tensor, int]:
        first = reqs[0]
        generators = cpu_generators([r.seed for r in reqs])
        f = self.vae_scale_factor
        shape = (self.latent_channels, first.height // f, first.width // f)
        x = randn_per_sample(generators, shape, self.device, self.dtype)  # (B, C, h, w)
        timesteps = family_timesteps(self.config, first.num_inference_steps, self.schedule.num_train_timesteps)
        model = Denoiser(self.unet, cond, self.config.prediction, self.schedule)
        if base is None:
            return self.sampler(model, x, timesteps, self.schedule, generators), model.evals
        base_model = Denoiser(base.unet, base_cond, base.config.prediction, base.schedule)
        x = base_first_step(
            base_model, x, timesteps[0], timesteps[1],
            prediction=self.config.prediction, schedule=self.schedule, generators=generators,
        )  # fmt: skip
        x = self.sampler(model, x, timesteps[1:], self.schedule, generators)
        return x, base_model.evals + model.evals

    def _decode(self, latents: torch.Tensor, *, tiny: bool) -> list[Image.Image]:
        if tiny:
            vae = self.vae_tiny
            z = latents / vae.config.scaling_factor  # TAESD reads SD's scaled latents (factor 1.0)
        else:
            vae = self.vae
            z = latents / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None) is not None:
                z = z + vae.config.shift_factor
        dtype = next(vae.parameters()).dtype  # not `vae.dtype`, which walks every parameter per call
        pixels = vae.decode(z.to(dtype)).sample  # (B, 3, H, W) in [-1, 1]
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in arrays]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----- lifecycle -----

    def warmup(self) -> None:
        """One small generate (fewest steps) so kernels, allocator and prompt cache are ready."""
        steps = min(self.config.allowed_steps)
        self.generate([GenerationRequest(prompt="warmup", seed=0, num_inference_steps=steps)])

    def memory_bytes(self) -> int:
        """Bytes of parameters and buffers of the modules this engine holds (and its hybrid base, once loaded)."""
        total = sum(
            t.numel() * t.element_size()
            for module in self._modules()
            for t in (*module.parameters(), *module.buffers())
        )
        if self._base is not None and getattr(self._base, "unet", None) is not None:
            total += self._base.memory_bytes()
        return total

    def close(self) -> None:
        """Drop module references so their memory can be freed; the engine cannot generate afterwards."""
        with self._lock:
            if self._base is not None:
                self._base.close()
                self._base = None
            self.unet = self.vae = self.vae_tiny = None
            self.text_encoders = []
            if getattr(self, "prompts", None) is not None:
                self.prompts.cache.clear()
                self.prompts.text_encoders = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return f"Engine(name={self.name!r}, family={self.family!r}, version={self.version!r}, device={self.device})"
