"""The server's in-memory queue and GPU pool, in this process on a fake event-loop clock (looptime).

Time only advances when every task waits, and it advances exactly, so the dispatch rule
is checked to the microsecond without wall-clock margins: a lone request leaves at its
deadline, a full batch at once, and the queue and pool serving a Poisson load answer
every request at the very instant the simulator's engine does.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from infer_plan.core import Backpressure, ServiceModel, Tier
from infer_plan.server.backends.base import Backend, Generate
from infer_plan.server.backends.sim_gpu import sim_output
from infer_plan.server.metrics import ServerMetrics
from infer_plan.server.queues.memory_queue import MemoryQueue
from infer_plan.server.workers.gpu_pool import GpuPool
from infer_plan.sim import RateSchedule
from infer_plan.sim.engines.engine import simulate_arrivals
from infer_plan.sim.inputs.arrivals import generate_arrivals

pytestmark = [pytest.mark.looptime(resolution=1e-9), pytest.mark.timeout(60)]

NEVER = lambda: False  # noqa: E731  (next_batch is not interrupted)


def texts(batch) -> list[str]:
    return [p.request.prompt for p in batch]


async def test_a_lone_request_leaves_exactly_at_its_deadline():
    queue = MemoryQueue(ServiceModel(max_wait_ms=40), gpus=1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await queue.offer(Generate("a"), Tier.FREE)
    batch = await queue.next_batch(NEVER)
    assert loop.time() - start == pytest.approx(0.040, abs=1e-9)
    assert texts(batch) == ["a"] and queue.queued == 0


async def test_a_later_request_rides_with_the_oldest_and_a_full_batch_leaves_at_once():
    queue = MemoryQueue(ServiceModel(max_wait_ms=40, max_batch=3), gpus=1)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await queue.offer(Generate("first"), Tier.FREE)
    await asyncio.sleep(0.030)
    await queue.offer(Generate("second"), Tier.PAID)
    batch = await queue.next_batch(NEVER)
    assert loop.time() - start == pytest.approx(0.040, abs=1e-9)  # the oldest's deadline, not the second's
    assert texts(batch) == ["second", "first"]  # paid before free
    for text in ("x", "y", "z", "w"):
        await queue.offer(Generate(text), Tier.FREE)
    before = loop.time()
    assert texts(await queue.next_batch(NEVER)) == ["x", "y", "z"]
    assert loop.time() == before and queue.queued == 1  # full: no wait at all


async def test_a_batch_takes_enterprise_then_paid_then_free_fifo_inside_a_tier():
    queue = MemoryQueue(ServiceModel(max_batch=4), gpus=1)
    for text, tier in [("f1", 2), ("f2", 2), ("p1", 1), ("f3", 2), ("e1", 0), ("p2", 1)]:
        await queue.offer(Generate(text), tier)
    assert texts(await queue.next_batch(NEVER)) == ["e1", "p1", "p2", "f1"]
    assert texts(await queue.next_batch(NEVER)) == ["f2", "f3"]


async def test_zones_shed_free_then_paid_then_everyone_before_queueing():
    model = ServiceModel(backpressure=Backpressure(queue_limit=4, yellow=0.5, red=0.75))  # bounds 2, 3, 4
    queue = MemoryQueue(model, gpus=1)
    admitted = [await queue.offer(Generate(f"r{i}"), tier) is not None for i, tier in enumerate([2, 2, 2, 1, 1, 0, 0])]
    assert admitted == [True, True, False, True, False, True, False]
    assert await queue.depths() == [1, 1, 2]


async def test_a_request_whose_client_gave_up_takes_no_batch_slot():
    queue = MemoryQueue(ServiceModel(max_batch=2), gpus=1)
    gone = await queue.offer(Generate("gone"), Tier.FREE)
    await queue.offer(Generate("a"), Tier.FREE)
    gone.cancel()
    await queue.offer(Generate("b"), Tier.FREE)
    assert texts(await queue.next_batch(NEVER)) == ["a", "b"]


async def test_an_internal_batch_interrupts_a_waiting_assembly_and_runs_first():
    model = ServiceModel(max_wait_ms=1000, pcie_in_ms=0, kernel_ms=10, pcie_out_ms=0)
    queue = MemoryQueue(model, gpus=1)
    pool = GpuPool(queue, Backend.create("sim", model), ServerMetrics(), timeout_s=5)
    worker = asyncio.create_task(pool.worker(0))
    loop = asyncio.get_running_loop()
    start = loop.time()
    queued = await queue.offer(Generate("queued"), Tier.PAID)
    await asyncio.sleep(0.1)  # the GPU is waiting for the queued request's deadline (1 s)
    assert [g.text for g in await pool.run_now([Generate("direct")])] == [sim_output("direct")]
    assert loop.time() - start == pytest.approx(0.110, abs=1e-9)  # at once, not after the queued one's deadline
    assert (await queued).text == sim_output("queued") and loop.time() - start == pytest.approx(1.010, abs=1e-9)
    assert len(pool.served) == 1  # the internal batch is not client traffic
    worker.cancel()


@pytest.mark.parametrize(("rps", "gpus"), [(400, 1), (1500, 2), (4000, 3)])
async def test_queue_and_pool_answer_every_request_when_the_simulator_does(rps, gpus):
    """The server's dispatch, admission and GPU pool against the engine: same arrivals, same instants."""
    model = ServiceModel(backpressure=Backpressure(queue_limit=150))  # small, so 4000 req/s also sheds
    arrivals = generate_arrivals(RateSchedule(rps=rps), 3.0, model.tier_shares, np.random.default_rng(rps))
    expected = simulate_arrivals(model, arrivals, gpus).records
    queue = MemoryQueue(model, gpus)
    pool = GpuPool(queue, Backend.create("sim", model), ServerMetrics(), timeout_s=30)
    workers = [asyncio.create_task(pool.worker(g)) for g in range(gpus)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    finished = np.full(len(arrivals), np.nan)

    async def client(i: int) -> None:
        await asyncio.sleep(start + arrivals.times[i] - loop.time())
        future = await queue.offer(Generate(f"r{i}"), int(arrivals.tiers[i]))
        if future is not None:
            assert (await future).text == sim_output(f"r{i}")
            finished[i] = loop.time() - start

    await asyncio.gather(*(client(i) for i in range(len(arrivals))))
    for worker in workers:
        worker.cancel()
    np.testing.assert_array_equal(np.isnan(finished), np.isnan(expected.finished))  # the same requests shed
    np.testing.assert_allclose(finished, expected.finished, atol=1e-6, equal_nan=True)
    if rps == 4000:
        assert np.isnan(finished).sum() > 100, "the overload case must exercise the zones"
