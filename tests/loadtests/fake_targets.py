"""Targets that answer something other than the OpenAI API, or stream it oddly, for the load test's handling.

Each runs an aiohttp app on 127.0.0.1 in a thread of the test process, stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from aiohttp import web

_MODE = web.AppKey("mode", str)
_CHUNK = b'data: {"choices": [{"index": 0, "text": " w1"}]}\n\n'


async def _answer(request: web.Request) -> web.StreamResponse:
    mode = request.app[_MODE]
    if mode == "html":
        return web.Response(text="<html><body>maintenance</body></html>", content_type="text/html")
    if mode == "json":
        return web.json_response({"choices": [{"index": 0, "text": " w1"}]})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if mode == "garbage-sse":
        await resp.write(b"<html>not a stream</html>\n")
    elif mode in ("paced", "burst"):  # eight tokens 10 ms apart, or all eight in one write after 80 ms
        for _ in range(8):
            await asyncio.sleep(0.01)
            if mode == "paced":
                await resp.write(_CHUNK)
        if mode == "burst":
            await resp.write(_CHUNK * 8)
        await resp.write(b"data: [DONE]\n\n")
    else:  # error-mid-stream: a token, then an error event and [DONE]
        await resp.write(_CHUNK)
        await resp.write(b'data: {"error": {"message": "engine died", "code": "backend_failed"}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


@contextlib.contextmanager
def fake_target(mode: str) -> Iterator[str]:
    """Base URL of a server whose ``/v1/completions`` answers in the given wrong way."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app[_MODE] = mode
    app.router.add_post("/v1/completions", _answer)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.run_until_complete(runner.cleanup())
        loop.close()
