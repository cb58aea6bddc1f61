"""The baseline: a bare aiohttp JSON handler with no batching, for bench_server.py."""

import sys

from aiohttp import web


async def handle(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"request_id": "1", "output": body["input"], "latency_ms": 0.0})


app = web.Application()
app.add_routes([web.post("/v1/inference", handle)])
try:
    import uvloop

    uvloop.install()
except ImportError:
    pass
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
