"""A backend another package ships, found through the ``infer_plan.backends`` entry point, with no change to cli/.

The toy package is written into a folder with its own ``.dist-info`` (what pip writes
when it installs a package), so the entry point is real: ``importlib.metadata`` finds it
on ``PYTHONPATH`` in the server's and the CLI's own processes.
"""

from __future__ import annotations

import json
import textwrap

import aiohttp
import pytest

from tests.helpers import run_cli, running_server
from tests.server.test_server import post

pytestmark = pytest.mark.timeout(240)

TOY = textwrap.dedent(
    '''
    """A toy engine: greets every prompt; a batch takes batch_ms plus 0.5 ms per request."""
    import asyncio

    from pydantic import Field

    from infer_plan.server.backends.base import Backend, BackendOptions, Generated


    class ToyOptions(BackendOptions):
        greeting: str = Field(default="hello", description="what every answer starts with")
        batch_ms: float = Field(default=5.0, ge=0, description="the fixed time of one batch")


    class ToyBackend(Backend):
        """Greets every prompt."""

        Options = ToyOptions

        async def run_batch(self, requests, gpu):
            await asyncio.sleep((self.options.batch_ms + 0.5 * len(requests)) / 1000)
            return [Generated(f"{self.options.greeting} {r.prompt}", 1, 1, "stop") for r in requests]
    '''
)


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "toy_engine.py").write_text(TOY)
    info = root / "toy_engine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[infer_plan.backends]\ntoy = toy_engine:ToyBackend\n")
    return {"PYTHONPATH": str(root)}


def test_the_toy_backend_is_listed_with_its_options(toy_path):
    help_text = run_cli("serve", "--help", env=toy_path | {"COLUMNS": "200"}).stdout
    assert "toy" in help_text and "sim" in help_text
    listed = run_cli("backends", "--json", env=toy_path)
    assert listed.returncode == 0, listed.stderr
    toy = json.loads(listed.stdout)["toy"]
    assert {"option": "greeting", "type": "str", "default": "'hello'", "help": "what every answer starts with"} in toy


async def test_the_toy_backend_is_served(toy_path):
    with running_server("--backend", "toy", "-o", "greeting=hi", "--max-wait-ms", "0", env=toy_path) as srv:
        async with aiohttp.ClientSession() as session:
            status, body, _ = await post(session, f"{srv.url}/v1/inference", {"model": "toy", "input": "there"})
        assert status == 200 and body["output"] == "hi there", body
        assert srv.terminate() == 0


def test_the_toy_backend_is_calibrated_and_a_bad_option_is_one_line(toy_path, tmp_path):
    out, saved = tmp_path / "toy.toml", tmp_path / "toy.json"
    done = run_cli(
        "calibrate", "--backend", "toy", "-o", "batch_ms=20", "--sizes", "1,8,32", "-n", "4",
        "--out", str(out), "--save", str(saved), "--quiet", env=toy_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    fit = json.loads(saved.read_text())
    # Asleep 20 ms + 0.5 ms per request, plus the event loop's wake-up: the fit sees the engine it was given.
    assert 18 <= fit["fixed_ms"] <= 40 and 0.3 <= fit["per_item_ms"] <= 1.0, fit
    bad = run_cli("calibrate", "--backend", "toy", "-o", "batch_ms=-1", "--out", str(out), env=toy_path)
    assert bad.returncode == 2 and "batch_ms" in bad.stderr and "Traceback" not in bad.stderr
    odd = run_cli("serve", "--backend", "toy", "-o", "greeting", env=toy_path)
    assert odd.returncode == 2 and "KEY=VALUE" in odd.stderr
