"""OpenAI-compatible routes: POST /v1/images/generations, GET /v1/images/{id}, GET /v1/models."""

from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from flashstep.models.contract import EngineProtocol
from flashstep.models.errors import InvalidRequestError
from flashstep.server.dependencies import GenerationDep, ImageStoreDep, ManagerDep, OriginDep
from flashstep.server.errors import error_body, error_responses
from flashstep.server.generation import build_requests, encode_images, timing_headers
from flashstep.server.image_encoding import MEDIA_TYPES, ImageEncoding
from flashstep.server.image_store import is_valid_id
from flashstep.server.schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    Usage,
    UsageInputDetails,
    parse_size,
)

# Every status the generation route can answer with: validation, unknown model, slow or large
# body, full queue, loading or shutting down, engine failure, timeout.
GENERATION_ERRORS = error_responses(400, 404, 408, 413, 429, 500, 503, 504)

router = APIRouter(prefix="/v1", tags=["openai"])


def model_sizes(engine: EngineProtocol) -> list[str]:
    """The sizes a request may ask of `engine`, native first."""
    return [f"{side}x{side}" for side in engine.config.resolutions]


def _check_size(size: str):
    def check(engine: EngineProtocol) -> None:
        allowed = model_sizes(engine)
        if size != "auto" and size not in allowed:
            raise InvalidRequestError(
                "size", f"`size` must be one of {allowed} or 'auto' for model {engine.name!r} but is {size!r}"
            )

    return check


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=GENERATION_ERRORS,
    summary="Create images (OpenAI Images API)",
)
async def create_images(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    service: GenerationDep,
    store: ImageStoreDep,
    origin: OriginDep,
) -> ImagesResponse:
    """Generate `n` images for `prompt`; flashstep's options (seed, steps, ...) go in the same body."""
    dims = parse_size(body.size)
    width, height = dims if dims else (None, None)
    requests = build_requests(body.prompt, body, body.n, height=height, width=width)
    encoding = ImageEncoding(body.output_format, body.output_compression)
    outcomes = await service.generate(
        body.model,
        requests,
        request,
        encoding=encoding,
        check=_check_size(body.size),
        field_names={"height": "size", "width": "size"},
    )
    encoded = await encode_images(outcomes, encoding)
    image_ids: list[str] = []
    if body.response_format == "url":
        # All of the response's images or none (429/503): a url handed out is never already dead.
        image_ids = await run_in_threadpool(
            store.put_many, encoded, MEDIA_TYPES[body.output_format], origin.client_key(request)
        )
    data = []
    for i, (outcome, blob) in enumerate(zip(outcomes, encoded, strict=True)):
        item = ImageData(revised_prompt=body.prompt, seed=outcome.seed)
        if body.response_format == "url":
            item.url = origin.url_for(request, "get_image", image_id=image_ids[i])
        else:
            item.b64_json = base64.b64encode(blob).decode("ascii")
        data.append(item)
    response.headers.update(timing_headers(outcomes))
    side = outcomes[0].image.size
    texts = [body.prompt] if body.negative_prompt is None else [body.prompt, body.negative_prompt]
    input_tokens = body.n * await service.count_tokens(outcomes[0].model, texts)
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=body.output_format,
        size=f"{side[0]}x{side[1]}",
        model=outcomes[0].model,
        safety_identifier=body.safety_identifier or body.user or None,
        usage=Usage(
            input_tokens=input_tokens,
            input_tokens_details=UsageInputDetails(text_tokens=input_tokens),
            total_tokens=input_tokens,
        ),
    )


@router.get(
    "/images/{image_id}",
    name="get_image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, **error_responses(404)},
    summary="Fetch an image made with response_format=url",
)
async def get_image(image_id: str, store: ImageStoreDep) -> Response:
    """The image bytes while the url is valid (see `image_ttl_s`); 404 once expired or evicted."""
    # A malformed id is unknown without a lookup: it can never reach the store's folder as a path.
    stored = await run_in_threadpool(store.get, image_id) if is_valid_id(image_id) else None
    if stored is None:
        return JSONResponse(
            error_body(f"image {image_id!r} does not exist or has expired", "not_found_error", "image_id"),
            status_code=404,
        )
    return Response(stored.data, media_type=stored.media_type, headers={"Cache-Control": "private, max-age=60"})


@router.get("/models", response_model=ModelList, summary="List loaded models (OpenAI format)")
async def list_models(manager: ManagerDep) -> ModelList:
    default = manager.default
    cards = []
    for handle in manager.snapshot():
        engine = handle.engine
        if engine is None:  # closed between snapshot and now
            continue
        config = engine.config
        cards.append(
            ModelCard(
                id=handle.name,
                created=int(handle.loaded_at),
                family=engine.family,
                version=str(engine.version),
                default=handle.name == default,
                sizes=model_sizes(engine),
                allowed_steps=list(config.allowed_steps),
                default_steps=config.default_steps,
                default_guidance_scale=config.default_guidance_scale,
            )
        )
    return ModelList(data=cards)
