"""With any SingleFlightCache, f.refresh() stores through get_or_compute, the cache's one fenced
store: an invalidation or a clear made while the refresh computes keeps its result out (issue
17, item 1)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import pytest

from wq_memo import MISSING, worker_queue
from wq_memo.backends import SingleFlightCache

V = TypeVar("V")
WAIT = 5.0


class FencedCache:
    """A SingleFlightCache in memory whose get_or_compute stores only if no delete or set of the
    key and no clear came since it began, in one step after a suspension, as a script would."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.generation: dict[Hashable, int] = {}
        self.clears = 0

    async def get(self, key: Hashable) -> Any:
        await asyncio.sleep(0)
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await asyncio.sleep(0)
        self.generation[key] = self.generation.get(key, 0) + 1  # a prime wins
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        await asyncio.sleep(0)
        self.generation[key] = self.generation.get(key, 0) + 1
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        await asyncio.sleep(0)
        self.clears += 1
        self.data.clear()

    async def aclose(self) -> None:
        pass

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        value = await self.get(key)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        began = (self.clears, self.generation.get(key, 0))
        value = await compute()
        await asyncio.sleep(0)
        if (self.clears, self.generation.get(key, 0)) == began:
            self.data[key] = value
        return value


def test_the_double_is_a_single_flight_cache() -> None:
    assert isinstance(FencedCache(), SingleFlightCache)


@pytest.mark.parametrize("how", ["acache_invalidate", "acache_clear"])
async def test_a_refresh_never_stores_after_an_invalidation(how: str) -> None:
    cache = FencedCache()
    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    @worker_queue(cache=cache, name="fenced-refresh")
    async def f(k: str) -> str:
        nonlocal calls
        calls += 1
        n = calls
        started.set()
        await gate.wait()
        return f"{k}#{n}"

    gate.set()
    async with asyncio.timeout(WAIT):
        assert await f("k") == "k#1"
        gate.clear()
        started.clear()
        refreshing = asyncio.create_task(f.refresh("k"))
        await started.wait()
        if how == "acache_invalidate":
            await f.acache_invalidate("k")
        else:
            await f.acache_clear()
        gate.set()
        assert await refreshing == "k#2"  # its caller gets it ...
        assert await f.acache_peek("k") is MISSING  # ... but it is not stored
        assert await f("k") == "k#3"  # computed afresh
        assert await f.acache_peek("k") == "k#3"
        assert await f.refresh("k") == "k#4"  # with nothing in the way, a refresh stores
        assert await f.acache_peek("k") == "k#4"
    await f.queue.aclose()
