"""The one table from exceptions to HTTP status and body.

Every error answer has vLLM's shape ``{"error": {"message", "type", "param", "code"}}``. Routes
raise; nothing returns an error object. Unknown paths keep FastAPI's ``{"detail": "Not Found"}``,
as vLLM does. A bug answers 500 with a generic message; the traceback goes to the log only.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from winnow.errors import (
    ConfigError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidInputError,
    ModelLoadError,
    WinnowError,
)


class ServerError(Exception):
    """An HTTP-level refusal raised by the server itself (auth, model name, size, readiness)."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(ServerError):
    status, error_type = HTTPStatus.NOT_FOUND, "NotFoundError"


class UnauthorizedError(ServerError):
    status, error_type = HTTPStatus.UNAUTHORIZED, "AuthenticationError"


class PayloadTooLargeError(ServerError):
    status, error_type = HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "PayloadTooLargeError"


class TooManyRequestsError(ServerError):
    status, error_type = HTTPStatus.TOO_MANY_REQUESTS, "TooManyRequestsError"


class NotReadyError(ServerError):
    status, error_type = HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"


class NotImplementedRouteError(ServerError):
    status, error_type = HTTPStatus.NOT_IMPLEMENTED, "NotImplementedError"


class ClientDisconnectedError(ServerError):
    """The client went away before its answer was ready (its queued work was dropped). Nobody reads the
    answer; 499 (nginx's "client closed request") keeps it out of the 5xx counts."""

    status, error_type = 499, "ClientClosedRequest"


# exception class -> (status, error type); looked up along the exception's MRO, first match wins.
_TABLE: dict[type[BaseException], tuple[int, str]] = {
    InvalidInputError: (HTTPStatus.BAD_REQUEST, "BadRequestError"),
    ConfigError: (HTTPStatus.BAD_REQUEST, "BadRequestError"),
    EngineOverloadedError: (HTTPStatus.TOO_MANY_REQUESTS, "TooManyRequestsError"),
    # An engine loop thread died: a bug (vLLM answers 500 too); /health turns 503 so the server gets replaced.
    EngineDeadError: (HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError"),
    ModelLoadError: (HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
}


def error_body(message: str, error_type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": int(status)}}


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error type) for any exception: the server's own, then the table, else 500."""
    if isinstance(exc, ServerError):
        return exc.status, exc.error_type
    return next(
        (_TABLE[cls] for cls in type(exc).__mro__ if cls in _TABLE),
        (HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError"),
    )


def error_response(exc: BaseException) -> JSONResponse:
    """Render any exception as the vLLM error shape with its status from the table."""
    status, kind = status_of(exc)
    # A bug: the client gets no stack trace or internals (InternalErrorMiddleware logs the traceback).
    message = "Internal server error." if status == HTTPStatus.INTERNAL_SERVER_ERROR else str(exc)
    return JSONResponse(error_body(message, kind, status, getattr(exc, "param", None)), status_code=status)


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """Schema errors (missing field, wrong type, bad enum): 400 naming the field, as vLLM does."""
    errors = exc.errors()
    parts = [describe(e) for e in errors]
    message = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}: " + "; ".join(parts)
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(p) for p in first) or None
    return JSONResponse(error_body(message, "Bad Request", HTTPStatus.BAD_REQUEST, param), status_code=400)


def describe(error: Mapping[str, Any]) -> str:
    """One schema error as "field.path: what is wrong [type]", with the advice the bare message lacks."""
    loc, kind = tuple(error.get("loc", ())), error.get("type")
    message = error.get("msg")
    if kind == "json_invalid":  # json_body.py's parse error; FastAPI keeps its text in ctx
        return f"body: the body is not valid JSON: {error.get('ctx', {}).get('error')} [{kind}]"
    if loc == ("body",) and isinstance(error.get("input"), bytes):  # FastAPI did not parse it as JSON
        message = f"{message}; send the body as JSON with the header Content-Type: application/json"
    return f"{'.'.join(str(p) for p in loc)}: {message} [{kind}]"


def install_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_response(exc)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(WinnowError, on_error)
    app.add_exception_handler(ServerError, on_error)
    # Anything else is a bug: answered by InternalErrorMiddleware (middleware.py), which, unlike
    # Starlette's last-resort handler, keeps the connection open.
