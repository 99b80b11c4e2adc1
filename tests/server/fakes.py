"""A stand-in engine implementing `models.contract.EngineProtocol`, for fast unit tests of server logic.

Images are solid colours derived from the seed, so a test can tell which request got which
image; `fail_on` makes batches fail, and `gate` holds them inside `generate` until the test
releases it (`entered` tells the test a batch got there).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import replace
from pathlib import Path

from PIL import Image

from flashstep.models.contract import EngineProtocol
from flashstep.models.errors import InvalidRequestError
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest, GenerationResult, StageTimings


def seed_colour(seed: int) -> tuple[int, int, int]:
    return (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)


GATE_TIMEOUT_S = 30  # a test that forgets to open a gate fails instead of hanging


class FakeEngine:
    """Deterministic, instant (unless held at `gate`) engine."""

    def __init__(
        self,
        name: str = "fake",
        *,
        version: str = "v1",
        family: str = "teacher",
        allowed_steps: tuple[int, ...] = (1, 2, 4),
        fail_on: str | None = None,
    ):
        self.name = name
        self.path: Path = Path("/models") / name
        self.version = version
        self.family = family
        self.device = "cpu"
        self.dtype = "torch.float32"
        self.max_prompt_tokens = 16
        self.config = FlashstepConfig(
            family=family, default_steps=allowed_steps[0], allowed_steps=allowed_steps, resolution=64
        )
        self.fail_on = fail_on
        self.gate: threading.Event | None = None  # when not None, generate waits until it is set
        self.entered = threading.Event()  # set once a batch is inside generate
        self.batches: list[int] = []
        self.closed = False
        self.warmed = False

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        steps = request.num_inference_steps or self.config.default_steps
        if steps not in self.config.allowed_steps:
            raise InvalidRequestError(
                "num_inference_steps",
                f"`num_inference_steps` must be one of {list(self.config.allowed_steps)} for {self.name} but is {steps}",
            )
        if len(request.prompt.split()) > self.max_prompt_tokens:
            raise InvalidRequestError("prompt", f"`prompt` must be at most {self.max_prompt_tokens} tokens")
        if request.negative_prompt is not None and self.family == "swiftbrush":
            raise InvalidRequestError("negative_prompt", "`negative_prompt` needs nasa_alpha for swiftbrush")
        return replace(request, num_inference_steps=steps, height=request.height or 64, width=request.width or 64)

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return (self.family, request.num_inference_steps, request.height, request.width)

    def generate(self, requests: list[GenerationRequest]) -> GenerationResult:
        if self.closed:
            raise RuntimeError("generate on a closed engine")
        self.entered.set()
        if self.gate is not None and not self.gate.wait(timeout=GATE_TIMEOUT_S):
            raise RuntimeError("the test never opened the gate")
        if self.fail_on is not None and any(r.prompt == self.fail_on for r in requests):
            raise RuntimeError("simulated engine failure")
        self.batches.append(len(requests))
        images = [Image.new("RGB", (r.width or 64, r.height or 64), seed_colour(r.seed)) for r in requests]
        return GenerationResult(
            images=images,
            timings=StageTimings(encode=0.001, denoise=0.002, decode=0.001),
            unet_evals=requests[0].num_inference_steps,
            batch_size=len(requests),
            model_version=self.version,
        )

    def warmup(self) -> None:
        self.warmed = True

    def memory_bytes(self) -> int:
        return 1234

    def count_tokens(self, text: str) -> int:
        return len(text.split())  # the fake's token is a word, as in `validate`

    def close(self) -> None:
        self.closed = True


class FakeLoader:
    """An `engine_loader` for `create_app`/`ModelManager`: folder name -> FakeEngine; records loads."""

    def __init__(self, **engine_kwargs):
        self.engine_kwargs = engine_kwargs
        self.per_name: dict[str, dict] = {}
        self.loaded: list[FakeEngine] = []
        self.release: threading.Event | None = None  # when set, loading waits for it

    def __call__(self, name_or_path, *, name, models_root=None, **kwargs) -> EngineProtocol:
        if self.release is not None:
            if not self.release.wait(timeout=GATE_TIMEOUT_S):
                raise RuntimeError("the test never released the loader")
        folder = Path(name_or_path).name
        kw = {**self.engine_kwargs, **self.per_name.get(folder, {})}
        kw.setdefault("version", folder)
        engine = FakeEngine(name, **kw)
        self.loaded.append(engine)
        return engine
