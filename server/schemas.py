"""Request and response bodies of every route, as pydantic models (the OpenAPI schema at /docs).

Ranges of the HTTP API itself (n, output_compression, size syntax) are checked here. Ranges of a
generation request's values (seed, prompt length, guidance, steps, size, nasa_alpha) belong to
models/validation.py: the bounds below that repeat them are imported from there, and the checks
that depend on the model (steps, size, tokens, negative prompt support) run in the engine's
`validate`, so HTTP and the engine can never disagree.

Every string field has a character cap checked before anything else reads it (no tokenizer,
regex or enum comparison sees an oversized string), and text that is not valid Unicode (lone
surrogates such as "\ud800", which JSON can escape but UTF-8 cannot encode) is refused naming its
field. A body with more keys than any request model has fields is refused in one step, before
pydantic builds an error per unknown key.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from flashstep.models.validation import (
    MAX_GUIDANCE,
    MAX_MODEL_NAME_CHARS,
    MAX_OPTION_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIZE_CHARS,
    MAX_USER_CHARS,
)

MAX_IMAGES = 10
# The request models have about 30 fields; a body with more keys is refused as a whole, so a
# body of many unknown keys costs one error instead of one per key.
MAX_BODY_FIELDS = 64


def capped_text(limit: int) -> BeforeValidator:
    """A string of at most `limit` characters that UTF-8 can encode; checked before any other validation."""

    def check(value: object) -> object:
        if isinstance(value, str):
            if len(value) > limit:
                raise PydanticKnownError("string_too_long", {"max_length": limit})
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PydanticCustomError(
                    "flashstep_unicode",
                    "is not valid Unicode: it holds a lone surrogate at character {position}",
                    {"position": exc.start},
                ) from None
        return value

    return BeforeValidator(check)


def Option(*values: str):  # noqa: N802 - reads as a type in field annotations
    """A literal choice among `values`, with the option length cap applied first."""
    return Annotated[Literal[values], capped_text(MAX_OPTION_CHARS)]


OutputFormat = Literal["png", "jpeg", "webp"]
PromptText = Annotated[str, capped_text(MAX_PROMPT_CHARS)]
ModelName = Annotated[str, capped_text(MAX_MODEL_NAME_CHARS)]
UserId = Annotated[str, capped_text(MAX_USER_CHARS)]


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
            "flashstep_size", "must be 'auto' or WIDTHxHEIGHT such as '64x64' but is {value}", {"value": repr(value)}
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

    @model_validator(mode="before")
    @classmethod
    def _few_enough_keys(cls, data: object) -> object:
        if isinstance(data, dict) and len(data) > MAX_BODY_FIELDS:
            raise PydanticCustomError(
                "flashstep_too_many_fields",
                "the request body has {count} keys but at most {limit} are allowed",
                {"count": len(data), "limit": MAX_BODY_FIELDS},
            )
        return data

    negative_prompt: PromptText | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (CFG or NASA, by family)."
    )
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


def refuse(values: set, why: str) -> AfterValidator:
    """Refuse the listed values of an OpenAI field flashstep cannot honour, saying why."""

    def check(value):
        if value in values:
            raise PydanticCustomError("flashstep_unsupported", "{why} but is {value}", {"why": why, "value": repr(value)})
        return value

    return AfterValidator(check)


class ImageGenerationRequest(GenerationOptions):
    """POST /v1/images/generations: the OpenAI Images API body, plus flashstep's options.

    What becomes of each field the official client (openai-python `images.generate`) can send:

    | field | flashstep |
    |---|---|
    | prompt | honoured; 1 to MAX_PROMPT_CHARS characters, then the model's token limit |
    | model | honoured: a loaded model (GET /v1/models); default the server's |
    | n | honoured, 1 to 10 |
    | size | honoured: 'auto' or one of the model's sizes; other sizes 400 |
    | response_format | honoured: b64_json or url |
    | output_format | honoured: png, jpeg, webp; gif and svg 400 |
    | output_compression | honoured for jpeg/webp: 0-100, 100 least compression (default); ignored for png (lossless) |
    | background | 'auto' and 'opaque' accepted (images are opaque); 'transparent' 400 |
    | quality | every value accepted and ignored: `steps` is flashstep's quality knob |
    | style, moderation, complexity | accepted and ignored (no style model, no moderation, no planner) |
    | user, safety_identifier | accepted (at most MAX_USER_CHARS), echoed as safety_identifier, not stored |
    | stream | false accepted; true 400 (no streaming) |
    | partial_images | 0 accepted (one final image is what a non-streamed call returns); 1-3 400 |
    | frame_count, frame_duration_ms, svg | 400 unknown_parameter: they belong to gif/svg output, which flashstep does not produce |
    """

    prompt: PromptText = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.")
    model: ModelName | None = Field(None, description="A loaded model (GET /v1/models). Default: the server's.")
    n: ImageCount = 1
    size: Annotated[str, capped_text(MAX_SIZE_CHARS), AfterValidator(_check_size)] = Field(
        "auto", description="WIDTHxHEIGHT, one of the model's sizes; 'auto' is its native size."
    )
    response_format: Option("b64_json", "url") = Field(
        "b64_json", description="Base64 in the body, or a url valid for a limited time."
    )
    output_format: Annotated[OutputFormat, capped_text(MAX_OPTION_CHARS)] = "png"
    output_compression: Annotated[int | None, between(0, 100)] = Field(
        None, description="JPEG/WebP compression level in percent, OpenAI's meaning: 100 (default) compresses least."
    )
    user: UserId | None = Field(None, description="End-user id; accepted, not stored.")
    safety_identifier: UserId | None = Field(None, description="End-user id; accepted, not stored.")
    # Accepted so that stock clients work; they do not change a flashstep image.
    quality: Option("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd") | None = None
    style: Option("vivid", "natural") | None = None
    moderation: Option("auto", "low") | None = None
    complexity: Option("low", "medium", "high") | None = None
    background: Annotated[
        Option("auto", "opaque", "transparent") | None,
        refuse({"transparent"}, "must be 'auto' or 'opaque' (flashstep's images have no alpha channel)"),
    ] = None
    stream: Annotated[bool | None, refuse({True}, "must be false: flashstep does not stream images")] = None
    partial_images: Annotated[
        int | None,
        between(0, 3),
        refuse({1, 2, 3}, "must be 0 (partial images need streaming, which flashstep does not do)"),
    ] = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str
    seed: int


class UsageInputDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0


class UsageOutputDetails(BaseModel):
    text_tokens: int = 0
    image_tokens: int = 0


class Usage(BaseModel):
    """OpenAI's usage shape. Input: the prompt's tokens (negative prompt included) per image
    requested; output: 0, since a diffusion model emits no tokens (images are counted by `n`)."""

    input_tokens: int
    input_tokens_details: UsageInputDetails
    output_tokens: int = 0
    output_tokens_details: UsageOutputDetails = Field(default_factory=UsageOutputDetails)
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    model: str
    background: Literal["opaque"] = "opaque"
    safety_identifier: str | None = None
    usage: Usage


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

    prompt: PromptText = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: ModelName | None = None
    n: ImageCount = 1
    height: int | None = Field(None, description="Pixels; one of the model's sizes. Default: native.")
    width: int | None = Field(None, description="Pixels; one of the model's sizes. Default: native.")
    output_format: Annotated[OutputFormat, capped_text(MAX_OPTION_CHARS)] = "png"
    output_compression: Annotated[int | None, between(0, 100)] = Field(
        None, description="JPEG/WebP compression level in percent, as on the OpenAI route: 100 (default) compresses least."
    )


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = Field(None, description="The X-Request-Id of the request, for logs and support.")


class ErrorResponse(BaseModel):
    """Every error body (OpenAI's shape), whatever the route or status."""

    error: ErrorDetail


class UnloadResponse(BaseModel):
    name: str
    unloaded: bool = True
    default: str | None
