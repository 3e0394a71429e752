"""Losing the lock keys (FLUSHDB, an eviction) does not strand the callers waiting for them.

The holder's fenced store is refused, since its lock is gone, but it still announces that its
computation ended: the waiters look again then, not once the lease they last saw runs out.
Each test runs on a server of its own, since it flushes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer
from redis_waits import until, waiting

from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

KEY = CallKey("m.f", ("flushed",))
LEASE = 60.0
"""Far longer than each test: a waiter that sleeps out the lease fails the test's timeout."""


@pytest.fixture
def admin(own_redis: RedisServer) -> Iterator[Any]:
    """A synchronous client on the test's own server, to flush it or drop a lock."""
    import redis

    client = redis.Redis.from_url(own_redis.url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    client.close()


@pytest.mark.parametrize("loss", ["flushdb", "lock evicted"])
@pytest.mark.parametrize("ending", ["value", "error"])
async def test_waiters_learn_at_once_that_a_holder_without_its_lock_ended(
    loss: str, ending: str, own_redis: RedisServer, admin: Any
) -> None:
    holder = RedisCache(own_redis.url, namespace="lost", lease=LEASE, wait=2 * LEASE)
    waiter = RedisCache(own_redis.url, namespace="lost", lease=LEASE, wait=2 * LEASE)
    names = key_names(holder.namespace, KEY)
    started, release = asyncio.Event(), asyncio.Event()
    waiter_computed = 0

    async def held() -> str:
        started.set()
        await release.wait()
        if ending == "error":
            raise RuntimeError("the holder failed")
        return "holder's"

    async def own() -> str:
        nonlocal waiter_computed
        waiter_computed += 1
        return "waiter's"

    try:
        async with asyncio.timeout(15):
            first = asyncio.create_task(holder.get_or_compute(KEY, held))
            await started.wait()
            waiting_calls = [asyncio.create_task(waiter.get_or_compute(KEY, own)) for _ in range(2)]
            await until(lambda: waiting(waiter, names.channel) == 2)
            if loss == "flushdb":
                await asyncio.to_thread(admin.flushdb)
            else:
                assert await asyncio.to_thread(admin.delete, names.lock) == 1
            release.set()
            ended = time.monotonic()
            if ending == "error":
                with pytest.raises(RuntimeError, match="the holder failed"):
                    await first
            else:
                assert await first == "holder's"
            assert await asyncio.gather(*waiting_calls) == ["waiter's"] * 2
            learned = time.monotonic() - ended
        # About when the holder ended, not after the lease of 60 s.
        assert learned < 2.0, learned
        assert waiter_computed == 1  # one of the two took the lock; the other waited for it
        if ending == "value":
            assert holder.stats().lock_lost == 1  # its store was refused
        assert await waiter.get(KEY) == "waiter's"  # the holder's value was never stored
        assert waiter.stats().fallbacks == 0
    finally:
        await holder.aclose()
        await waiter.aclose()


async def test_a_lost_lock_held_anew_is_not_announced(own_redis: RedisServer, admin: Any) -> None:
    """A holder whose lock another computation took meanwhile wakes nobody: that computation's
    waiters wait for it."""
    holder = RedisCache(own_redis.url, namespace="lost", lease=LEASE, wait=2 * LEASE)
    names = key_names(holder.namespace, KEY)
    started, release = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        started.set()
        await release.wait()
        return "holder's"

    pubsub = admin.pubsub()
    try:
        pubsub.subscribe(names.channel)
        assert (await asyncio.to_thread(pubsub.get_message, timeout=5))["type"] == "subscribe"
        async with asyncio.timeout(15):
            first = asyncio.create_task(holder.get_or_compute(KEY, held))
            await started.wait()
            admin.set(names.lock, "another holder", px=int(LEASE * 1000))
            release.set()
            assert await first == "holder's"
        assert holder.stats().lock_lost == 1
        assert await holder.get(KEY) is MISSING
        assert admin.get(names.lock) == b"another holder"
        assert await asyncio.to_thread(pubsub.get_message, timeout=0.2) is None
    finally:
        pubsub.close()
        await holder.aclose()
