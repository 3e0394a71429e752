"""Entries, locks and announcements written into Redis by something else; restarts mid-call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer
from redis_waits import until, waiting

from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
KEY = CallKey("m.f", ("hostile",))
SECRET = "h" * 32


async def _computed() -> str:
    return "computed"


@pytest.mark.parametrize("lock", ["no expiry", "a hash"])
async def test_a_foreign_lock_is_replaced_not_waited_for(
    lock: str, make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(wait=30)
    name = key_names(cache.namespace, KEY).lock
    if lock == "no expiry":
        sync_redis.set(name, "stuck for ever")
    else:
        sync_redis.hset(name, "f", "v")
        sync_redis.pexpire(name, 60_000)
    async with asyncio.timeout(5):  # far less than wait
        assert await cache.get_or_compute(KEY, _computed) == "computed"
    assert await cache.get(KEY) == "computed"
    assert cache.stats().bad_entries == 1


async def test_a_value_of_another_type_is_a_miss_and_computed_over(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    sync_redis.rpush(key_names(cache.namespace, KEY).value, "not a string")
    assert await cache.get(KEY) is MISSING
    assert await cache.get_or_compute(KEY, _computed) == "computed"
    assert await cache.get(KEY) == "computed"
    stats = cache.stats()
    assert (stats.bad_entries, stats.redis_errors) == (2, 0)


async def test_a_lock_held_for_a_day_costs_a_caller_at_most_wait(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(wait=0.3)
    sync_redis.set(key_names(cache.namespace, KEY).lock, "someone", px=86_400_000)
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert await cache.get_or_compute(KEY, _computed) == "computed"
    assert time.monotonic() - started < 0.3 + 0.5
    assert cache.stats().wait_timeouts == 1


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_forged_announcements_are_refused(
    secret: str | None, make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(secret=secret)
    names = key_names(cache.namespace, KEY)
    sync_redis.set(names.lock, "holder elsewhere", px=60_000)

    async def must_not_run() -> str:
        raise AssertionError("the waiter must wait for the holder")

    waiter = asyncio.create_task(cache.get_or_compute(KEY, must_not_run))
    async with asyncio.timeout(10):
        await until(lambda: waiting(cache, names.channel) == 1)
        forged = [b"dgarbage", b'dwq1j{"unterminated', b"d\x80\x81", b"dwq2p" + bytes(60)]
        for n, message in enumerate(forged, 1):
            sync_redis.publish(names.channel, message)
            await until(lambda n=n: cache.stats().bad_entries == n)  # type: ignore[misc]
        for message in (b"?", b"", b"x"):  # not announcements of a value: it looks again
            sync_redis.publish(names.channel, message)
        await asyncio.sleep(0.05)
        assert not waiter.done()
        good = b'wq1j"real"' if secret is None else None
        if good is None:
            writer = make_redis_cache(secret=secret)
            await writer.set(KEY, "real")  # the real holder's value, signed
            sync_redis.delete(names.lock)
            sync_redis.publish(names.channel, b"d")
        else:
            sync_redis.set(names.value, good)
            sync_redis.delete(names.lock)
            sync_redis.publish(names.channel, b"d" + good)
        assert await waiter == "real"


async def test_redis_restarted_while_callers_wait(own_redis: RedisServer) -> None:
    holder = RedisCache(own_redis.url, namespace="restart", timeout=0.5, retry_interval=0)
    waiter = RedisCache(own_redis.url, namespace="restart", timeout=0.5, retry_interval=0)
    started, release = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        started.set()
        await release.wait()
        return "holder's"

    async def own() -> str:
        return "waiter's"

    try:
        async with asyncio.timeout(20):
            first = asyncio.create_task(holder.get_or_compute(KEY, held))
            await started.wait()
            second = asyncio.create_task(waiter.get_or_compute(KEY, own))
            await until(lambda: waiter._subscriptions.current is not None)
            await asyncio.sleep(0.05)
            await asyncio.to_thread(own_redis.stop)
            await asyncio.to_thread(own_redis.start)  # same port, empty: the lock is gone
            # The waiter's subscription died with the server: it looks again, takes the lock
            # (the server lost it) and computes.
            assert await second == "waiter's"
            release.set()
            assert await first == "holder's"
        # The holder's lock was lost with the restart: its value is never stored (the
        # waiter's is, if the waiter could take the lock once the server was back).
        assert await waiter.get(KEY) in (MISSING, "waiter's")
        await until(lambda: holder.stats().lock_lost == 1)  # its store may be retried first
        assert await waiter.get(KEY) != "holder's"
    finally:
        await holder.aclose()
        await waiter.aclose()
