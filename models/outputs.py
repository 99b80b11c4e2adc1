"""Typed inputs and outputs of the engine: one request per image, one result per batch.

The server builds `GenerationRequest`s from HTTP JSON and groups those with equal `batch_key`s
into one forward pass; the engine returns a `GenerationResult` whose images line up with the
requests it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make. `None` means "the model's default" (from flashstep.json)."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    nasa_alpha: float | None = None
    hybrid: bool = False
    height: int | None = None
    width: int | None = None
    tiny_decoder: bool = False


@dataclass
class StageTimings:
    """Seconds spent per stage of one batch (shared by every image in it)."""

    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.denoise + self.decode


@dataclass
class GenerationResult:
    """Images for a batch of requests, in request order, and what they cost.

    unet_evals: UNet forward passes per image (a CFG step counts two, as papers count NFEs).
    served_by: which worker process or replica ran the batch ("" when it ran in the caller's process).
    """

    images: list[Image.Image]
    timings: StageTimings = field(default_factory=StageTimings)
    unet_evals: int = 0
    batch_size: int = 1
    model_version: str = ""
    served_by: str = ""
