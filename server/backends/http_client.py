"""The HTTP call the forwarding backends share: one JSON POST, every failure a BackendError.

Connection refused, a timeout, a non-200 answer or a body that is not JSON all fail the
batch the same way, so the worker answers each of its requests with one 503.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from .base import BackendError

__all__ = ["open_session", "post_json"]


def open_session(timeout_s: float, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=timeout_s, connect=5.0),
    )


async def post_json(session: aiohttp.ClientSession | None, url: str, body: dict[str, Any]) -> Any:
    if session is None:
        raise BackendError("the backend's HTTP session is not open (backend not started)")
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                detail = (await resp.text())[:200]
                raise BackendError(f"{url} answered {resp.status}: {detail}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as err:
        raise BackendError(f"{url} unreachable: {str(err) or type(err).__name__}") from err
    except ValueError as err:
        raise BackendError(f"{url} sent invalid JSON: {err}") from err
