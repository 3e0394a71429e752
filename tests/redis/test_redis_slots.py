"""Waiting for another process takes none of this process's computation slots (issue 11, item 2).

The decorator calls get_or_compute() holding no slot; compute() waits for one of the process's
``maxsize`` slots and then runs the function. A Semaphore(3) acquired inside compute() stands for
them here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]


def _slotted(slots: asyncio.Semaphore, fn: Callable[[], Awaitable[str]]) -> Callable[[], Any]:
    """compute() as the decorator makes it: wait for a slot, then run the function."""

    async def compute() -> str:
        async with slots:
            return await fn()

    return compute


async def test_an_unrelated_key_is_computed_at_once_while_three_keys_are_awaited(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    process_a, process_b = make_redis_cache(), make_redis_cache()
    slow = [CallKey("m.slow", (i,)) for i in range(3)]
    release, started = asyncio.Event(), asyncio.Event()
    running = 0

    async def slow_in_a() -> str:
        nonlocal running
        running += 1
        if running == 3:
            started.set()
        await release.wait()  # stands for an 8 s computation
        return "slow"

    async def must_not_run() -> str:
        raise AssertionError("B waits for A's value; it must not compute it")

    async def quick() -> str:
        await asyncio.sleep(0.05)
        return "quick"

    b_slots = asyncio.Semaphore(3)  # process B's maxsize=3
    async with asyncio.timeout(20):
        in_a = [asyncio.create_task(process_a.get_or_compute(k, slow_in_a)) for k in slow]
        await started.wait()
        in_b = [
            asyncio.create_task(process_b.get_or_compute(k, _slotted(b_slots, must_not_run)))
            for k in slow
        ]
        # B's three callers are waiting for A (subscribed to the three channels).
        channels = [key_names(process_b.namespace, k).channel for k in slow]
        await until(lambda: all(n for _, n in sync_redis.pubsub_numsub(*channels)))
        began = time.monotonic()
        unrelated = _slotted(b_slots, quick)
        assert await process_b.get_or_compute(CallKey("m.quick", ()), unrelated) == "quick"
        took = time.monotonic() - began
        assert not any(task.done() for task in in_b)  # still waiting, holding no slot
        release.set()
        assert await asyncio.gather(*in_a, *in_b) == ["slow"] * 6
    assert took < 0.5, took
    assert process_b.stats().computed == 1
    assert process_b.stats().waited == 3
