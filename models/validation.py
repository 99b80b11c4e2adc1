"""The limits of a `GenerationRequest` and the one function that checks a request against them.

Two kinds of limit:

- fixed ones, the same for every model (`MAX_SEED`, `MAX_PROMPT_CHARS`, `MAX_GUIDANCE`, the NASA
  alpha range, sizes in multiples of `SIZE_MULTIPLE`); the server's request schemas take their
  bounds from these constants, so HTTP and the engine can never disagree;
- per-model ones (allowed steps and sizes, prompt length in tokens, whether the family reads
  guidance, whether a hybrid base or a tiny decoder exists), described by `ModelLimits`.

`validate_request` applies both and fills in the model's defaults. `Engine.validate` is that
function applied to the engine's `ModelLimits`; nothing else checks a request's values.
Every error is an `InvalidRequestError` naming the field, its allowed range and the value given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from flashstep.models.errors import InvalidRequestError
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest

# 2**32 - 1: the range numpy's legacy seeding and most image UIs accept, and what the HTTP API
# has always documented; torch.Generator.manual_seed takes every value in it.
MAX_SEED = 2**32 - 1
# Characters, checked before tokenizing so an oversized body costs no tokenizer time; the
# per-model token limit (`ModelLimits.max_prompt_tokens`) is the binding one.
MAX_PROMPT_CHARS = 32_000
# Names of models as clients send them (folder names, OpenAI model ids); loaded names are shorter.
MAX_MODEL_NAME_CHARS = 128
# End-user ids (OpenAI's `user`, `safety_identifier`): hashes or short handles, never documents.
MAX_USER_CHARS = 256
# WIDTHxHEIGHT with up to five digits a side, or 'auto'.
MAX_SIZE_CHARS = 11
# Any other string a request may carry (enumerated options such as `quality`); refused past this
# before pydantic compares or echoes it.
MAX_OPTION_CHARS = 32
# Far beyond any useful CFG scale (SD's usual range is 1-15): larger values only saturate images.
MAX_GUIDANCE = 30.0
MIN_NASA_ALPHA, MAX_NASA_ALPHA = 0.0, 1.0
# Latent side = image side / 8 for every VAE flashstep loads.
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class ModelLimits:
    """What one loaded model accepts.

    guided: the family reads classifier-free guidance (teacher, hypersd, instaflow).
    count_tokens: the model's tokenizer's length of a text, without special tokens.
    base_guidance: the CFG scale of a hybrid's base step when the request gives none.
    base_missing: why a hybrid is impossible (no base model found), or None when it is possible.
    """

    name: str
    family: str
    config: FlashstepConfig
    guided: bool
    max_prompt_tokens: int
    count_tokens: Callable[[str], int]
    base_guidance: float
    base_missing: str | None
    has_tiny_decoder: bool


def validate_request(request: GenerationRequest, model: ModelLimits) -> GenerationRequest:
    """A copy of `request` with the model's defaults filled in, or InvalidRequestError naming the field.

    Idempotent: a validated request validates to itself.
    """
    r, cfg = request, model.config
    _check_text("prompt", r.prompt, model, required=True)
    if r.negative_prompt is not None:
        _check_text("negative_prompt", r.negative_prompt, model, required=False)
    if isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed <= MAX_SEED:
        raise InvalidRequestError("seed", f"`seed` must be an integer between 0 and {MAX_SEED} but is {r.seed!r}")

    steps = cfg.default_steps if r.num_inference_steps is None else r.num_inference_steps
    if steps not in cfg.allowed_steps:
        raise InvalidRequestError(
            "num_inference_steps",
            f"`num_inference_steps` must be one of {list(cfg.allowed_steps)} for {model.name} but is {steps!r}",
        )
    if r.hybrid:
        if model.base_missing is not None:
            raise InvalidRequestError("hybrid", f"`hybrid` needs a base model but {model.base_missing}")
        if steps < 2:
            raise InvalidRequestError(
                "hybrid", f"`hybrid` needs at least 2 steps (the base takes the first) but `num_inference_steps` is {steps}"
            )

    guidance = _check_guidance(r, model)
    alpha = cfg.nasa_alpha if r.nasa_alpha is None else r.nasa_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not MIN_NASA_ALPHA <= alpha <= MAX_NASA_ALPHA:
        raise InvalidRequestError(
            "nasa_alpha", f"`nasa_alpha` must be in [{MIN_NASA_ALPHA:g}, {MAX_NASA_ALPHA:g}] but is {alpha!r}"
        )
    if r.negative_prompt:
        _check_negative_prompt_is_used(guidance, alpha, model, hybrid=r.hybrid)

    sizes = {}
    for field in ("height", "width"):
        value = getattr(r, field)
        value = cfg.resolution if value is None else value
        if (
            isinstance(value, bool) or not isinstance(value, int) or value % SIZE_MULTIPLE != 0
            or value not in cfg.resolutions
        ):  # fmt: skip
            raise InvalidRequestError(
                field,
                f"`{field}` must be one of {list(cfg.resolutions)} (multiples of {SIZE_MULTIPLE}) for {model.name} "
                f"but is {value!r}",
            )
        sizes[field] = value
    if r.tiny_decoder and not model.has_tiny_decoder:
        raise InvalidRequestError("tiny_decoder", f"`tiny_decoder` is unavailable: {model.name} has no vae_tiny/ folder")
    return replace(r, num_inference_steps=steps, guidance_scale=float(guidance), nasa_alpha=float(alpha), **sizes)


def _check_text(field: str, text: object, model: ModelLimits, *, required: bool) -> None:
    if not isinstance(text, str) or (required and not text.strip()):
        kind = "a non-empty string" if required else "a string"
        raise InvalidRequestError(field, f"`{field}` must be {kind} but is {text!r}")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(
            field, f"`{field}` must be at most {MAX_PROMPT_CHARS} characters but is {len(text)} long"
        )
    n = model.count_tokens(text)
    if n > model.max_prompt_tokens:
        raise InvalidRequestError(
            field, f"`{field}` is {n} tokens long but {model.name} takes at most {model.max_prompt_tokens}"
        )


def _check_guidance(r: GenerationRequest, model: ModelLimits) -> float:
    """Guidance given or defaulted. In a hybrid run it is the base model's CFG scale for its step."""
    g = r.guidance_scale
    if g is not None and (
        isinstance(g, bool) or not isinstance(g, int | float) or not math.isfinite(g) or not 0.0 <= g <= MAX_GUIDANCE
    ):
        raise InvalidRequestError("guidance_scale", f"`guidance_scale` must be in [0, {MAX_GUIDANCE:g}] but is {g!r}")
    if r.hybrid:
        return model.base_guidance if g is None else g
    if model.guided:
        return model.config.default_guidance_scale if g is None else g
    if g not in (None, 0, 0.0):
        raise InvalidRequestError(
            "guidance_scale",
            f"`guidance_scale` must be 0 or left out for family {model.family} (it takes no guidance) but is {g!r}",
        )
    return 0.0


def _check_negative_prompt_is_used(guidance: float, alpha: float, model: ModelLimits, *, hybrid: bool) -> None:
    """Refuse a negative prompt that neither NASA (alpha > 0) nor CFG (guidance > 1) would read.

    Silently dropping it would return an image the caller believes was steered away from it.
    CFG applies to guided families and to a hybrid's base step (a teacher with CFG).
    """
    if alpha > 0.0:
        return
    takes_cfg = model.guided or hybrid
    if takes_cfg and guidance > 1.0:
        return
    where = f"`negative_prompt` has no effect on {model.name} (family {model.family}) with `nasa_alpha` 0"
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


def batch_key(request: GenerationRequest) -> tuple:
    """What must be equal for validated requests to share one forward pass: steps, size, CFG on,
    hybrid, NASA on, decoder. Prompts, seeds and guidance values may differ within a batch.
    """
    cfg_on = request.guidance_scale > 1.0
    nasa_on = bool(request.negative_prompt) and request.nasa_alpha > 0.0
    return (request.num_inference_steps, request.height, request.width, cfg_on, request.hybrid, nasa_on, request.tiny_decoder)
