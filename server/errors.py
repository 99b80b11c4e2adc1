"""The one error boundary: domain and server exceptions become typed HTTP errors.

Every error body has OpenAI's shape, so compatible clients surface the message:

    {"error": {"message": "`n` must be between 1 and 10 but is 11", "type": "invalid_request_error",
               "param": "n", "code": "invalid_value", "request_id": "5f0c..."}}

Invalid requests answer 400 on both routes (OpenAI's status; FastAPI's default would be 422).
Error bodies stay small whatever the input: at most `MAX_REPORTED_ERRORS` validation errors are
described and every echoed value or field name is cut to `MAX_ECHO_CHARS`.

The request id (the client's X-Request-Id when short and printable, else a new one) is held in
a contextvar for the request's task: every response header, every error body and every log line
written through a handler with `RequestIdFilter` carry it.

`models.errors` classes map to 4xx by class; the server's own conditions (`ServerError`
subclasses) carry their status; anything else is logged with its traceback and answered with a
generic 500 that carries none (`ErrorBoundaryMiddleware`).
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashstep.models.errors import (
    CheckpointError,
    FlashstepError,
    ForbiddenPathError,
    InvalidRequestError,
    ModelNotFoundError,
)
from flashstep.server.metrics import Metrics
from flashstep.server.schemas import ErrorResponse

logger = logging.getLogger("flashstep.server")

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 64
# Bounds of an error body: a body with thousands of bad fields is described by its first few.
MAX_REPORTED_ERRORS = 10
MAX_ECHO_CHARS = 200

_request_id: ContextVar[str | None] = ContextVar("flashstep_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request the calling task (or a thread it started work in) serves, if any."""
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` ("-" outside a request) so a log format can name the request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        return True


class ServerError(Exception):
    """A condition of the server (not of the request's content) with its HTTP status."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None  # OpenAI's `code`: a stable name a client can branch on

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class QueueFullError(ServerError):
    """The batch queue holds `queue_limit` images already (HTTP 429 with Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"


class ImageStoreFullError(ServerError):
    """Other clients' unexpired images fill the store (HTTP 503 with Retry-After)."""

    status_code = 503
    error_type = "service_unavailable"


class ClientShareError(ServerError):
    """One request's images exceed a client's share of the store (HTTP 429)."""

    status_code = 429
    error_type = "rate_limit_error"


class ShuttingDownError(ServerError):
    """The server received SIGTERM and takes no new work (HTTP 503)."""

    status_code = 503
    error_type = "service_unavailable"


class NotReadyError(ServerError):
    """Models are still loading (HTTP 503 with Retry-After)."""

    status_code = 503
    error_type = "service_unavailable"


class RequestTimeoutError(ServerError):
    """The request waited past `request_timeout_s` (HTTP 504)."""

    status_code = 504
    error_type = "timeout_error"


class ModelConflictError(ServerError):
    """An admin action clashes with the current set of models (HTTP 409)."""

    status_code = 409
    error_type = "invalid_request_error"


class AuthenticationError(ServerError):
    """Missing or wrong admin bearer token (HTTP 401)."""

    status_code = 401
    error_type = "authentication_error"


class EngineFailure(ServerError):
    """The engine raised while generating this request, alone (its batch was split); HTTP 500."""

    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class NonFiniteOutputFailure(EngineFailure):
    """The model produced NaN or Inf for this request's image: an error, never a black PNG (HTTP 500)."""

    code = "non_finite_output"


class OutOfMemoryFailure(ServerError):
    """The device ran out of memory even for this request alone (HTTP 503 with Retry-After)."""

    status_code = 503
    error_type = "service_unavailable"
    code = "out_of_memory"


# (class, status, type, param when the exception names none, code). Most specific class first.
DOMAIN_ERRORS: tuple[tuple[type[FlashstepError], int, str, str | None, str | None], ...] = (
    (InvalidRequestError, 400, "invalid_request_error", None, "invalid_value"),
    (ModelNotFoundError, 404, "not_found_error", "model", "model_not_found"),
    (ForbiddenPathError, 403, "permission_error", "path", None),
    (CheckpointError, 400, "invalid_request_error", "path", None),
)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, plus the id of the request being served (None outside a request)."""
    return {
        "error": {
            "message": message,
            "type": error_type,
            "param": param,
            "code": code,
            "request_id": current_request_id(),
        }
    }


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


ERROR_DESCRIPTIONS = {
    400: "Invalid request: the body names the field (`param`) and a `code`.",
    401: "Missing or wrong bearer token.",
    403: "The path is outside the models root.",
    404: "No such model or image.",
    408: "The request body did not arrive within `body_read_timeout_s`.",
    409: "Conflicts with the current set of models.",
    413: "The request body is larger than `max_body_bytes`.",
    429: "The batch queue is full; retry after Retry-After seconds.",
    500: "Internal error; the body names only the request id.",
    503: "Models are loading or the server is shutting down.",
    504: "No image within `request_timeout_s`.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status it can answer with, with the error body's schema."""
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


# ----- pydantic validation errors -> one readable message naming the field -----


def _short(value: Any, limit: int = 80) -> str:
    text = _printable(value) if isinstance(value, str | bytes) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(value: str | bytes) -> str:
    """repr of at most MAX_ECHO_CHARS of `value`: quotes, and escapes for surrogates and controls.

    Cut before repr so that echoing a megabyte-long string costs no more than a short one.
    """
    return repr(value[:MAX_ECHO_CHARS])


def _safe_text(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` and encodable as UTF-8 (a field name may hold a lone surrogate)."""
    text = text[:limit] + ("..." if len(text) > limit else "")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# pydantic error type -> OpenAI error code.
_MISSING_CODES = {"missing": "missing_required_parameter"}
_UNKNOWN_CODES = {"extra_forbidden": "unknown_parameter"}


def error_code(kind: str) -> str:
    """OpenAI's `code` for a pydantic error type: missing, unknown, wrong type, or bad value."""
    if kind in _MISSING_CODES:
        return _MISSING_CODES[kind]
    if kind in _UNKNOWN_CODES:
        return _UNKNOWN_CODES[kind]
    if kind == "json_invalid":
        return "invalid_json"
    if kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "model_attributes_type"):
        return "invalid_type"
    return "invalid_value"


def describe_validation_error(error: dict) -> tuple[str | None, str]:
    """(param, message) for one pydantic error, e.g. ("n", "`n` must be between 1 and 10 but is 11")."""
    loc = list(error.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):  # only the first part says where: a field may be named `path`
        loc = loc[1:]
    loc = [str(part) for part in loc]
    param = _safe_text(".".join(loc)) or None
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "json_invalid":
        return None, f"the request body is not valid JSON: {ctx.get('error', error.get('msg'))}"
    if param is None:
        if kind == "missing":
            return None, "the request needs a JSON body"
        return None, f"the request body is invalid: {error.get('msg')}"
    name = f"`{param}`"
    if kind == "missing":
        return param, f"{name} is required"
    if kind == "extra_forbidden":
        return param, f"{name} is not a parameter of this endpoint"
    if kind == "literal_error":
        return param, f"{name} must be {ctx.get('expected')} but is {_short(value)}"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return param, f"{name} must not be empty"
    if kind == "string_too_long":
        length = f" but has {len(value)}" if isinstance(value, str) else ""
        return param, f"{name} must be at most {ctx.get('max_length')} characters{length}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()), None)
        return param, f"{name} must be {bounds[kind]} {bound} but is {_short(value)}"
    if kind.startswith("flashstep_"):  # flashstep's own validators write the whole sentence after the name
        return param, f"{name} {error.get('msg')}"
    return param, f"{name}: {error.get('msg')} (got {_short(value)})"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    shown = errors[:MAX_REPORTED_ERRORS]
    described = [describe_validation_error(e) for e in shown]
    param = next((p for p, _ in described if p), None)
    message = "; ".join(_safe_text(m, 2 * MAX_ECHO_CHARS) for _, m in described)
    if len(errors) > len(shown):
        message += f"; and {len(errors) - len(shown)} more errors"
    code = error_code(shown[0].get("type", "")) if shown else "invalid_value"
    return error_response(400, message, "invalid_request_error", param, code=code)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = _safe_text(str(exc.detail), 2 * MAX_ECHO_CHARS)
    return error_response(exc.status_code, message, error_type, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
    # The batcher logs engine failures and out-of-memory with their context already.
    if exc.status_code >= 500 and not isinstance(
        exc, EngineFailure | OutOfMemoryFailure | ShuttingDownError | NotReadyError
    ):
        logger.warning("request failed: status=%d type=%s message=%s", exc.status_code, exc.error_type, exc.message)
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.headers, code=exc.code)


async def _domain_error(request: Request, exc: FlashstepError) -> JSONResponse:
    for cls, status, error_type, param, code in DOMAIN_ERRORS:
        if isinstance(exc, cls):
            return error_response(status, str(exc), error_type, getattr(exc, "field", param), code=code)
    # A FlashstepError with no HTTP meaning is a server bug, not the client's fault: a logged, generic 500.
    return _unexpected(request.scope, exc)


def _unexpected(scope: Scope, exc: BaseException) -> JSONResponse:
    request_id = current_request_id() or "-"
    logger.error("unhandled error: request_id=%s path=%s", request_id, scope.get("path"), exc_info=exc)
    return error_response(500, f"internal server error (request id {request_id})", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the boundary's handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(FlashstepError, _domain_error)
    _document_400_not_422(app)


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 on every route with a body; invalid bodies get 400 here instead."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for path in build().get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi


class ErrorBoundaryMiddleware:
    """Outermost app middleware: request ids, request metrics, and the generic 500.

    Pure ASGI (not BaseHTTPMiddleware) so that response bodies stream through untouched.
    An exception that no handler claimed is logged here with its traceback and answered with a
    500 whose body names only the request id.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        token = _request_id.set(request_id)
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                raise
            response = _unexpected(scope, exc)
            await response(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            if method not in KNOWN_METHODS:  # a label per invented method would grow without bound
                method = "other"
            self.metrics.requests.labels(template, method, str(status)).inc()
            logger.debug("request done: method=%s route=%s status=%d", method, template, status)
            _request_id.reset(token)


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _incoming_request_id(scope: Scope) -> str | None:
    """The client's X-Request-Id when it is 1-64 visible ASCII characters (safe in logs and headers)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID_CHARS and all(0x21 <= byte <= 0x7E for byte in value):
                return value.decode("ascii")
            return None
    return None
