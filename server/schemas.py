"""Request and response bodies of every route, as pydantic models (the OpenAPI schema at /docs).

Ranges of the HTTP API itself (n, output_compression, size syntax) are checked here. Ranges of a
generation request's values (seed, prompt length, guidance, steps, size, nasa_alpha) belong to
models/validation.py: the bounds below that repeat them are imported from there, and the checks
that depend on the model (steps, size, tokens, negative prompt support) run in the engine's
`validate`, so HTTP and the engine can never disagree.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from flashstep.models.validation import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED

MAX_IMAGES = 10
OutputFormat = Literal["png", "jpeg", "webp"]


def between(lo: int, hi: int) -> AfterValidator:
    """Check lo <= value <= hi with a message that states the whole range."""

    def check(value: int | None) -> int | None:
        if value is not None and not lo <= value <= hi:
            raise PydanticCustomError(
                "flashstep_range", "must be between {lo} and {hi} but is {value}", {"lo": lo, "hi": hi, "value": value}
            )
        return value

    return AfterValidator(check)


_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def _check_size(value: str) -> str:
    if value != "auto" and not _SIZE.match(value):
        raise PydanticCustomError(
            "flashstep_size", "must be 'auto' or WIDTHxHEIGHT such as '64x64' but is {value!r}", {"value": value}
        )
    return value


def parse_size(size: str) -> tuple[int, int] | None:
    """(width, height) of a validated size string; None for 'auto'."""
    match = _SIZE.match(size)
    return (int(match.group(1)), int(match.group(2))) if match else None


ImageCount = Annotated[int, between(1, MAX_IMAGES), Field(description=f"Images to generate, 1 to {MAX_IMAGES}.")]
Seed = Annotated[
    int | None,
    between(0, MAX_SEED),
    Field(description="Seed of the first image; image i uses seed + i. Random when omitted."),
]


class GenerationOptions(BaseModel):
    """The sampling options both generation routes share (flashstep's extras on the OpenAI route)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    negative_prompt: str | None = Field(None, description="What to steer away from (CFG or NASA, by family).")
    seed: Seed = None
    steps: int | None = Field(
        None,
        validation_alias=AliasChoices("steps", "num_inference_steps"),
        description="UNet steps; one of the model's allowed steps (GET /v1/models). Default: the model's.",
    )
    guidance_scale: float | None = Field(
        None, description=f"CFG scale, 0 to {MAX_GUIDANCE:g}; families without CFG take only 0. Default: the model's."
    )
    nasa_alpha: float | None = Field(None, description="NASA negative-attention strength for one-step models.")
    hybrid: bool = Field(False, description="Diversity hybrid: the base model takes the first step.")


# ----- OpenAI Images API -----


class ImageGenerationRequest(GenerationOptions):
    """POST /v1/images/generations: the OpenAI Images API body, plus flashstep's options."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    model: str | None = Field(None, description="A loaded model (GET /v1/models). Default: the server's.")
    n: ImageCount = 1
    size: Annotated[str, AfterValidator(_check_size)] = Field(
        "auto", description="WIDTHxHEIGHT, one of the model's sizes; 'auto' is its native size."
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="Base64 in the body, or a url valid for a limited time."
    )
    output_format: OutputFormat = "png"
    output_compression: Annotated[int | None, between(0, 100)] = Field(
        None, description="JPEG/WebP quality loss in percent (0 = best). Ignored for png."
    )
    user: str | None = Field(None, max_length=256, description="End-user id; accepted, not stored.")
    safety_identifier: str | None = Field(None, max_length=256, description="End-user id; accepted, not stored.")
    # Accepted so that stock clients work; they do not change a flashstep image.
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["auto", "low"] | None = None
    background: Literal["auto", "opaque"] | None = None
    stream: Literal[False] | None = None
    partial_images: Literal[0] | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str
    seed: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    model: str


class ModelCard(BaseModel):
    """One loaded model, in OpenAI's model-object shape plus what a client needs to call it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flashstep"
    family: str
    version: str
    default: bool
    sizes: list[str]
    allowed_steps: list[int]
    default_steps: int
    default_guidance_scale: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- native API -----


class GenerateRequest(GenerationOptions):
    """POST /generate: one image comes back as its bytes, several as JSON."""

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: ImageCount = 1
    height: int | None = Field(None, description="Pixels; one of the model's sizes. Default: native.")
    width: int | None = Field(None, description="Pixels; one of the model's sizes. Default: native.")
    output_format: OutputFormat = "png"
    output_compression: Annotated[int | None, between(0, 100)] = None


class Timings(BaseModel):
    queue_wait: float
    encode: float
    denoise: float
    decode: float
    total: float


class GeneratedImage(BaseModel):
    b64_json: str
    seed: int
    batch_size: int
    unet_evals: int
    model_version: str
    timings: Timings = Field(description="Seconds; encode/denoise/decode are per batch.")


class GenerateResponse(BaseModel):
    model: str
    output_format: OutputFormat
    images: list[GeneratedImage]


# ----- admin -----


class AdminModel(BaseModel):
    name: str
    path: str
    family: str
    version: str
    device: str
    dtype: str
    memory_bytes: int
    in_flight: int
    default: bool
    loaded_at: float


class AdminModelList(BaseModel):
    default: str | None
    models: list[AdminModel]


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="A folder name under the models root, or a path inside it.")
    name: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Serve under this name (letters, digits, . _ -). Default: the folder name.",
    )


class SwapModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="The new folder, under the models root.")


class SwapResponse(BaseModel):
    name: str
    old_version: str
    new_version: str


class SetDefaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)


class UnloadResponse(BaseModel):
    name: str
    unloaded: bool = True
    default: str | None
