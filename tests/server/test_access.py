"""Access: what a client key can reach, how keys are compared, what the logs hold."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import aiohttp
import pytest
from infer_plan.core.errors import UsageError
from infer_plan.server.access.keys import KeyStore
from infer_plan.server.config import ServerConfig

from tests.helpers import running_server

pytestmark = pytest.mark.timeout(120)

SECRET_KEY = "k-ent-" + "s3cr3t" * 8
WRONG_KEY = SECRET_KEY[:-1] + "X"  # one character off: must not show up either
SECRET_INPUT = "my-private-prompt-4f1c9e"


async def test_logs_hold_no_key_and_no_input(tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys]\n"{SECRET_KEY}" = "enterprise"\n')
    with running_server("--keys", str(keys), access_log=True) as srv:
        async with aiohttp.ClientSession() as session:
            for key, body in [
                (SECRET_KEY, {"model": "sim", "input": SECRET_INPUT}),  # 200
                (WRONG_KEY, {"model": "sim", "input": SECRET_INPUT}),  # 401
                (SECRET_KEY, {"model": SECRET_INPUT, "input": SECRET_INPUT}),  # 404 names the model, not the input
                (SECRET_KEY, {"model": "sim", "input": SECRET_INPUT * 1000}),  # 413
            ]:
                async with session.post(
                    f"{srv.url}/v1/inference", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as resp:
                    await resp.read()
            async with session.post(
                f"{srv.internal_url}/internal/batch",
                json={"batch_id": "b", "requests": [{"input": SECRET_INPUT}]},
                headers={"Authorization": f"Bearer {SECRET_KEY}"},
            ) as resp:
                assert resp.status == 403
        assert srv.terminate() == 0
        log = srv.log_text()
    statuses = [line for line in log.splitlines() if '"path":"/v1/inference"' in line]
    assert len(statuses) == 4  # the access log is on and saw every request
    for secret in (SECRET_KEY, WRONG_KEY, "s3cr3t", SECRET_INPUT):
        assert secret not in log


def test_key_lookup_time_does_not_depend_on_how_much_of_a_key_was_guessed():
    real = "k-" + "a" * 62
    store = KeyStore({real: "paid", "k-other": "free"})
    near = real[:-1] + "b"  # 63 of 64 characters right
    far = "z" * 64
    samples: dict[str, list[float]] = {"near": [], "far": []}
    for _ in range(30):
        for name, key in (("near", near), ("far", far)):
            t0 = time.perf_counter_ns()
            for _ in range(2000):
                store.tier_of(key)
            samples[name].append(time.perf_counter_ns() - t0)
    ratio = statistics.median(samples["near"]) / statistics.median(samples["far"])
    assert 0.8 < ratio < 1.25, ratio
    assert store.tier_of(real) is not None and store.tier_of(near) is None
    assert real not in repr(vars(store)["_by_digest"])  # looked up by digest, not by the key itself


def test_internal_listener_refuses_non_loopback_unless_configured():
    with pytest.raises(UsageError, match="loopback"):
        ServerConfig(internal_host="0.0.0.0")
    assert ServerConfig(internal_host="0.0.0.0", allow_remote_internal=True).internal_host == "0.0.0.0"
    assert ServerConfig(internal_host="::1").internal_host == "::1"
    cli = subprocess.run(
        [sys.executable, "-m", "infer_plan.cli", "serve", "--port", "0", "--internal-host", "10.1.2.3"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 2
    assert "loopback" in cli.stderr and "Traceback" not in cli.stderr
