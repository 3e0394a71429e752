"""A dropped pub/sub connection is not Redis being down: the waiters subscribe again and wait on.

Redis drops a subscriber's connection on CLIENT KILL, and by itself when the subscriber's
output buffer passes ``client-output-buffer-limit pubsub``. Each test runs on a server of its
own, since it kills connections or changes the server's configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

import redis_procs
from redis_server import RedisServer
from redis_spawn import CTX, Procs
from redis_waits import until, waiting_anywhere

from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache, RedisCacheStats

pytest_plugins = ("redis_fixtures",)

KEYS = 200
WAIT = 30.0


@pytest.fixture
def admin(own_redis: RedisServer) -> Iterator[Any]:
    """A synchronous client on the test's own server, to kill connections and configure it."""
    import redis

    client = redis.Redis.from_url(own_redis.url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    client.close()


def _kill_subscribers(admin: Any, channel: bytes) -> None:
    assert admin.client_kill_filter(_type="pubsub") >= 1


def _overflow_subscriber_buffer(admin: Any, channel: bytes) -> None:
    # One message past the hard limit: Redis drops the subscriber's connection, as it does
    # when a subscriber falls behind a busy channel. The message is no announcement.
    admin.config_set("client-output-buffer-limit", "pubsub 65536 0 0")
    admin.publish(channel, b"?" + bytes(256 * 1024))


@pytest.mark.parametrize(
    "drop", [_kill_subscribers, _overflow_subscriber_buffer], ids=["client-kill", "buffer-limit"]
)
async def test_waiters_outlive_their_subscriber_connection(
    drop: Any, own_redis: RedisServer, admin: Any
) -> None:
    holder = RedisCache(own_redis.url, namespace="dropped", wait=WAIT, retry_interval=5.0)
    waiter = RedisCache(own_redis.url, namespace="dropped", wait=WAIT, retry_interval=5.0)
    started = 0
    all_started, release = asyncio.Event(), asyncio.Event()
    computed_by_waiter: list[int] = []

    async def held(key: int) -> dict[str, int]:
        nonlocal started
        started += 1
        if started == KEYS:
            all_started.set()
        await release.wait()
        return {"key": key, "by": 1}

    async def must_wait(key: int) -> dict[str, int]:
        computed_by_waiter.append(key)
        return {"key": key, "by": 2}

    keys = [CallKey("m.f", (k,)) for k in range(KEYS)]
    try:
        async with asyncio.timeout(60):
            holding = [
                asyncio.create_task(holder.get_or_compute(key, partial(held, k)))
                for k, key in enumerate(keys)
            ]
            await all_started.wait()
            waiting = [
                asyncio.create_task(waiter.get_or_compute(key, partial(must_wait, k)))
                for k, key in enumerate(keys)
                for _ in range(2)
            ]
            await until(lambda: waiting_anywhere(waiter) == 2 * KEYS, WAIT)
            first = waiter._subscriptions.current
            assert first is not None
            channel = key_names(waiter.namespace, keys[0]).channel
            await asyncio.to_thread(drop, admin, channel)
            await until(lambda: first.dead, WAIT)
            # Every waiter is back, waiting through a new subscription; none computed.
            await until(lambda: waiting_anywhere(waiter) == 2 * KEYS or computed_by_waiter, WAIT)
            assert computed_by_waiter == []
            assert waiter._subscriptions.current is not first
            assert not waiter._conn.down
            release.set()
            assert await asyncio.gather(*holding) == [{"key": k, "by": 1} for k in range(KEYS)]
            results = await asyncio.gather(*waiting)
        assert results == [{"key": k, "by": 1} for k in range(KEYS) for _ in range(2)]
        assert computed_by_waiter == []
        stats = waiter.stats()
        assert (stats.computed, stats.fallbacks) == (0, 0)
        assert stats.redis_errors >= 1  # the dropped connection is counted and logged
        assert not waiter._conn.down
    finally:
        await holder.aclose()
        await waiter.aclose()


@pytest.mark.timeout(120)  # a process to start, 2,000 keys to hold; each wait bounded itself
def test_a_process_waiting_on_2000_keys_of_another_computes_none_after_its_drop(
    procs: Procs, own_redis: RedisServer, admin: Any
) -> None:
    keys = 2000
    release = CTX.Event()
    procs.start(redis_procs.hold_many, own_redis.url, "dropped", keys, release)
    procs.expect("holding", 1, timeout=60)
    computed = 0

    async def compute() -> str:
        nonlocal computed
        computed += 1
        return "computed here"

    async def wait_for_all() -> tuple[list[Any], bool, RedisCacheStats]:
        cache = RedisCache(own_redis.url, namespace="dropped", wait=WAIT, retry_interval=5.0)
        try:
            async with asyncio.timeout(90):
                tasks = [
                    asyncio.create_task(cache.get_or_compute(redis_procs.many_key(i), compute))
                    for i in range(keys)
                ]
                await until(lambda: waiting_anywhere(cache) == keys, WAIT)
                first = cache._subscriptions.current
                assert first is not None
                await asyncio.to_thread(_kill_subscribers, admin, b"")
                await until(lambda: first.dead, WAIT)
                await until(lambda: waiting_anywhere(cache) == keys or computed > 0, WAIT)
                down = cache._conn.down
                release.set()
                results = await asyncio.gather(*tasks)
        finally:
            await cache.aclose()
        return results, down, cache.stats()

    results, down, stats = asyncio.run(wait_for_all())
    assert computed == 0
    assert not down
    assert results == [f"v{i}" for i in range(keys)]
    assert (stats.computed, stats.fallbacks, stats.waited) == (0, 0, keys)
    done = procs.expect("done", 1, timeout=60)
    assert done[0][2] is True
    assert done[0][3]["computed"] == keys


async def test_a_subscriber_lost_with_redis_itself_still_opens_the_breaker(
    own_redis: RedisServer,
) -> None:
    """When the connection drops because Redis is gone, the PING fails too: the breaker opens,
    and the waiters compute on their own at once, as with any failure of Redis."""
    holder = RedisCache(own_redis.url, namespace="gone", wait=WAIT, retry_interval=30.0)
    waiter = RedisCache(own_redis.url, namespace="gone", wait=WAIT, retry_interval=30.0)
    started, release = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        started.set()
        await release.wait()
        return "holder's"

    async def own() -> str:
        return "waiter's"

    key = CallKey("m.f", ("gone",))
    try:
        async with asyncio.timeout(20):
            first = asyncio.create_task(holder.get_or_compute(key, held))
            await started.wait()
            waiting_calls = [asyncio.create_task(waiter.get_or_compute(key, own)) for _ in range(3)]
            await until(lambda: waiting_anywhere(waiter) == 3, WAIT)
            await asyncio.to_thread(own_redis.stop)
            stopped = asyncio.get_running_loop().time()
            assert await asyncio.gather(*waiting_calls) == ["waiter's"] * 3
            took = asyncio.get_running_loop().time() - stopped
            release.set()
            assert await first == "holder's"
        assert waiter._conn.down
        assert waiter.stats().fallbacks == 3
        assert took < 5.0, took  # not the lease (10 s), nor the wait (30 s)
    finally:
        await holder.aclose()
        await waiter.aclose()
