"""Native generation route: POST /generate, image bytes for one image, JSON for several."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Request, Response

from flashstep.server.dependencies import GenerationDep
from flashstep.server.errors import error_responses
from flashstep.server.generation import build_requests, encode_images, timing_headers
from flashstep.server.image_encoding import MEDIA_TYPES, ImageEncoding
from flashstep.server.schemas import GeneratedImage, GenerateRequest, GenerateResponse, Timings

router = APIRouter(tags=["native"])


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
        **error_responses(400, 404, 408, 413, 429, 500, 503, 504),
    },
    summary="Generate images",
)
async def generate(
    body: GenerateRequest,
    request: Request,
    service: GenerationDep,
):
    """With n = 1 the body is the image itself; with n > 1, JSON with base64 images.

    Headers either way (comma-separated, one value per image): X-Flashstep-Model-Version,
    -Seed, -Batch-Size, -Unet-Evals, -Queue-Wait, -Encode-Time, -Denoise-Time, -Decode-Time
    (seconds), and Server-Timing.
    """
    requests = build_requests(body.prompt, body, body.n, height=body.height, width=body.width)
    encoding = ImageEncoding(body.output_format, body.output_compression)
    outcomes = await service.generate(body.model, requests, request, encoding=encoding)
    encoded = await encode_images(outcomes, encoding)
    headers = timing_headers(outcomes)
    if body.n == 1:
        return Response(encoded[0], media_type=MEDIA_TYPES[body.output_format], headers=headers)
    images = [
        GeneratedImage(
            b64_json=base64.b64encode(blob).decode("ascii"),
            seed=o.seed,
            batch_size=o.batch_size,
            unet_evals=o.unet_evals,
            model_version=o.model_version,
            timings=Timings(
                queue_wait=o.queue_wait_s,
                encode=o.timings.encode,
                denoise=o.timings.denoise,
                decode=o.timings.decode,
                total=o.timings.total,
            ),
        )
        for o, blob in zip(outcomes, encoded, strict=True)
    ]
    payload = GenerateResponse(model=outcomes[0].model, output_format=body.output_format, images=images)
    return Response(payload.model_dump_json(), media_type="application/json", headers=headers)
