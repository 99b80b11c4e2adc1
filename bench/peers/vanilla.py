"""The vanilla diffusers call every peer makes: load `StableDiffusionPipeline`, run prompts, PNG bytes.

A flashstep folder is a diffusers folder, so `StableDiffusionPipeline.from_pretrained(folder)` loads
it unchanged. `guidance_scale` <= 1 turns CFG off in diffusers as in flashstep, and the folder's
DPM-Solver++ scheduler at one step is the one-step x0 prediction from t = 999, so a one-step request
costs one UNet evaluation here too. Seeds go in as one CPU generator per image, as flashstep does.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

ALLOWED_KEYS = {"prompt", "seed", "steps", "guidance_scale", "height", "width", "output_format", "model"}


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (each server gets the same number; the load generator needs a core)."""
    import torch

    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def load_pipeline(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The folder as a vanilla `StableDiffusionPipeline` on `device` in `dtype`, progress bars off."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=getattr(torch, dtype), safety_checker=None, requires_safety_checker=False
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class Job:
    """One image, as flashstep's POST /generate body asks for it."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        return (self.steps, self.guidance_scale, self.height, self.width)


def parse_body(body: dict) -> Job:
    """A `Job` from the JSON body, or ValueError naming the field (the peers answer 422 with it)."""
    unknown = sorted(set(body) - ALLOWED_KEYS)
    if unknown:
        raise ValueError(f"unknown fields {unknown}; allowed are {sorted(ALLOWED_KEYS)}")
    if body.get("output_format", "png") != "png":
        raise ValueError(f"`output_format` must be 'png' but is {body['output_format']!r}")
    try:
        return Job(
            prompt=str(body["prompt"]),
            seed=int(body["seed"]),
            steps=int(body["steps"]),
            guidance_scale=float(body["guidance_scale"]),
            height=int(body["height"]),
            width=int(body["width"]),
        )
    except KeyError as exc:
        raise ValueError(f"`{exc.args[0]}` is required") from None


def run_pipeline(pipe, jobs: list[Job]) -> list:
    """PIL images for `jobs` (which share a key) from one pipeline call."""
    import torch

    keys = {job.key for job in jobs}
    if len(keys) != 1:
        raise ValueError(f"jobs in one pipeline call must share steps, guidance and size but have {sorted(keys)}")
    first = jobs[0]
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    out = pipe(
        prompt=[job.prompt for job in jobs],
        num_inference_steps=first.steps,
        guidance_scale=first.guidance_scale,
        height=first.height,
        width=first.width,
        generator=generators,
    )
    return out.images


def to_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
