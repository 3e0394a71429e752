"""With the default key, entries are interchangeable with cachetools.keys.hashkey's.

Without keyword arguments the decorator keys the cache by the arguments' tuple itself, which
equals ``hashkey(*args)`` and hashes alike; these tests pin that equivalence down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

import cachetools
from cachetools.keys import hashkey

from wq_memo import worker_queue


async def test_entries_are_found_under_hashkey_and_the_other_way_round() -> None:
    cache: dict[Hashable, Any] = {hashkey(2): "filled by hand"}
    calls: list[int] = []

    @worker_queue(cache=cache)
    async def f(x: int) -> str:
        calls.append(x)
        return f"computed {x}"

    assert await f(1) == "computed 1"
    assert cache[hashkey(1)] == "computed 1"
    assert await f(2) == "filled by hand"
    assert calls == [1]
    assert f.cache_invalidate(1) is True
    assert hashkey(1) not in cache


async def test_keyword_arguments_still_go_through_hashkey() -> None:
    cache: cachetools.LRUCache[Hashable, Any] = cachetools.LRUCache(maxsize=8)

    @worker_queue(cache=cache)
    async def f(x: int, *, y: int = 0) -> int:
        return x + 10 * y

    assert await f(1) == 1
    assert await f(1, y=2) == 21
    assert await f(x=1) == 1  # a keyword call is its own entry, as with hashkey
    assert set(cache) == {hashkey(1), hashkey(1, y=2), hashkey(x=1)}
    assert cache[hashkey(1, y=2)] == 21
    assert f.cache_invalidate(1, y=2) is True
    assert set(cache) == {hashkey(1), hashkey(x=1)}


async def test_a_key_function_of_ones_own_is_still_called() -> None:
    seen: list[tuple[Any, ...]] = []

    def key(*args: Any) -> Hashable:
        seen.append(args)
        return hashkey(*args)

    @worker_queue(cache={}, key=key)
    async def f(x: int) -> int:
        return x

    assert await f(1) == 1
    assert await f(1) == 1
    assert seen == [(1,), (1,)]


async def test_deduplication_without_a_cache_uses_the_same_key() -> None:
    gate = asyncio.Event()
    calls = 0

    @worker_queue(cache=None)
    async def f(x: int, *, y: int = 0) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return x + y

    async with asyncio.timeout(5):
        callers = [asyncio.ensure_future(f(1)) for _ in range(3)]
        callers += [asyncio.ensure_future(f(1, y=1)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*callers) == [1, 1, 1, 2, 2, 2]
    assert calls == 2
