"""@worker_queue across event loops: successive asyncio.run() calls keep the function working."""

from __future__ import annotations

import asyncio

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
