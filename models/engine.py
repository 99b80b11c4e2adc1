"""`Engine`: one loaded checkpoint that turns batches of `GenerationRequest`s into images.

The engine holds modules only (UNet, VAE, text encoder(s), tokenizer(s), optional tiny decoder)
and runs stateless sampling functions (models/families), so concurrent `generate` calls from
different threads share nothing mutable but the prompt cache (locked) and the lazily loaded
hybrid base (locked). `generate` runs the pipeline's steps in order:

    validate (models/validation.py) -> encode prompts (LRU cache) -> per-request noise -> family sampler -> VAE decode

Loading is described in models/loading.py; families and timesteps in models/families.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from flashstep.kernels.processors import install_attention_backend
from flashstep.models.confinement import check_path_text, confine, confine_tree, resolved_roots
from flashstep.models.denoiser import Conditioning, Denoiser
from flashstep.models.diffusers_compat import to_flashstep_convention
from flashstep.models.errors import (
    CheckpointError,
    InvalidRequestError,
    ModelNotFoundError,
    NonFiniteOutputError,
)
from flashstep.models.families import FAMILY_SPECS, bind_sampler, family_timesteps
from flashstep.models.flashstep_config import CONFIG_NAME, FlashstepConfig
from flashstep.models.hybrid import base_first_step
from flashstep.models.loading import (
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
from flashstep.models.lora import fuse_lora, read_lora
from flashstep.models.nasa import install_nasa_processors
from flashstep.models.outputs import GenerationRequest, GenerationResult, StageTimings
from flashstep.models.prompts import DEFAULT_EMBEDDING_CACHE_BYTES, PromptEncoder
from flashstep.models.registry import allowed_roots, is_bare_name, resolve
from flashstep.models.schedule import NoiseSchedule, cpu_generators, randn_per_sample
from flashstep.models.validation import ModelLimits, batch_key, validate_request

logger = logging.getLogger("flashstep.models")

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
        prompt_cache_bytes: int = DEFAULT_EMBEDDING_CACHE_BYTES,
        confine_to: Sequence[str | Path] | None = None,
    ) -> Engine:
        """Load a servable folder (diffusers layout + flashstep.json).

        family: required for a folder without flashstep.json (a public checkpoint); overrides it otherwise.
        device/dtype: default CUDA fp16 when available, else CPU fp32.
        models_root: where `config.base` names are looked up (besides the shipped models).
        sampler: one of the family's samplers (teacher: dpmpp_2m | ddim; hypersd: tcd | ddim).
        attention_backend: kernels backend for the UNet's attention (default: kernels' active one).
        prompt_cache_bytes: budget of the prompt-embedding cache (keys and tensors).
        confine_to: folders everything read must resolve inside (the server passes the models root
            and the shipped folder): the folder, its `base` and `lora`, every symlink in them
            (models/confinement.py). None (the library and the CLI) reads any folder named.
        """
        roots = None if confine_to is None else resolved_roots(confine_to)
        path = Path(path)
        if roots is not None:
            path = confine(path, roots, "checkpoint folder")
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder {path} does not exist or is not a folder")
        refuse_pickles(path)
        if roots is not None:
            confine_tree(path, roots)
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
        self.confine_to = roots
        self.base_path, self._base_error = self._find_base()
        if config.lora is not None and self.base_path is None and not (path / "unet").is_dir():
            raise CheckpointError(f"LoRA checkpoint {path} needs its base {config.base!r}: {self._base_error}")
        if config.lora is not None:
            self._lora_path()  # refused before any weights are read, not after
            if self.base_path is not None:
                confine_tree(self.base_path, roots)  # the pieces a LoRA checkpoint borrows are read from there
        self.sampler_name, self.sampler = bind_sampler(config, sampler)
        self._load_modules(prompt_cache_bytes)
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
        restricted = self.confine_to is not None
        if restricted:
            try:
                check_path_text(base, "base")
            except InvalidRequestError as exc:
                raise CheckpointError(f"{self.path / CONFIG_NAME}: {exc}") from exc
        candidate = Path(base).expanduser()
        if not candidate.is_absolute():
            candidate = self.path / candidate
        if restricted and (candidate.is_dir() or not is_bare_name(base)):
            # A path must stay inside whether or not it exists; resolving it names the real folder.
            candidate = confine(candidate, self.confine_to, f"{CONFIG_NAME} `base`")
            if not candidate.is_dir():
                return None, f"base folder {base!r} of {self.name} does not exist"
        if candidate.is_dir():
            return candidate, None
        try:
            found = resolve(base, self.models_root, restrict_to_root=restricted, field="base")
            if restricted:
                found = confine(found, self.confine_to, f"{CONFIG_NAME} `base`")
            return found, None
        except ModelNotFoundError as exc:
            logger.warning("base model not found: model=%s base=%s error=%s", self.name, base, exc)
            return None, str(exc)

    def _load_modules(self, prompt_cache_bytes: int) -> None:
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
        # A folder stored with diffusers' flow-matching sign (for vanilla pipelines) samples here as "flow".
        self.config = to_flashstep_convention(self.unet, self.config)
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
            fused = fuse_lora(targets, read_lora(self._lora_path()), self.config.lora_scale)
            logger.info("lora fused: model=%s file=%s layers=%d scale=%s", self.name, self.config.lora, fused, self.config.lora_scale)

        # 4. Device, eval mode, attention processors: NASA on cross-attention, kernels on the rest.
        for module in self._modules():
            module.to(self.device)
            module.eval()
            module.requires_grad_(False)
        install_nasa_processors(self.unet, self.attention_backend)
        install_attention_backend(self.unet, self.attention_backend)

        self.prompts = PromptEncoder(tokenizers, encoders, sdxl=self.sdxl, device=self.device, cache_bytes=prompt_cache_bytes)
        self.schedule = NoiseSchedule.from_config(
            read_json(pieces["scheduler"] / "scheduler_config.json", "`scheduler/scheduler_config.json`")
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.unet.config.in_channels)
        files = weight_files([pieces[p] for p in names if p in ("unet", "vae", "text_encoder", "text_encoder_2", "vae_tiny")])
        if self.config.lora is not None:
            files.append(self._lora_path())
        self.version = f"{self.name}@{fingerprint(files, self.config)}"
        self._base_guidance = self._read_base_guidance()

    def _lora_path(self) -> Path:
        """`flashstep.json`'s `lora` file, inside the folders allowed when confined."""
        path = self.path / self.config.lora  # an absolute `lora` replaces the folder
        if self.confine_to is not None:
            return confine(path, self.confine_to, f"{CONFIG_NAME} `lora`")
        return path

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
                    confine_to=self.confine_to,
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

    @property
    def limits(self) -> ModelLimits:
        """What this model accepts (models/validation.py checks requests against it)."""
        return ModelLimits(
            name=self.name,
            family=self.family,
            config=self.config,
            guided=FAMILY_SPECS[self.family].guided,
            max_prompt_tokens=self.max_prompt_tokens,
            count_tokens=self.prompts.count_tokens,
            base_guidance=self._base_guidance,
            base_missing=None if self.base_path is not None else self._base_error,
            has_tiny_decoder=self.vae_tiny is not None,
        )

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """A copy of `request` with the model's defaults filled in, or InvalidRequestError naming the field."""
        return validate_request(request, self.limits)

    def batch_key(self, request: GenerationRequest) -> tuple:
        """Requests with equal keys can share one `generate` call (one UNet batch)."""
        return batch_key(self.validate(request))

    # ----- generation -----

    def generate(self, requests: list[GenerationRequest]) -> GenerationResult:
        """Images for `requests` (one batch_key), in order, with per-stage timings and UNet evaluations."""
        if not requests:
            raise InvalidRequestError("requests", "`requests` must hold at least one request but is empty")
        reqs = [self.validate(r) for r in requests]
        keys = {batch_key(r) for r in reqs}
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

            # 3. Decode, and check every image is finite: a NaN would otherwise become a black PNG.
            finite = torch.isfinite(latents).flatten(1).all(dim=1)  # (B,)
            images, decoded_finite = self._decode(latents, tiny=first.tiny_decoder)
            finite = (finite & decoded_finite).tolist()
            decoded = time.perf_counter()
        timings = StageTimings(encode=encoded - start, denoise=denoised - encoded, decode=decoded - denoised)
        result = GenerationResult(
            images=images, timings=timings, unet_evals=evals, batch_size=len(reqs), model_version=self.version
        )
        bad = [i for i, ok in enumerate(finite) if not ok]
        if bad:
            logger.warning("non-finite output: model=%s batch=%d indices=%s", self.name, len(reqs), bad)
            raise NonFiniteOutputError(
                f"{self.name} produced non-finite (NaN or Inf) values for {len(bad)} of {len(reqs)} images",
                indices=bad,
                result=result,
            )
        return result

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

    def _decode(self, latents: torch.Tensor, *, tiny: bool) -> tuple[list[Image.Image], torch.Tensor]:
        """Images of `latents` (B, C, h, w), and which of them decoded to finite pixels (B,) bool."""
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
        finite = torch.isfinite(pixels).flatten(1).all(dim=1)  # (B,): clamp would turn NaN into black
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in arrays], finite

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----- lifecycle -----

    def warmup(self) -> None:
        """One small generate (fewest steps) so kernels, allocator and prompt cache are ready."""
        steps = min(self.config.allowed_steps)
        self.generate([GenerationRequest(prompt="warmup", seed=0, num_inference_steps=steps)])

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without start/end tokens (the longest over the tokenizers); counts are cached."""
        return self.prompts.count_tokens(text)

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


def load_engine(name_or_path: str, models_root: Path | None = None, *, restrict_to_root: bool = False, **kwargs) -> Engine:
    """`Engine.load` on the folder `registry.resolve` finds, named after the model name (or the folder).

    restrict_to_root: for untrusted input, as in `registry.resolve`; the engine is then confined to the
    models root and the shipped folder (`Engine.load`'s `confine_to`). Other keyword arguments go to `Engine.load`.
    """
    folder = resolve(name_or_path, models_root, restrict_to_root=restrict_to_root)
    kwargs.setdefault("name", folder.name)
    if restrict_to_root:
        kwargs.setdefault("confine_to", allowed_roots(models_root))
    return Engine.load(folder, models_root=models_root, **kwargs)
