"""The lanes that bound a RedisCache's commands: first come first served, urgent ones first."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("redis")

from wq_memo.backends._redis_conn import Lanes


async def _take(lanes: Lanes, urgent: bool, order: list[str], name: str) -> None:
    await lanes.acquire(urgent)
    order.append(name)


async def test_at_most_size_at_once_and_urgent_ones_first() -> None:
    lanes = Lanes(1)
    order: list[str] = []
    await lanes.acquire(False)  # the only lane is busy
    tasks = [
        asyncio.create_task(_take(lanes, urgent, order, name))
        for name, urgent in [("a", False), ("b", False), ("u", True), ("c", False)]
    ]
    await asyncio.sleep(0)
    assert order == []
    for _ in range(4):
        lanes.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["u", "a", "b", "c"]


async def test_a_waiter_cancelled_after_its_wake_up_passes_the_lane_on() -> None:
    lanes = Lanes(1)
    order: list[str] = []
    await lanes.acquire(False)
    first = asyncio.create_task(_take(lanes, False, order, "first"))
    second = asyncio.create_task(_take(lanes, False, order, "second"))
    await asyncio.sleep(0)
    lanes.release()  # hands the lane to first ...
    first.cancel()  # ... which is cancelled before it runs
    async with asyncio.timeout(1):
        await second
    assert order == ["second"]
    assert first.cancelled()


async def test_a_waiter_cancelled_before_its_turn_leaves_the_queue() -> None:
    lanes = Lanes(1)
    order: list[str] = []
    await lanes.acquire(False)
    gone = asyncio.create_task(_take(lanes, False, order, "gone"))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    lanes.release()
    await lanes.acquire(False)  # the lane came back free, not to the cancelled waiter
    assert order == []


async def test_a_lane_handed_to_a_waiter_is_not_taken_by_a_newcomer() -> None:
    lanes = Lanes(1)
    order: list[str] = []
    await lanes.acquire(False)
    waiting = asyncio.create_task(_take(lanes, False, order, "waiting"))
    await asyncio.sleep(0)
    lanes.release()  # hands the lane to the waiting task, which has not run yet
    newcomers = [
        asyncio.create_task(_take(lanes, urgent, order, name))
        for name, urgent in [("late", False), ("late urgent", True)]
    ]
    async with asyncio.timeout(1):
        await waiting
    assert order == ["waiting"]
    lanes.release()
    await asyncio.sleep(0)
    assert order == ["waiting", "late urgent"]
    lanes.release()
    async with asyncio.timeout(1):
        await asyncio.gather(*newcomers)
    assert order == ["waiting", "late urgent", "late"]


async def test_urgent_waiters_cancelled_before_their_turn_leave_the_others_in_order() -> None:
    lanes = Lanes(1)
    order: list[str] = []
    await lanes.acquire(False)
    tasks = {
        name: asyncio.create_task(_take(lanes, urgent, order, name))
        for name, urgent in [("a", False), ("gone", True), ("u", True), ("b", False)]
    }
    await asyncio.sleep(0)
    tasks["gone"].cancel()
    await asyncio.gather(tasks["gone"], return_exceptions=True)
    lanes.release()
    await asyncio.sleep(0)
    late = asyncio.create_task(_take(lanes, True, order, "late urgent"))  # still before a
    for _ in range(3):
        await asyncio.sleep(0)
        lanes.release()
    async with asyncio.timeout(1):
        await asyncio.gather(tasks["a"], tasks["u"], tasks["b"], late)
    assert order == ["u", "late urgent", "a", "b"]
