"""What crosses between the Ray Serve deployments: engine replies, errors as data, model descriptions.

The ingress calls an engine replica through a Serve handle; arguments and replies are pickled.
Errors travel as `RemoteError` values rather than raised exceptions, for two reasons:

- `InvalidRequestError(field, message)` cannot be unpickled (its `args` hold only the message),
  and a raised exception would reach the ingress wrapped in a `RayTaskError` whose text
  carries the remote traceback, which must never end up in an HTTP body;
- a value keeps the error's meaning (class, field, Retry-After) exact, so the ingress answers
  with the same status and body as the one-process server.

`EngineUserConfig` and `IngressUserConfig` are the `user_config` of the engine and ingress
deployments: what an admin action (or `serve deploy`) changes in place, without restarting a
replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flashstep.models.errors import FlashstepError, InvalidRequestError
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.server.errors import ServerError


@dataclass(frozen=True)
class RemoteError:
    """An error raised inside an engine replica (or the admin deployment), carried back as data.

    `error_class` is a `FlashstepError` or `ServerError` subclass (pickled by reference);
    `param` is the request field it names (an InvalidRequestError's `field`); `headers` the HTTP
    headers it asks for (Retry-After).
    """

    error_class: type[Exception]
    message: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: FlashstepError | ServerError) -> RemoteError:
        if isinstance(exc, InvalidRequestError):
            return cls(type(exc), str(exc), exc.field)
        if isinstance(exc, ServerError):
            return cls(type(exc), exc.message, exc.param, dict(exc.headers))
        return cls(type(exc), str(exc))

    def rebuild(self) -> Exception:
        """The exception again, as the error boundary (server/errors.py) maps it to HTTP."""
        if issubclass(self.error_class, InvalidRequestError):
            return self.error_class(self.param or "request", self.message)
        if issubclass(self.error_class, ServerError):
            return self.error_class(self.message, param=self.param, headers=dict(self.headers))
        return self.error_class(self.message)


@dataclass(frozen=True)
class ModelDescription:
    """One engine replica's model as the ingress reports it (/v1/models, /admin/models).

    `path` and `revision` are the `user_config` the replica serves; `swap_error` says why the
    last swap asked of it did not take (it kept serving `version`), else None. `engine_calls`
    counts the replica's `engine.generate` calls, `failed_engine_calls` those that raised (a
    batch then runs again in halves).
    """

    name: str
    path: str
    family: str
    version: str
    device: str
    dtype: str
    memory_bytes: int
    config: FlashstepConfig
    loaded_at: float
    in_flight: int
    served_by: str
    revision: int
    swap_error: RemoteError | None = None
    engine_calls: int = 0
    failed_engine_calls: int = 0


class RemoteEngine:
    """A `ModelDescription` with the attributes routes read from an engine (`handle.engine`).

    The routes describe models through `LoadedModel.engine` (family, version, config, path,
    device, dtype, memory_bytes()); on Ray the engine itself lives in another process, so the
    ingress hands them this read-only stand-in built from what the replica reported.
    """

    def __init__(self, description: ModelDescription):
        self.description = description
        self.name = description.name
        self.path = description.path
        self.family = description.family
        self.version = description.version
        self.device = description.device
        self.dtype = description.dtype
        self.config = description.config

    def memory_bytes(self) -> int:
        return self.description.memory_bytes


def _validated(model: type[BaseModel], value: object, what: str) -> BaseModel:
    """`value` as `model`, or ValueError naming the deployment and the field at fault."""
    try:
        return model.model_validate(value if value is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "user_config"
        raise ValueError(f"`user_config.{where}` of {what}: {first.get('msg')}") from None


class EngineUserConfig(BaseModel):
    """The engine deployment's `user_config`: which folder serves its model.

    `path` is a model name or a folder under the models root; `revision` changes on every
    swap, so swapping to the same folder again reloads it (a config Serve sees as unchanged
    would not reach the replicas).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    revision: int = Field(0, ge=0)

    @classmethod
    def parse(cls, value: object) -> EngineUserConfig:
        return _validated(cls, value, "the engine deployment")  # type: ignore[return-value]


class IngressUserConfig(BaseModel):
    """The ingress deployment's `user_config`: the model that answers requests naming none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_model: str | None = None

    @classmethod
    def parse(cls, value: object) -> IngressUserConfig:
        return _validated(cls, value, "the ingress deployment")  # type: ignore[return-value]
