"""WorkerQueue keeps no per-item bookkeeping once callers are done (issue 2: 10)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from _queue_harness import bounded, eventually, gathered, make

from wq_memo import QueueShutDown, ShutdownTimeout

ITEMS = range(8)


class Boom(Exception):
    pass


@pytest.mark.parametrize("seed", range(6))
async def test_no_bookkeeping_is_left_after_a_mix_of_results_failures_and_cancellations(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="wq_memo")  # errors nobody receives are expected
    rng = random.Random(seed)
    h = make(maxsize=rng.choice([1, 2, 3]), yields=rng.random() < 0.5)
    gates = {i: h.worker.gate(i) for i in ITEMS}
    failing = {i for i in ITEMS if rng.random() < 0.3}
    for i in failing:
        h.worker.fail(i, Boom(i))
    if rng.random() < 0.3:
        h.cache.set_error = OSError("cache_set down")
    requested = [rng.choice(ITEMS) for _ in range(40)]
    tasks = [asyncio.create_task(h.queue.require(i)) for i in requested]
    # Interleave: release computations and cancel callers in a seeded order.
    for _ in range(60):
        await asyncio.sleep(0)
        roll = rng.random()
        if roll < 0.25:
            rng.choice(tasks).cancel()
        elif roll < 0.45:
            gates[rng.choice(ITEMS)].set()
    for gate in gates.values():
        gate.set()
    outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    for item, outcome in zip(requested, outcomes, strict=True):
        if isinstance(outcome, asyncio.CancelledError):
            continue
        if item in failing:
            assert isinstance(outcome, Boom)
            assert outcome.args == (item,)
        else:
            assert outcome == f"r{item}"
    # Computations whose callers were all cancelled still run to their end.
    await eventually(lambda: not h.flights())
    h.assert_no_bookkeeping()
    assert h.worker.active == 0
    assert h.worker.max_active <= h.queue.maxsize


@pytest.mark.parametrize("seed", range(4))
async def test_no_bookkeeping_is_left_after_a_shutdown_in_the_middle_of_a_mix(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="wq_memo")
    rng = random.Random(seed)
    h = make(maxsize=2, finish_timeout=0.02)
    gates = {i: h.worker.gate(i) for i in ITEMS}
    for i in ITEMS:
        if rng.random() < 0.3:
            h.worker.fail(i, Boom(i))
    requested = [rng.choice(ITEMS) for _ in range(30)]
    tasks = [asyncio.create_task(h.queue.require(i)) for i in requested]
    for _ in range(20):
        await asyncio.sleep(0)
        roll = rng.random()
        if roll < 0.2:
            rng.choice(tasks).cancel()
        elif roll < 0.5:
            gates[rng.choice(ITEMS)].set()
    table = h.queue._engine.table
    assert table is not None
    await bounded(h.queue.aclose())
    outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    allowed = (str, Boom, asyncio.CancelledError, ShutdownTimeout, QueueShutDown)
    assert all(isinstance(o, allowed) for o in outcomes)
    assert h.queue._engine.table is None
    assert table.flights == {}
    assert table.running == 0
    assert table.live == 0
    assert table.lines() == (0, 0, 0)
    table.check()
    # The queue starts again with a clean slate.
    for gate in gates.values():
        gate.set()
    for i in ITEMS:
        h.worker.succeed(i)
    assert await gathered(*(h.queue.require(i) for i in ITEMS)) == [f"r{i}" for i in ITEMS]
    h.assert_no_bookkeeping()
