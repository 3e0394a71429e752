"""Single flight for thousands of keys, with a bounded number of connections (issue 11, item 1)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

import redis_procs
from redis_server import RedisServer
from redis_spawn import CTX, Procs
from redis_waits import until

from wq_memo.backends import CallKey
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]


def _named(url: str, name: str) -> str:
    """url with a client name, so that CLIENT LIST tells this cache's connections apart."""
    return f"{url}{'&' if '?' in url else '?'}client_name={name}"


class ConnectionWatch:
    """Polls CLIENT LIST for the connections named name: how many at most, and their
    subscriptions now."""

    def __init__(self, url: str, name: str) -> None:
        from redis.asyncio import Redis

        self.client = Redis.from_url(url)
        self.name = name
        self.most = 0
        self.subscriptions = 0
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    async def _poll(self) -> None:
        # Stops on the flag, not only when cancelled: a cancellation that arrives while
        # redis-py reads CLIENT LIST's reply can be lost, and the poll would run on.
        while not self.stopping:
            mine = [c for c in await self.client.client_list() if c.get("name") == self.name]
            self.most = max(self.most, len(mine))
            self.subscriptions = sum(int(c.get("sub", 0)) for c in mine)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> ConnectionWatch:
        self.task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.stopping = True
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()


@pytest.mark.timeout(180)  # a process to start, 5,000 keys to hold, each wait bounded itself
def test_waiting_on_5000_keys_of_another_process_uses_at_most_ten_connections(
    procs: Procs, redis_url: str, redis_namespace: str
) -> None:
    keys = 5000
    release = CTX.Event()
    procs.start(redis_procs.hold_many, redis_url, redis_namespace, keys, release)
    procs.expect("holding", 1, timeout=60)
    name = f"wq-waiter-{uuid.uuid4().hex[:8]}"
    computed = 0

    async def compute() -> str:
        nonlocal computed
        computed += 1
        return "computed here"

    async def wait_for_all() -> tuple[list[Any], int, Any]:
        cache = RedisCache(_named(redis_url, name), namespace=redis_namespace)
        async with asyncio.timeout(60), ConnectionWatch(redis_url, name) as watch:
            tasks = [
                asyncio.create_task(cache.get_or_compute(redis_procs.many_key(i), compute))
                for i in range(keys)
            ]
            # Every key is waited for at once: all 5,000 subscribed, on one connection.
            await until(lambda: watch.subscriptions == keys, 30, 0.02)
            release.set()
            results = await asyncio.gather(*tasks)
            await asyncio.sleep(0.1)  # one more poll after the last call
        await cache.aclose()
        return results, watch.most, cache.stats()

    results, most, stats = asyncio.run(wait_for_all())
    assert results == [f"v{i}" for i in range(keys)]
    assert computed == 0
    assert stats.computed == 0
    assert stats.waited == keys
    assert stats.redis_errors == 0
    assert most <= 8 + 2  # max_connections (8) for commands, pub/sub, the probe
    done = procs.expect("done", 1, timeout=60)
    assert done[0][2] is True
    assert done[0][3]["computed"] == keys


def test_eight_processes_of_200_callers_over_2000_cold_keys_compute_each_once(
    procs: Procs, redis_url: str, redis_namespace: str, sync_redis: Any
) -> None:
    go = CTX.Event()
    for seed in range(8):
        procs.start(redis_procs.swarm, redis_url, redis_namespace, 200, 2000, seed, go)
    procs.expect("ready", 8, timeout=60)
    go.set()
    done = procs.expect("done", 8, timeout=90)
    assert [message[2] for message in done] == [0] * 8  # every call got its key's value
    stats = [message[5] for message in done]
    assert int(sync_redis.get(f"{redis_namespace}:computations")) == 2000, stats
    assert sum(s["computed"] for s in stats) == 2000
    assert sum(s["fallbacks"] + s["wait_timeouts"] + s["redis_errors"] for s in stats) == 0


async def test_running_out_of_local_connections_waits_for_one(
    make_redis_cache: Make, redis_url: str
) -> None:
    name = f"wq-lanes-{uuid.uuid4().hex[:8]}"
    # The URL asks for a pool of 1,000 that gives up waiting after 1 ms: the cache's bound and
    # its patience win.
    url = _named(redis_url, name) + "&max_connections=1000&timeout=0.001"
    cache = make_redis_cache(url=url, max_connections=2)
    for i in range(50):
        await cache.set(CallKey("m.f", (i,)), i)
    async with asyncio.timeout(30), ConnectionWatch(redis_url, name) as watch:
        values = await asyncio.gather(*(cache.get(CallKey("m.f", (i % 50,))) for i in range(1000)))
        await asyncio.sleep(0.05)
    assert values == [i % 50 for i in range(1000)]
    stats = cache.stats()
    assert (stats.hits, stats.redis_errors) == (1000, 0)
    assert not cache._conn.down
    assert 1 <= watch.most <= 2 + 2


async def test_a_server_refusing_connections_degrades_to_local_computation(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from redis.asyncio import Redis

    admin = Redis.from_url(own_redis.url)
    await admin.config_set("maxclients", 3)
    fillers = [Redis.from_url(own_redis.url) for _ in range(2)]
    cache = RedisCache(own_redis.url, namespace="full", retry_interval=0.2)
    computed = 0

    async def compute(i: int) -> int:
        nonlocal computed
        computed += 1
        return i

    try:
        for filler in fillers:
            await filler.ping()  # admin and the two fillers: the server is full
        with caplog.at_level(logging.WARNING, logger="wq_memo"):
            async with asyncio.timeout(10):
                results = await asyncio.gather(
                    *(
                        cache.get_or_compute(CallKey("m.f", (i,)), partial(compute, i))
                        for i in range(20)
                    )
                )
        assert results == list(range(20))
        assert computed == 20
        stats = cache.stats()
        assert stats.fallbacks == 20
        assert stats.redis_errors >= 1
        # redis-py 8 reports "max number of clients reached"; older ones a lost connection.
        assert "computing without Redis" in caplog.text
        for filler in fillers:
            await filler.aclose()
        # Room again: after retry_interval the cache uses Redis without a restart.
        await asyncio.sleep(0.2)
        async with asyncio.timeout(10):
            await until(lambda: not cache._conn.down)
            await cache.set(CallKey("m.f", ("back",)), "stored")
            assert await cache.get(CallKey("m.f", ("back",))) == "stored"
    finally:
        await cache.aclose()
        for filler in fillers:
            await filler.aclose()
        await admin.aclose()
