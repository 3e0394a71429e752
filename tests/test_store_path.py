"""Every write of a value goes through the one store (wq_memo/_store.py): a cache that records
each write it receives, and whether the store announced it (the store's frame is on the stack
of the write), is driven through every write path: a miss, a background refresh, an explicit
refresh and a prime, with a mapping, an async cache, a single-flight cache and a refreshing
cache. A write path of its own, made for a new feature, fails here."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import cachetools
import pytest

from wq_memo import MISSING, Memoized, _store, worker_queue
from wq_memo.backends import AsyncCache, Missing, RefreshingCache, SingleFlightCache

V = TypeVar("V")
REFRESH_AFTER = 5.0
STORE_FILE = _store.__file__


def announced() -> bool:
    """Whether the write being made now was sent by the store: one of its frames calls it."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == STORE_FILE:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class Writes:
    """Each write a cache received: (key, value, whether the store announced it)."""

    def __init__(self) -> None:
        self.made: list[tuple[Hashable, Any, bool]] = []

    def record(self, key: Hashable, value: Any) -> None:
        self.made.append((key, value, announced()))

    def unannounced(self) -> list[tuple[Hashable, Any, bool]]:
        return [w for w in self.made if not w[2]]


class RecordingMapping(cachetools.LRUCache[Hashable, Any]):
    def __init__(self) -> None:
        super().__init__(maxsize=100)
        self.writes = Writes()

    def __setitem__(self, key: Hashable, value: Any) -> None:
        self.writes.record(key, value)
        super().__setitem__(key, value)


class RecordingAsyncCache:
    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.written_at: dict[Hashable, float] = {}
        self.writes = Writes()
        self.now = 0.0

    def put(self, key: Hashable, value: Any) -> None:
        self.writes.record(key, value)
        self.data[key] = value
        self.written_at[key] = self.now

    async def get(self, key: Hashable) -> Any:
        await asyncio.sleep(0)
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await asyncio.sleep(0)
        self.put(key, value)

    async def delete(self, key: Hashable) -> bool:
        await asyncio.sleep(0)
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        await asyncio.sleep(0)
        self.data.clear()

    async def aclose(self) -> None:
        pass


class RecordingSingleFlightCache(RecordingAsyncCache):
    """Writes a computation's result itself, inside get_or_compute (no other process here)."""

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        value = await self.get(key)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        value = await compute()
        await asyncio.sleep(0)
        self.put(key, value)
        return value


class RecordingRefreshingCache(RecordingSingleFlightCache):
    async def get_with_age(self, key: Hashable) -> tuple[Any, float | None]:
        value = await self.get(key)
        if value is MISSING:
            return MISSING, None
        return value, self.now - self.written_at[key]

    async def refresh(
        self, key: Hashable, compute: Callable[[], Awaitable[V]]
    ) -> tuple[bool, V | Missing]:
        value = await compute()
        await asyncio.sleep(0)
        self.put(key, value)
        return True, value


CACHES: dict[str, Callable[[], Any]] = {
    "mapping": RecordingMapping,
    "async": RecordingAsyncCache,
    "single-flight": RecordingSingleFlightCache,
    "refreshing": RecordingRefreshingCache,
}


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind", list(CACHES))
async def test_every_write_goes_through_the_store(kind: str) -> None:
    cache = CACHES[kind]()
    if kind == "single-flight":
        assert isinstance(cache, SingleFlightCache)
        assert not isinstance(cache, RefreshingCache)
    elif kind == "refreshing":
        assert isinstance(cache, RefreshingCache)
    elif kind == "async":
        assert isinstance(cache, AsyncCache)
        assert not isinstance(cache, SingleFlightCache)
    clock = [0.0]
    computed = 0

    @worker_queue(cache=cache, name="f", refresh_after=REFRESH_AFTER, timer=lambda: clock[0])
    async def f(key: str) -> int:
        nonlocal computed
        await asyncio.sleep(0)
        computed += 1
        return computed

    memo: Memoized[[str], int] = f
    writes: Writes = cache.writes

    def last() -> Any:
        return writes.made[-1][1] if writes.made else None

    async with asyncio.timeout(10):
        assert await memo("k") == 1  # a miss
        await settle()
        assert last() == 1, writes.made

        clock[0] += REFRESH_AFTER + 1  # a background refresh, started by the next hit
        if not isinstance(cache, RecordingMapping):
            cache.now = clock[0]
        assert await memo("k") == 1
        await settle()
        assert computed == 2
        assert last() == 2, writes.made

        assert await memo.refresh("k") == 3  # an explicit refresh
        await settle()
        assert last() == 3, writes.made

        if isinstance(cache, RecordingMapping):  # a prime
            memo.cache_prime(-1, "k")
        await memo.acache_prime(-2, "k")
        assert last() == -2, writes.made
        if isinstance(cache, RecordingMapping):
            assert [w[1] for w in writes.made[-2:]] == [-1, -2]

        await memo.acache_invalidate("k")
        assert await memo("k") == 4  # a miss again, after an invalidation
        await settle()
        assert last() == 4, writes.made

    assert not writes.unannounced(), f"writes the store did not send: {writes.unannounced()}"
    await memo.queue.aclose()
