"""The access log's buffer: entries off the request path, written in bulk, none lost at shutdown."""

import asyncio
import io
import json

import pytest
from infer_plan.server.http.access_log import AccessLog

pytestmark = pytest.mark.looptime


async def test_entries_are_written_in_bulk_and_flushed_when_the_task_stops():
    stream = io.StringIO()
    log = AccessLog(stream, flush_every_s=0.1)
    task = asyncio.create_task(log.run())
    log.add(("POST", "/v1/inference", 200, 151.2, "paid", "127.0.0.1", 88))
    assert stream.getvalue() == ""  # nothing written on the request path
    await asyncio.sleep(0.15)
    first = stream.getvalue().splitlines()
    assert [json.loads(line) for line in first] == [
        {
            "method": "POST",
            "path": "/v1/inference",
            "status": 200,
            "ms": 151.2,
            "tier": "paid",
            "remote": "127.0.0.1",
            "bytes": 88,
        }
    ]
    log.add(("GET", '/odd"path\n', 404, 0.2, None, None, 40))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    last = json.loads(stream.getvalue().splitlines()[-1])
    assert last["path"] == '/odd"path\n' and last["tier"] is None  # written at shutdown, escaped


def test_a_stuck_stream_costs_entries_not_memory_and_says_so():
    stream = io.StringIO()
    log = AccessLog(stream, max_pending=2)
    for i in range(5):
        log.add(("GET", f"/{i}", 200, 1.0, None, None, 0))
    log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("path") for line in lines[:2]] == ["/0", "/1"]
    assert lines[-1] == {"dropped_access_log_entries": 3}
