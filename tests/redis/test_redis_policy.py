"""cache_if and ttl with a RedisCache: the policy decides inside the fenced store, the ttl is the
entry's expiry in Redis (cache_errors and stale_if_error: test_redis_policy_errors.py)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until, waiting_anywhere

from wq_memo import worker_queue
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0


def pttl(sync_redis: Any, cache: RedisCache, function: str, *args: Any) -> int:
    names = key_names(cache.namespace, CallKey(function, cachetools.keys.hashkey(*args)))
    return int(sync_redis.pttl(names.value))


async def test_a_ttl_function_sets_each_entrys_expiry_in_redis(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=3600)
    calls: list[str] = []

    @worker_queue(cache=cache, name="rate", ttl=lambda v: 5 if v == "" else None)
    async def rate(pair: str) -> str:
        calls.append(pair)
        return "" if pair == "empty" else pair.upper()

    async with asyncio.timeout(WAIT):
        assert await rate("empty") == ""
        assert await rate("eur") == "EUR"
        assert await rate("empty") == ""
        assert await rate("eur") == "EUR"
    assert calls == ["empty", "eur"]
    assert 0 < pttl(sync_redis, cache, "rate", "empty") <= 5000
    assert 5000 < pttl(sync_redis, cache, "rate", "eur") <= 3_600_000  # None: the cache's ttl


async def test_a_number_ttl_and_a_prime_take_the_policys_ttl(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=None)

    @worker_queue(cache=cache, name="num", ttl=7)
    async def num(x: int) -> int:
        return x

    async with asyncio.timeout(WAIT):
        await num(1)
        await num.acache_prime(20, 2)
    assert 0 < pttl(sync_redis, cache, "num", 1) <= 7000
    assert 0 < pttl(sync_redis, cache, "num", 2) <= 7000


async def test_a_result_cache_if_refuses_is_returned_not_stored(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    calls = 0
    gate = asyncio.Event()

    @worker_queue(cache=cache, name="maybe", cache_if=lambda v: v is not None)
    async def maybe(x: int) -> int | None:
        nonlocal calls
        calls += 1
        await gate.wait()
        return None if x == 0 else x

    async with asyncio.timeout(WAIT):
        callers = [asyncio.create_task(maybe(0)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*callers) == [None] * 3
        assert calls == 1  # joined in this process
        assert await maybe.acache_peek(0) is MISSING
        assert await maybe(0) is None
        assert calls == 2
        assert await maybe(5) == 5
        assert await maybe(5) == 5
    assert calls == 3
    assert pttl(sync_redis, cache, "maybe", 0) == -2  # no such key
    assert maybe.cache_info().uncached == 2


async def test_a_bad_ttl_with_redis_is_logged_once_and_returned_uncached(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_redis_cache()
    ttl: Any = lambda v: -1  # noqa: E731  # a bad value, as a function may return one

    @worker_queue(cache=cache, name="bad", ttl=ttl)
    async def bad(x: int) -> int:
        return x

    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        async with asyncio.timeout(WAIT):
            assert await bad(1) == 1
            assert await bad(1) == 1
            assert await bad.acache_peek(1) is MISSING
    assert len([r for r in caplog.records if "ttl(result) returned -1" in r.getMessage()]) == 1
    assert bad.cache_info().uncached == 2


async def test_a_second_process_waiting_for_a_result_not_stored_computes_it_itself(
    make_redis_cache: Make,
) -> None:
    """Two RedisCaches on one namespace stand for two processes."""
    here, there = make_redis_cache(), make_redis_cache()
    started = asyncio.Event()
    gate = asyncio.Event()
    calls: list[str] = []

    def make(cache: RedisCache, label: str) -> Any:
        @worker_queue(cache=cache, name="shared", cache_if=lambda v: v != "skip")
        async def shared(x: str) -> str:
            calls.append(label)
            started.set()
            await gate.wait()
            return x

        return shared

    f_here, f_there = make(here, "here"), make(there, "there")
    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(f_here("skip"))
        await started.wait()
        second = asyncio.create_task(f_there("skip"))
        await until(lambda: waiting_anywhere(there) == 1)  # it waits for the first's result
        gate.set()
        assert list(await asyncio.gather(first, second)) == ["skip", "skip"]
    assert calls == ["here", "there"]  # not stored: the waiter computed it itself


@pytest.mark.parametrize("seconds", [math.inf, 1e300, 10**400], ids=["inf", "1e300", "10**400"])
async def test_a_ttl_past_what_redis_keeps_stores_the_entry_without_expiry(
    make_redis_cache: Make, sync_redis: Any, seconds: float
) -> None:
    # As with a dict, a lifetime without end: the entry is kept until Redis evicts it, rather
    # than the call failing (OverflowError) or the store being refused again and again.
    cache = make_redis_cache(ttl=60)
    calls = 0

    @worker_queue(cache=cache, name="far", ttl=lambda v: seconds)
    async def far(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    async with asyncio.timeout(WAIT):
        assert await far(1) == 1
        assert await far(1) == 1
        assert await far.refresh(2) == 2
        with pytest.raises(ValueError, match="RedisCache: ttl must be"):
            await far.acache_prime(3, 3)  # set() refuses such a ttl, as it always has
    assert calls == 2
    assert pttl(sync_redis, cache, "far", 1) == -1  # stored, no expiry
    assert pttl(sync_redis, cache, "far", 2) == -1
    assert far.cache_info().uncached == 0
