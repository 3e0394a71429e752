"""Fair admission: computations start in the order their first callers arrived; a newcomer never
takes a place while earlier callers wait for room."""

from __future__ import annotations

import asyncio

import pytest

from wq_memo import WorkerQueue, worker_queue

WAIT = 20.0


def worst_overtaking(arrivals: list[int], starts: list[int]) -> int:
    """The most callers that arrived later but started earlier, over every caller."""
    position = {key: i for i, key in enumerate(starts)}
    worst = 0
    for i, key in enumerate(arrivals):
        overtaken_by = sum(1 for later in arrivals[i + 1 :] if position[later] < position[key])
        worst = max(worst, overtaken_by)
    return worst


def test_worst_overtaking_counts_later_arrivals_that_started_first() -> None:
    assert worst_overtaking([1, 2, 3], [1, 2, 3]) == 0
    assert worst_overtaking([1, 2, 3], [2, 3, 1]) == 2


@pytest.mark.parametrize("turns", [300, 3000])
async def test_a_caller_arriving_every_loop_turn_never_overtakes_an_earlier_one(
    turns: int,
) -> None:
    """maxsize=2, each computation lasts 3 turns, one new caller every turn."""
    starts: list[int] = []

    @worker_queue(maxsize=2, cache=None)
    async def work(key: int) -> int:
        starts.append(key)
        for _ in range(3):
            await asyncio.sleep(0)
        return key

    tasks = []
    for key in range(turns):
        tasks.append(asyncio.create_task(work(key)))
        await asyncio.sleep(0)
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*tasks) == list(range(turns))
    assert len(starts) == turns
    assert worst_overtaking(list(range(turns)), starts) == 0


async def test_worker_queue_admits_in_arrival_order_under_a_steady_stream() -> None:
    starts: list[int] = []

    async def worker(item: int) -> int:
        starts.append(item)
        for _ in range(3):
            await asyncio.sleep(0)
        return item

    async def cache_get(item: int) -> int | None:
        return None

    async def cache_set(item: int, value: int) -> None:
        pass

    queue: WorkerQueue[int, int] = WorkerQueue(worker, cache_get, cache_set, maxsize=2)
    tasks = []
    for item in range(500):
        tasks.append(asyncio.create_task(queue.require(item)))
        await asyncio.sleep(0)
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*tasks)
    assert worst_overtaking(list(range(500)), starts) == 0
