"""Every client error answers with the same JSON body: ``{"error": {"code", "message"}}``.

Codes (shared with the WebSocket's ``error`` frames): bad_request, unauthorized, forbidden,
not_found, rate_limited, too_large, unknown_task, unavailable.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.bus import BusConnectionError, BusError, InvalidMessage, MessageTooLarge, TaskNotFound

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "bad_request",
    409: "conflict",
    413: "too_large",
    415: "bad_request",
    422: "bad_request",
    429: "rate_limited",
}


ErrorCode = Literal[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "rate_limited",
    "too_large",
    "unknown_task",
    "conflict",
    "unavailable",
]


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    details: list[FieldError] | None = None


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorInfo


_DESCRIPTIONS = {
    400: "bad_request (malformed or invalid input; `details` says where) or unknown_task (no such type)",
    401: "unauthorized: no bearer token, or an invalid or expired one",
    403: "forbidden: this needs the admin role",
    404: "not_found: no such task (or not yours), or no such queue",
    409: "conflict: it exists already (a username taken, a meeting already ended)",
    413: "too_large: the task's data is over the size limit",
    429: "rate_limited: too many submissions; see `Retry-After`",
    503: "unavailable: a backend is unreachable; try again shortly",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each answering `ErrorBody`."""
    return {s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses}


class ApiError(Exception):
    """An error answered to the client: HTTP status, a code from the list above, a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def from_bus_error(exc: BusError) -> ApiError:
    """The client-facing form of a bus error."""
    if isinstance(exc, MessageTooLarge):
        return ApiError(413, "too_large", str(exc))
    if isinstance(exc, TaskNotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, InvalidMessage):
        code = "unknown_task" if str(exc).startswith("unknown task type") else "bad_request"
        return ApiError(400, code, str(exc))
    if isinstance(exc, BusConnectionError):
        return ApiError(503, "unavailable", "a backend is unreachable; try again shortly")
    return ApiError(400, "bad_request", str(exc))


def allowed_methods(request: Request) -> str | None:
    """A 405's ``Allow``: every method documented for the route's path (Starlette names only those of
    the route it matched first, so a GET-or-DELETE path answered ``Allow: GET``)."""
    route = request.scope.get("route")
    documented = request.app.openapi().get("paths", {}).get(getattr(route, "path_format", None), {})
    return ", ".join(method.upper() for method in documented) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(BusError)
    async def bus_error(request: Request, exc: BusError) -> JSONResponse:
        err = from_bus_error(exc)
        return JSONResponse(body(err.code, err.message), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        message = f"{where}: {first.get('msg', 'invalid')}"
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors[:20]]
        return JSONResponse(body("bad_request", message, details=details), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "unavailable")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allow := allowed_methods(request)):
            headers = {**(headers or {}), "Allow": allow}
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)
