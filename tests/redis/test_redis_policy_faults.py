"""cache_errors and stale_if_error while Redis stalls or goes down in the middle of a failing
recomputation: the failure path reads the key's entry again, then writes the stale value or
the remembered error through the fenced store; each step is bounded by the cache's timeout, and
the callers always get an answer (their exception, when the entry cannot be read)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer
from test_redis_policy_errors import Clock, Source, Throttled, memoize

from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

TIMEOUT = 0.3


@pytest.mark.parametrize("fault", ["stall", "down"])
async def test_a_failing_recomputation_answers_when_redis_fails_before_its_re_read(
    own_redis: RedisServer, fault: str
) -> None:
    cache = RedisCache(own_redis.url, namespace="policy-faults", timeout=TIMEOUT)
    clock = Clock()
    source = Source()
    rate = memoize(cache, source, clock)
    paused = False
    try:
        source.plan = ["old"]
        async with asyncio.timeout(10):
            assert await rate("eur") == "old"
        clock.now += 11  # expired, inside the stale window
        source.gate = asyncio.Event()
        source.started.clear()
        source.plan = [Throttled("eur")]
        call = asyncio.ensure_future(rate("eur"))
        async with asyncio.timeout(10):
            await source.started.wait()
        assert own_redis.proc is not None
        if fault == "stall":
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            paused = True
        else:
            own_redis.stop()
        loop = asyncio.get_running_loop()
        began = loop.time()
        source.gate.set()
        # The re-read and the write each give up after the timeout (with its retries): the
        # caller gets its own exception, as Redis cannot say what the entry was.
        async with asyncio.timeout(10 * TIMEOUT + 2):
            with pytest.raises(Throttled):
                await call
        took = loop.time() - began
        assert took < 10 * TIMEOUT + 1, took
    finally:
        if paused:
            os.kill(own_redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        await cache.aclose()


async def test_a_stale_value_read_before_redis_stalls_is_served_though_its_write_fails(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = RedisCache(own_redis.url, namespace="policy-faults", timeout=TIMEOUT)
    read = RedisCache.peek_kept
    stall = asyncio.Event()

    async def read_then_stall(self: RedisCache, key: Any) -> Any:
        found = await read(self, key)
        if stall.is_set():
            assert own_redis.proc is not None
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
        return found

    monkeypatch.setattr(RedisCache, "peek_kept", read_then_stall)
    clock = Clock()
    source = Source()
    rate = memoize(cache, source, clock)
    try:
        source.plan = ["old", Throttled("eur")]
        async with asyncio.timeout(10):
            assert await rate("eur") == "old"
        clock.now += 11
        stall.set()
        loop = asyncio.get_running_loop()
        began = loop.time()
        async with asyncio.timeout(10 * TIMEOUT + 2):
            assert await rate("eur") == "old"
        took = loop.time() - began
        assert took < 10 * TIMEOUT + 1, took
        assert rate.cache_info().stale == 1
    finally:
        if stall.is_set() and own_redis.proc is not None:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        await cache.aclose()


@pytest.mark.parametrize(
    "how",
    [
        "invalidate here",
        "invalidate there",
        "clear here",
        "clear there",
        "prime here",
        "prime there",
    ],
)
@pytest.mark.parametrize("failure", ["stale", "remembered"])
async def test_an_invalidation_during_the_failure_paths_re_read_leaves_nothing(
    make_redis_cache: Any, monkeypatch: pytest.MonkeyPatch, how: str, failure: str
) -> None:
    # The failing computation has read the key's entry (the stale value, or a miss) and waits;
    # the key is invalidated, cleared or primed, here or in another process; then it goes on.
    # Nothing it writes survives, and calls made after the invalidation returned, in either
    # process, never get the old value or the remembered error.
    read = RedisCache.peek_kept
    hold = asyncio.Event()
    reading = asyncio.Event()

    async def read_then_wait(self: RedisCache, key: Any) -> Any:
        found = await read(self, key)
        if not hold.is_set():
            reading.set()
            await hold.wait()
        return found

    monkeypatch.setattr(RedisCache, "peek_kept", read_then_wait)
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    f_there = memoize(make_redis_cache(), there, clock)
    here.plan = ["old", Throttled("eur")] if failure == "stale" else [Throttled("eur")]
    if failure == "stale":
        async with asyncio.timeout(10):
            assert await f_here("eur") == "old"
        clock.now += 11
    async with asyncio.timeout(10):
        call = asyncio.ensure_future(f_here("eur"))
        await reading.wait()
        f = f_here if how.endswith("here") else f_there
        if how.startswith("invalidate"):
            await f.acache_invalidate("eur")
        elif how.startswith("clear"):
            await f.acache_clear()
        else:
            await f.acache_prime("primed", "eur")
        hold.set()
        try:
            got: Any = await call
        except Throttled as exc:
            got = exc
    if how.endswith("here"):
        assert isinstance(got, Throttled)  # forgotten in its own process: nothing stale
    else:
        assert got == "old" or isinstance(got, Throttled)
    there.plan = ["new"]
    here.plan = ["new"]
    expected = "primed" if how.startswith("prime") else "new"
    async with asyncio.timeout(10):
        assert await f_there("eur") == expected
        assert await f_here("eur") == expected
