"""f.refresh() made once a computation has delivered its result, while that result's store in
an AsyncCache is still on its way (found by the store machine, tests/stateful)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

from wq_memo import MISSING, worker_queue

WAIT = 5.0


class HeldStores:
    """An AsyncCache in memory whose stores wait at a gate."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.gate = asyncio.Event()
        self.storing = asyncio.Event()

    async def get(self, key: Hashable) -> Any:
        await asyncio.sleep(0)
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        self.storing.set()
        await self.gate.wait()
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        await asyncio.sleep(0)
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass


async def test_a_refresh_computes_even_while_the_last_result_is_being_stored() -> None:
    cache = HeldStores()
    computed = 0

    @worker_queue(cache=cache, name="refresh-while-storing")
    async def f(k: str) -> str:
        nonlocal computed
        computed += 1
        return f"{k}#{computed}"

    try:
        async with asyncio.timeout(WAIT):
            assert await f("k") == "k#1"  # delivered; its store waits at the gate
            await cache.storing.wait()
            refreshing = asyncio.create_task(f.refresh("k"))
            await asyncio.sleep(0)
            cache.gate.set()
            assert await refreshing == "k#2"
    finally:
        cache.gate.set()
        await f.queue.aclose()
