"""What a service's domain code raises, and how each error reaches a client: one JSON error body over
REST, a dead-lettered task (with the reason) over the bus.

::

    ServiceError              status, code (the gateway's error codes), message
    ├── BadRequest            400 bad_request   the input is malformed or does not make sense
    ├── Unauthorized          401 unauthorized  no identity, or credentials that do not match
    ├── Forbidden             403 forbidden     known caller, not allowed (not the host, not an admin)
    ├── NotFound              404 not_found     no such user, meeting or participant
    ├── Conflict              409 conflict      the state forbids it (taken username, ended meeting)
    └── Unavailable           503 unavailable   the database (or another backend) cannot be reached

Over REST every error answers ``{"error": {"code", "message"}}`` (400s from request validation add
``details``), as the gateway's own errors do. In a task handler (`services.common.tasks`) a 4xx
becomes ``Reject(reason)``: no retry, dead-lettered; `Unavailable` is retried.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Root of the errors a service answers to its callers."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return body(self.code, self.message)


class BadRequest(ServiceError):
    """The input is malformed or makes no sense here (kicking the host, an empty update)."""


class Unauthorized(ServiceError):
    """No identity, or credentials that do not match (never says which part was wrong)."""

    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    """The caller is known but not allowed: not the host, not a participant, not an admin."""

    status, code = 403, "forbidden"


class NotFound(ServiceError):
    """No such user, meeting or participant."""

    status, code = 404, "not_found"


class Conflict(ServiceError):
    """The current state forbids the request: a taken username, a meeting that has ended."""

    status, code = 409, "conflict"


class Unavailable(ServiceError):
    """A backend (the database, Redis, the event broker) cannot be reached; try again later."""

    status, code = 503, "unavailable"


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "bad_request", 409: "conflict", 413: "too_large", 415: "bad_request",
               422: "bad_request", 429: "rate_limited"}


def body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` with the JSON error body (and 400, not 422, for bad input)."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors[:20]]
        return JSONResponse(body("bad_request", f"{where}: {first.get('msg', 'invalid')}", details=details),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "unavailable")
        return JSONResponse(body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(body("internal", "the service failed to handle this request"), status_code=500)
