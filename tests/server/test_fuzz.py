"""Bad input at scale: schemathesis against the kept OpenAPI file, and a raw-HTTP hypothesis fuzz.

The server runs with a zero-time model so thousands of requests finish in minutes; the
input handling under test is the same as with any backend. Pass criteria: zero 5xx,
zero tracebacks in the server's log, the server healthy afterwards, and every error a
JSON body with a code.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infer_plan.core import ServiceModel
from infer_plan.loadtests.target import write_model_scenario

from tests.helpers import REPO, running_server

ZERO_TIME = ServiceModel(pcie_in_ms=0, kernel_ms=0, pcie_out_ms=0, max_wait_ms=0)
SCHEMATHESIS_EXAMPLES = 8000  # per operation; the inference operation takes nearly all of them
RAW_EXAMPLES = 3000


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    scenario = write_model_scenario(ZERO_TIME, tmp_path_factory.mktemp("fuzz") / "model.toml", gpus=2)
    with running_server("--scenario", str(scenario), access_log=True) as srv:
        yield srv


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def access_lines(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def assert_healthy(url: str) -> None:
    host, port = host_port(url)
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request(
        "POST",
        "/v1/inference",
        body=b'{"model":"sim","input":"still ok?"}',
        headers={"Authorization": "Bearer dev-enterprise", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["output"].startswith("sim:")
    conn.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=2000),  # arbitrary bytes, invalid UTF-8 included
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"model": st.sampled_from(["sim", "other", ""]) | json_values, "input": json_values}).map(
        lambda v: json.dumps(v).encode()
    ),
    st.fixed_dictionaries({"model": st.just("sim"), "input": st.text(max_size=300)}).map(
        lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    st.fixed_dictionaries(
        {"model": st.just("sim"), "prompt": st.text(max_size=100), "max_tokens": st.integers(-2, 64)},
        optional={"stream": json_values, "stop": json_values, "messages": json_values, "stream_options": json_values},
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 60_000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep nesting
    st.integers(17_000, 400_000).map(lambda n: b'{"model":"sim","input":"' + b"x" * n + b'"}'),  # huge
    st.binary(min_size=1, max_size=40).map(lambda b: b'{"model":"sim","input":"' + b + b'"}'),  # bad bytes in a string
)
content_types = st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "", "\u00e9/\u00e9"]
)
keys = st.sampled_from(["Bearer dev-paid", "Bearer dev-free", "Bearer nope", "Basic abc", "", "Bearer "])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_raw_requests_and_schemathesis_find_no_5xx_and_no_traceback(fuzz_server, tmp_path):
    host, port = host_port(fuzz_server.url)
    statuses: dict[int, int] = {}

    @settings(max_examples=RAW_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        body=bodies,
        ctype=content_types,
        key=keys,
        method=st.sampled_from(["POST", "POST", "POST", "PUT", "GET"]),
        path=st.sampled_from(["/v1/inference", "/v1/inference", "/v1/completions", "/v1/chat/completions"]),
    )
    def raw_request(body: bytes, ctype: str, key: str, method: str, path: str) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        headers = {"Content-Type": ctype.encode("utf-8").decode("latin-1")} if ctype else {}
        if key:
            headers["Authorization"] = key
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert resp.status < 500, payload[:200]
        if resp.status >= 400:
            error = json.loads(payload)["error"]
            assert error["code"] and error["message"]

    raw_request()

    st_cmd = [
        str(Path(sys.executable).with_name("st")), "run", f"{fuzz_server.url}/openapi.yaml",
        "-H", "Authorization: Bearer dev-paid", "--checks", "all", "-n", str(SCHEMATHESIS_EXAMPLES),
        "--seed", "1", "--no-color", "--generation-database", "none", "--workers", "2",
    ]  # fmt: skip
    started = time.monotonic()
    st_run = subprocess.run(st_cmd, check=False, capture_output=True, text=True, timeout=600, cwd=REPO)
    summary = re.search(r"(\d+) generated, (\d+) passed", st_run.stdout)
    assert st_run.returncode == 0, st_run.stdout[-4000:]
    assert summary and summary.group(1) == summary.group(2)

    assert_healthy(fuzz_server.url)
    log = fuzz_server.log_text()
    assert "Traceback" not in log
    served = access_lines(log)
    five_xx = [line for line in served if line["status"] >= 500]
    print(
        f"\nfuzz: {RAW_EXAMPLES} raw requests (statuses {dict(sorted(statuses.items()))}), "
        f"schemathesis {summary.group(1)} cases in {time.monotonic() - started:.0f} s; "
        f"{len(served)} requests answered by the server, {len(five_xx)} 5xx"
    )
    assert not five_xx
    assert len(served) >= 10_000


@pytest.mark.timeout(120)
def test_slow_and_stalled_clients_do_not_block_others(fuzz_server):
    host, port = host_port(fuzz_server.url)
    stalled = []
    try:
        for i in range(200):
            sock = socket.create_connection((host, port), timeout=5)
            # Headers trickle in and stop; half of them promise a body that never comes.
            sock.sendall(
                b"POST /v1/inference HTTP/1.1\r\nHost: x\r\n"
                + (b"Content-Length: 50\r\n\r\n{" if i % 2 else b"Authoriz")
            )
            stalled.append(sock)
        started = time.monotonic()
        for _ in range(20):
            assert_healthy(fuzz_server.url)
        assert time.monotonic() - started < 5.0
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(0.2)
    assert_healthy(fuzz_server.url)
    assert "Traceback" not in fuzz_server.log_text()
