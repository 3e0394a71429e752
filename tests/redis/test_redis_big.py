"""A slow or huge entry stays a local problem (issue 11, item 6)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer

from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
HOT = CallKey("m.f", ("hot",))


async def test_values_larger_than_max_value_bytes_are_returned_uncached(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_redis_cache(max_value_bytes=1000)

    async def big() -> str:
        return "x" * 2000

    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await cache.get_or_compute(HOT, big) == "x" * 2000
        await cache.set(CallKey("m.f", ("set",)), "y" * 2000)
    assert await cache.get(HOT) is MISSING
    assert await cache.get(CallKey("m.f", ("set",))) is MISSING
    assert cache.stats().oversized == 2
    assert "max_value_bytes=1000" in caplog.text


async def test_an_oversized_entry_is_a_bounded_miss_then_replaced(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(max_value_bytes=1 << 20)
    name = key_names(cache.namespace, HOT).value
    sync_redis.setrange(name, 64 << 20, b"!")  # 64 MiB written in place by the server
    started = time.monotonic()
    assert await cache.get(HOT) is MISSING  # reads at most max_value_bytes + 1 bytes
    computed = 0

    async def small() -> str:
        nonlocal computed
        computed += 1
        return "small"

    # Through the lock the entry is not read at all; the new value replaces it.
    assert await cache.get_or_compute(HOT, small) == "small"
    assert time.monotonic() - started < 2
    assert await cache.get(HOT) == "small"
    stats = cache.stats()
    assert (computed, stats.oversized, stats.redis_errors) == (1, 2, 0)


async def test_one_slow_key_does_not_open_the_breaker_for_the_others(
    own_redis: RedisServer,
) -> None:
    import redis

    # A huge entry that is allowed (max_value_bytes is raised), under one hot key: each read
    # of it takes longer than the timeout. The other keys must keep being served by Redis.
    cache = RedisCache(
        own_redis.url, namespace="slow", timeout=0.1, max_value_bytes=256 << 20, retry_interval=5
    )
    admin = redis.Redis.from_url(own_redis.url)
    try:
        admin.setrange(key_names("slow", HOT).value, 100 << 20, b"!")
    finally:
        admin.close()
    others = [CallKey("m.f", (i,)) for i in range(20)]
    for key in others:
        await cache.set(key, "stored")
    recomputed = 0

    async def recompute() -> str:
        nonlocal recomputed
        recomputed += 1
        return "stored"

    async def hot_reads() -> int:
        reads = 0
        while time.monotonic() < until:
            assert await cache.get(HOT) is MISSING
            reads += 1
        return reads

    async def other_calls() -> int:
        calls = 0
        while time.monotonic() < until:
            assert await cache.get_or_compute(others[calls % 20], recompute) == "stored"
            calls += 1
            await asyncio.sleep(0.005)
        return calls

    until = time.monotonic() + 1.5
    async with asyncio.timeout(20):
        reads, *calls = await asyncio.gather(hot_reads(), other_calls(), other_calls())
        await asyncio.sleep(1.2)  # the last probe's answer
    stats = cache.stats()
    await cache.aclose()
    assert reads >= 3
    assert not cache._conn.down  # it would still be open: retry_interval is 5 s
    # Every error is a hot read, or a call on another key that this process's own reading of
    # the big value slowed past the timeout (that one call computed on its own, usually after
    # an error of its own); no probe failed, and the other keys stayed served from Redis.
    assert reads <= stats.redis_errors <= reads + recomputed
    assert stats.fallbacks == recomputed
    assert stats.hits == sum(calls) - recomputed
    # Calls that this process's own reading of the big value slowed past the timeout compute
    # on their own; how many depends on the machine's speed. The breaker stayed closed, and
    # the other keys kept being served from Redis.
    assert stats.hits > 0
    assert recomputed < sum(calls), (recomputed, calls)
