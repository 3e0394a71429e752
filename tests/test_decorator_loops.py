"""@worker_queue across event loops: successive asyncio.run() calls keep the function working."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from wq_memo import worker_queue

calls = 0


@worker_queue(maxsize=2)
async def square(x: int) -> int:
    global calls
    calls += 1
    await asyncio.sleep(0)
    return x * x


def test_successive_asyncio_runs_share_the_cache() -> None:
    async def burst() -> list[int]:
        async with asyncio.timeout(5):
            return await asyncio.gather(*(square(i % 4) for i in range(40)))

    before = calls
    assert asyncio.run(burst()) == [(i % 4) ** 2 for i in range(40)]
    assert calls - before == 4
    assert asyncio.run(burst()) == [(i % 4) ** 2 for i in range(40)]
    assert calls - before == 4  # all hits in the second loop
    assert square.cache_info().hits >= 40


def test_a_loop_that_ended_mid_computation_leaves_nothing_behind() -> None:
    started = 0

    @worker_queue
    async def slow(x: int) -> int:
        nonlocal started
        started += 1
        if started == 1:
            await asyncio.Event().wait()  # never finishes in the first loop
        return x

    async def abandon() -> None:
        task = asyncio.create_task(slow(1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()
        # asyncio.run() cancels the task when this returns; the loop then closes

    asyncio.run(abandon())

    async def again() -> int:
        async with asyncio.timeout(5):
            return await slow(1)

    assert asyncio.run(again()) == 1  # no "different event loop", no hang
    assert started == 2
    assert asyncio.run(again()) == 1
    assert started == 2


def test_aclose_all_in_a_later_loop_forgets_queues_of_a_closed_loop() -> None:
    @worker_queue
    async def f(x: int) -> int:
        return x

    async def use() -> None:
        await f(1)

    asyncio.run(use())
    assert f.queue.running  # started in a loop that is now closed

    async def close_all() -> None:
        async with asyncio.timeout(5):
            await worker_queue.aclose_all()

    asyncio.run(close_all())
    assert not f.queue.running


@pytest.mark.parametrize("moved_by", ["a call", "aclose()"])
def test_a_computation_left_on_a_stopped_loop_stores_nothing_once_the_function_moved_on(
    moved_by: str,
) -> None:
    """A loop stops (still open) with a computation pending, and the function moves on to
    another loop, where its cache is cleared (as the pytest plugin does when a test leaves a
    computation running on a wider event loop). Should the first loop run again, the
    computation's caller gets its result, but the result is never stored: it may be stale."""
    cache: dict[Hashable, str] = {}
    started, gate = asyncio.Event(), asyncio.Event()

    @worker_queue(cache=cache)
    async def f(x: int) -> str:
        if x == 1:
            started.set()
            await gate.wait()
        return f"computed {x}"

    first = asyncio.new_event_loop()
    try:

        async def start() -> asyncio.Task[str]:
            task = asyncio.create_task(f(1))
            async with asyncio.timeout(5):
                await started.wait()
            return task

        caller = first.run_until_complete(start())

        async def elsewhere() -> None:
            async with asyncio.timeout(5):
                if moved_by == "a call":
                    assert await f(2) == "computed 2"
                else:
                    await f.queue.aclose()
            f.cache_clear()

        asyncio.run(elsewhere())
        gate.set()
        first.run_until_complete(asyncio.wait_for(caller, timeout=5))
        assert caller.result() == "computed 1"
        assert cache == {}
    finally:
        first.close()
