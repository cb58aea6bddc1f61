"""The HTTP call the forwarding backends share: one JSON request, every failure a BackendError.

Connection refused, a timeout, a non-200 answer or a body that is not JSON all fail the
batch the same way, so the worker answers each of its requests with one 503.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from pydantic import Field

from ...core.model import ServiceModel
from .base import Backend, BackendError, BackendOptions

__all__ = ["ForwardingBackend", "ForwardingOptions", "post_json", "request_json"]


class ForwardingOptions(BackendOptions):
    upstream: str = Field(description="base URL of the server each batch is sent to")
    connections: int = Field(default=16, ge=1, description="pooled connections to it")


class ForwardingBackend(Backend):
    """A backend that sends each batch over HTTP: one pooled session from start() to close()."""

    Options = ForwardingOptions
    options: ForwardingOptions

    def __init__(self, model: ServiceModel, options: ForwardingOptions) -> None:
        super().__init__(model, options)
        self.base = options.upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.options.connections),
            timeout=aiohttp.ClientTimeout(total=self.model.request_timeout_s, connect=5.0),
            headers=self.headers(),
        )

    def headers(self) -> dict[str, str]:
        """Headers every call carries (an upstream's API key)."""
        return {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def post_json(session: aiohttp.ClientSession | None, url: str, body: dict[str, Any]) -> Any:
    return await request_json(session, "POST", url, body)


async def request_json(
    session: aiohttp.ClientSession | None, method: str, url: str, body: dict[str, Any] | None = None
) -> Any:
    if session is None:
        raise BackendError("the backend's HTTP session is not open (backend not started)")
    try:
        async with session.request(method, url, json=body) as resp:
            if resp.status != 200:
                detail = (await resp.text())[:200]
                raise BackendError(f"{url} answered {resp.status}: {detail}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as err:
        raise BackendError(f"{url} unreachable: {str(err) or type(err).__name__}") from err
    except ValueError as err:
        raise BackendError(f"{url} sent invalid JSON: {err}") from err
