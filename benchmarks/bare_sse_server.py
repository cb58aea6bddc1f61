"""The streaming baseline: a bare aiohttp handler writing an OpenAI-style SSE stream, for bench_streaming.py.

No auth, no queue, no batch: it reads the body, then writes ``max_tokens`` completion
chunks and ``[DONE]`` in one write. At zero GPU time every token of a request is ready
at once and ``serve`` writes them in one go too, so this is the fair (and strictest)
baseline; whatever ``serve`` reaches beside it is the price of everything else.
"""

import json
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    events = []
    for i in range(body.get("max_tokens", 16)):
        choice = {"index": 0, "text": f" w{i}", "finish_reason": None}
        events.append(f"data: {json.dumps({'id': 'cmpl-1', 'model': body['model'], 'choices': [choice]})}\n\n")
    await response.write("".join(events).encode() + b"data: [DONE]\n\n")  # one write, as serve does at GPU time 0
    return response


app = web.Application()
app.add_routes([web.post("/v1/completions", handle)])
try:
    import uvloop

    uvloop.install()
except ImportError:
    pass
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
