"""One exception hierarchy for everything a client can be told, and one function that renders it.

Bodies follow OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body. Messages must never contain secrets."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(APIError):
    status, type, code = 404, "not_found_error", "model_not_found"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimited(APIError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    status, type, code = 503, "service_unavailable", "service_unavailable"


class UpstreamError(APIError):
    """The engine or hosted model failed after accepting the request."""

    status, type, code = 502, "server_error", "upstream_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_error(status: int, message: str, *, param: str | None = None) -> APIError:
    """The APIError class that matches an HTTP status (used for engine error replies)."""
    cls: type[APIError] = {
        400: BadRequest,
        401: Unauthorized,
        404: NotFound,
        413: PayloadTooLarge,
        429: RateLimited,
        503: ServiceUnavailable,
    }.get(status, BadRequest if 400 <= status < 500 else UpstreamError)
    err = cls(message, param=param)
    err.status = status
    return err
