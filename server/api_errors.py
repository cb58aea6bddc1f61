"""API errors as typed exceptions and the JSON body every error response has.

Handlers raise :class:`ApiError`; the middleware turns it, and aiohttp's own HTTP
errors (oversized bodies, unknown routes), into ``{"error": {"code", "message", "type",
"param"}}`` (our code and message, OpenAI's type and param, so both kinds of client read it).
Anything unexpected becomes a 500 with a generic message; the traceback goes to the
log, never to the client. A client that hangs up before its request has arrived
whole is no error of ours: one log line and a counter, no traceback, no 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import Counter

__all__ = ["CLIENT_GONE", "ApiError", "ErrorMiddleware", "error_response"]

CLIENT_GONE = "client_gone"  # request key: the client disconnected; the access log leaves the request out

log = logging.getLogger("infer_plan.server")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "overloaded",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}


# OpenAI's error "type" by status, which its SDKs and the tools built on them read beside the status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine code, a human message, and the field at fault if one is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param

    def body(self) -> dict[str, Any]:
        """The ``error`` object: our code and message, with OpenAI's ``type`` and ``param`` beside them."""
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"code": self.code, "message": self.message, "type": kind, "param": self.param}

    def to_dict(self) -> dict[str, Any]:
        """What another instance needs to answer with this same error (shared queue replies)."""
        return {"status": self.status, "code": self.code, "message": self.message, "retry_after_s": self.retry_after_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApiError:
        return cls(data["status"], data["message"], code=data["code"], retry_after_s=data["retry_after_s"])


def error_response(err: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    return web.json_response({"error": err.body()}, status=err.status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ErrorMiddleware:
    """Every failure of a handler as the JSON error body (see the module docstring)."""

    __middleware_version__ = 1  # aiohttp's mark of a new-style middleware (what @web.middleware sets)

    def __init__(self, client_disconnects: Counter) -> None:
        self.client_disconnects = client_disconnects

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return error_response(err)
        except ConnectionResetError:  # aiohttp's "Connection lost" while the body was still arriving
            self.client_disconnects.inc()
            request[CLIENT_GONE] = True
            log.info("client disconnected before its request arrived whole: %s %s", request.method, request.path)
            return web.Response(status=499)  # nginx's "client closed request"; nobody is there to read it
        except web.HTTPRequestEntityTooLarge as err:
            return error_response(ApiError(413, f"request body too large: {err.text}"))
        except web.HTTPException as err:
            if err.status < 400:
                raise
            kept = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None  # RFC 9110 for 405
            return error_response(ApiError(err.status, err.reason), kept)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(ApiError(500, "internal error"))
