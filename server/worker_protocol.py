"""What the HTTP process and its engine worker processes say to each other over their pipe.

    HTTP process                                   worker process
    LoadCommand(serial, name, source, options) ->  load + warm the engine   -> EngineSpec
    GenerateCommand(serial, requests, encodings) -> generate + encode        -> GenerateReply
    CloseCommand(serial)                        ->  close the engine          -> None
    None                                        ->  exit

Commands travel as `(call id, command)`; every reply is `(call id, "ok", payload)` or
`(call id, "fault", Fault)`, so a load answered from a thread of the worker finds its caller. A fault carries an exception across the
process boundary by class name and attributes, because flashstep's exceptions take keyword
arguments that pickle's default reconstruction would drop (`InvalidRequestError(field, message)`);
only classes of `flashstep.models.errors` and `flashstep.server.errors` are rebuilt as themselves,
anything else arrives as `RemoteEngineError` with the original type named in its message (an
out-of-memory message stays recognisable to the batcher).

The messages hold plain data only (requests, configs, tokenizers, image bytes): both ends are
processes this server started, and no checkpoint data ever crosses as a pickle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest, StageTimings
from flashstep.models.validation import ModelLimits
from flashstep.server.image_encoding import EncodedImage, ImageEncoding

# Modules whose exception classes a fault may name; anything else becomes RemoteEngineError.
REBUILT_ERROR_MODULES = ("flashstep.models.errors", "flashstep.server.errors")


class RemoteEngineError(RuntimeError):
    """An unexpected exception raised in a worker process (its traceback is in the worker's log)."""


@dataclass(frozen=True)
class LoadCommand:
    """Load `source` (a name or folder under the models root) as `name`, warm it, keep it as `serial`."""

    serial: int
    name: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)  # device, dtype, attention_backend
    warmup: bool = True


@dataclass(frozen=True)
class GenerateCommand:
    """One batch for the engine kept as `serial`; image i is encoded as `encodings[i]`."""

    serial: int
    requests: list[GenerationRequest]
    encodings: list[ImageEncoding]


@dataclass(frozen=True)
class CloseCommand:
    serial: int


@dataclass(frozen=True)
class EngineSpec:
    """What the HTTP process needs of a loaded engine to validate, batch and describe requests for it.

    `limits` comes without its token counter (a bound method of the worker's prompt encoder);
    `tokenizers` rebuild one in the HTTP process, so it counts tokens exactly as the engine does.
    """

    name: str
    path: str
    version: str
    family: str
    config: FlashstepConfig
    device: str
    dtype: str
    memory_bytes: int
    limits: ModelLimits
    tokenizers: list[Any]


@dataclass
class GenerateReply:
    """The batch's images, encoded in the worker; `non_finite` lists positions that came out NaN/Inf
    (their images are None and `message` says why)."""

    images: list[EncodedImage | None]
    timings: StageTimings
    unet_evals: int
    batch_size: int
    model_version: str
    served_by: str
    non_finite: list[int] = field(default_factory=list)
    message: str = ""


@dataclass(frozen=True)
class Fault:
    """An exception raised in a worker, as data: its class's module and name, message and attributes."""

    module: str
    type_name: str
    message: str
    attributes: dict[str, Any]

    @classmethod
    def capture(cls, exc: BaseException) -> Fault:
        attributes = {k: v for k, v in vars(exc).items() if _plain(v)}
        return cls(type(exc).__module__, type(exc).__qualname__, str(exc), attributes)

    def rebuild(self) -> Exception:
        """The exception as the HTTP process should raise it."""
        if self.module in REBUILT_ERROR_MODULES:
            exc_type = getattr(importlib.import_module(self.module), self.type_name, None)
            if isinstance(exc_type, type) and issubclass(exc_type, Exception):
                exc = exc_type.__new__(exc_type)
                Exception.__init__(exc, self.message)
                exc.__dict__.update(self.attributes)
                return exc
        return RemoteEngineError(f"{self.type_name}: {self.message}")


def _plain(value: Any) -> bool:
    """Attributes that cross as they are (a field name, indices, headers), not objects of the worker."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False
