"""Domain errors of the engine. The server maps each class to one HTTP status (server/errors.py).

Every message names the field or the piece at fault and what would be accepted, e.g.
"`num_inference_steps` must be one of [1, 2, 4, 8] for shapes-hypersd but is 3".
"""

from __future__ import annotations

from typing import Any


class FlashstepError(Exception):
    """Base of every error flashstep raises on purpose."""


class InvalidRequestError(FlashstepError, ValueError):
    """A request option is out of range for the model that would serve it (HTTP 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class CheckpointError(FlashstepError):
    """A checkpoint folder cannot be loaded: a missing piece, pickled weights, a bad config."""


class UnknownFamilyError(CheckpointError):
    """`family` names no generator family flashstep knows."""


class ModelNotFoundError(FlashstepError, LookupError):
    """No model of that name is loaded or shipped (HTTP 404)."""


class ForbiddenPathError(FlashstepError, PermissionError):
    """A checkpoint path lies outside the allowed models root (HTTP 403)."""


class NonFiniteOutputError(FlashstepError):
    """Generation produced NaN or Inf for some images of a batch (HTTP 500 for those requests only).

    indices: positions in the batch whose latents or pixels were not finite.
    result: the whole batch's `GenerationResult`; the images at other positions are good, so a
        caller can serve those without running them again.
    """

    def __init__(self, message: str, *, indices: list[int], result: Any = None):
        super().__init__(message)
        self.indices = list(indices)
        self.result = result
