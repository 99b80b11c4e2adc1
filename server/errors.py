"""The one error boundary: domain and server exceptions become typed HTTP errors.

Every error body has OpenAI's shape, so compatible clients surface the message:

    {"error": {"message": "`n` must be between 1 and 10 but is 11",
               "type": "invalid_request_error", "param": "n", "code": null}}

`models.errors` classes map to 4xx by class; the server's own conditions (`ServerError`
subclasses) carry their status; anything else is logged with its traceback and answered with a
generic 500 that carries none (`ErrorBoundaryMiddleware`).
"""

from __future__ import annotations

import logging
import uuid
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

logger = logging.getLogger("flashstep.server")

REQUEST_ID_HEADER = "X-Request-ID"


class ServerError(Exception):
    """A condition of the server (not of the request's content) with its HTTP status."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


class QueueFullError(ServerError):
    """The batch queue holds `queue_limit` images already (HTTP 429 with Retry-After)."""

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
    """The engine raised while generating a batch; only that batch's requests fail (HTTP 500)."""

    status_code = 500
    error_type = "server_error"


# (class, status, type, param when the exception names none). Most specific class first.
DOMAIN_ERRORS: tuple[tuple[type[FlashstepError], int, str, str | None], ...] = (
    (InvalidRequestError, 422, "invalid_request_error", None),
    (ModelNotFoundError, 404, "not_found_error", "model"),
    (ForbiddenPathError, 403, "permission_error", "path"),
    (CheckpointError, 400, "invalid_request_error", "path"),
)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int, message: str, error_type: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param), status_code=status, headers=headers)


# ----- pydantic validation errors -> one readable message naming the field -----


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_validation_error(error: dict) -> tuple[str | None, str]:
    """(param, message) for one pydantic error, e.g. ("n", "`n` must be between 1 and 10 but is 11")."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
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
        return param, f"{name} must be at most {ctx.get('max_length')} characters but has {len(value)}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        bound = next(iter(ctx.values()), None)
        return param, f"{name} must be {bounds[kind]} {bound} but is {_short(value)}"
    if kind.startswith("flashstep_"):  # flashstep's own validators write the whole sentence after the name
        return param, f"{name} {error.get('msg')}"
    return param, f"{name}: {error.get('msg')} (got {_short(value)})"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    described = [describe_validation_error(e) for e in exc.errors()]
    param = next((p for p, _ in described if p), None)
    message = "; ".join(m for _, m in described)
    return error_response(422, message, "invalid_request_error", param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, str(exc.detail), error_type, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
    if exc.status_code >= 500 and not isinstance(exc, EngineFailure | ShuttingDownError | NotReadyError):
        logger.warning("request failed: status=%d type=%s message=%s", exc.status_code, exc.error_type, exc.message)
    return error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.headers)


async def _domain_error(request: Request, exc: FlashstepError) -> JSONResponse:
    for cls, status, error_type, param in DOMAIN_ERRORS:
        if isinstance(exc, cls):
            return error_response(status, str(exc), error_type, getattr(exc, "field", param))
    # A FlashstepError with no HTTP meaning is a server bug, not the client's fault: a logged, generic 500.
    return _unexpected(request.scope, exc)


def _unexpected(scope: Scope, exc: BaseException) -> JSONResponse:
    request_id = scope.get("state", {}).get("request_id", "-")
    logger.error("unhandled error: request_id=%s path=%s", request_id, scope.get("path"), exc_info=exc)
    return error_response(500, f"internal server error (request id {request_id})", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the boundary's handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(FlashstepError, _domain_error)


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
            self.metrics.requests.labels(template, scope.get("method", ""), str(status)).inc()


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 64 and text.isprintable():
                return text
    return None
