"""@worker_queue over an AsyncCache: the async protocol, None values, failures, single flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import pytest

from wq_memo import CacheInfo, worker_queue
from wq_memo.backends import MISSING, AsyncCache, CallKey, SingleFlightCache

V = TypeVar("V")
WAIT = 5.0


class MemoryAsyncCache:
    """An AsyncCache over a dict, recording what it was asked."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.fail_get = False
        self.fail_set = False
        self.closed = False

    async def get(self, key: Hashable) -> Any:
        if self.fail_get:
            raise ConnectionError("store unreachable")
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        if self.fail_set:
            raise ConnectionError("store unreachable")
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        self.closed = True


class SingleFlightMemoryCache(MemoryAsyncCache):
    """Adds get_or_compute, counting how often it computed."""

    def __init__(self) -> None:
        super().__init__()
        self.computed = 0

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        if key in self.data:
            value: V = self.data[key]
            return value
        self.computed += 1
        value = await compute()
        self.data[key] = value
        return value


def test_the_doubles_follow_the_protocols() -> None:
    assert isinstance(MemoryAsyncCache(), AsyncCache)
    assert not isinstance(MemoryAsyncCache(), SingleFlightCache)
    assert isinstance(SingleFlightMemoryCache(), SingleFlightCache)
    assert not isinstance({}, AsyncCache)


async def returns_none(x: int) -> int | None:
    return None


async def test_values_are_stored_under_the_functions_name_and_key() -> None:
    cache = MemoryAsyncCache()
    f = worker_queue(cache=cache)(returns_none)

    assert await f(1) is None
    [(stored_key, value)] = cache.data.items()
    assert isinstance(stored_key, CallKey)
    assert stored_key.function == f"{__name__}.{f.__qualname__}"
    assert value is None
    assert await f(1) is None
    assert f.cache_info() == CacheInfo(hits=1, misses=1, joined=0, maxsize=None, currsize=None)


async def test_two_functions_share_one_async_cache_without_colliding() -> None:
    cache = MemoryAsyncCache()

    @worker_queue(cache=cache, name="a")
    async def a(x: int) -> str:
        return "a"

    @worker_queue(cache=cache, name="b")
    async def b(x: int) -> str:
        return "b"

    assert (await a(1), await b(1), await a(1), await b(1)) == ("a", "b", "a", "b")
    assert len(cache.data) == 2


async def test_concurrent_calls_are_deduplicated_before_the_cache() -> None:
    cache = MemoryAsyncCache()
    gate = asyncio.Event()
    calls = 0

    @worker_queue(cache=cache, name="f")
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return x

    tasks = [asyncio.create_task(f(3)) for _ in range(30)]
    for _ in range(10):
        await asyncio.sleep(0)
    gate.set()
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*tasks) == [3] * 30
    assert calls == 1


async def test_a_failing_store_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    cache = MemoryAsyncCache()
    cache.fail_get = cache.fail_set = True
    calls = 0

    @worker_queue(cache=cache, name="f")
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert await f(1) == 1
    assert "cache_get failed" in caplog.text
    assert "cache_set failed" in caplog.text
    cache.fail_get = cache.fail_set = False
    assert await f(1) == 1
    assert await f(1) == 1
    assert calls == 2  # the store works again: computed once more, then a hit


async def test_single_flight_caches_compute_through_get_or_compute() -> None:
    cache = SingleFlightMemoryCache()
    calls = 0

    @worker_queue(cache=cache, name="f")
    async def f(x: int, *, y: int = 0) -> int:
        nonlocal calls
        calls += 1
        return x + y

    assert await asyncio.gather(*(f(1, y=2) for _ in range(10))) == [3] * 10
    assert (calls, cache.computed) == (1, 1)
    assert await f(1, y=2) == 3
    info = f.cache_info()
    assert info.misses == 1
    assert info.hits + info.misses + info.joined == 11


async def test_invalidate_and_clear_need_the_async_forms() -> None:
    cache = MemoryAsyncCache()

    @worker_queue(cache=cache, name="f")
    async def f(x: int) -> int:
        return x

    await f(1)
    await f(2)
    with pytest.raises(TypeError, match="acache_invalidate"):
        f.cache_invalidate(1)
    with pytest.raises(TypeError, match="acache_clear"):
        f.cache_clear()
    assert await f.acache_invalidate(1) is True
    assert await f.acache_invalidate(1) is False
    with pytest.raises(TypeError, match="pass key="):
        await f.acache_invalidate([1])  # type: ignore[arg-type]
    await f.acache_clear()
    assert cache.data == {}


async def test_unhashable_arguments_with_an_async_cache() -> None:
    @worker_queue(cache=MemoryAsyncCache(), name="f")
    async def f(x: Any) -> int:
        return 1

    with pytest.raises(TypeError, match=r"f\(\).*pass key="):
        await f({})
