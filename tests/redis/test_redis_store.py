"""The store path of RedisCache: every write (a computation's result, a refresh, a prime) keeps
the rules, whatever the number of pooled connections (issue 22, issue 17 items 1, 2 and 7).

- Once a clear has returned, no result of a computation that began before it is stored, however
  its store interleaves with the clear's SCAN.
- A primed value is never overwritten by a computation that began before the prime.
- f.refresh() stores through the same fenced path as a computation.
- Peeking counts nothing; the queue counts one computation once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis.asyncio import Redis

from wq_memo import MISSING, worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0


class ScanGate:
    """Wraps a client's SCAN so that a test can hold the clear at one point of its scan:
    ``before`` the first SCAN is sent, once a SCAN reply ``lists`` a given name, or after the
    ``last`` reply (before the clear removes what that reply listed)."""

    def __init__(self, client: Redis, where: str, name: bytes) -> None:
        self.where = where
        self.name = name
        self.reached = asyncio.Event()
        self.resume = asyncio.Event()
        self.scans = 0
        self._scan = client.scan
        client.scan = self.scan  # type: ignore[method-assign,assignment]

    async def _hold(self) -> None:
        if not self.reached.is_set():
            self.reached.set()
            await self.resume.wait()

    async def scan(self, cursor: int = 0, **kwargs: Any) -> Any:
        self.scans += 1
        if self.where == "before":
            await self._hold()
        reply = await self._scan(cursor, **kwargs)
        if (self.where == "lists" and self.name in reply[1]) or (
            self.where == "last" and not int(reply[0])
        ):
            await self._hold()
        return reply


@pytest.fixture
async def own_client(redis_url: str) -> AsyncIterator[Redis]:
    """A client with room for many pooled connections, closed after the test."""
    client = Redis.from_url(redis_url, max_connections=20)
    yield client
    await client.aclose()


@pytest.mark.parametrize("fillers", [0, 2500], ids=["one-scan", "several-scans"])
@pytest.mark.parametrize("where", ["before", "lists", "last", "after"])
@pytest.mark.parametrize("via", ["acache_clear", "cache.clear"])
async def test_a_store_landing_around_a_clear_is_not_kept(
    via: str,
    where: str,
    fillers: int,
    own_client: Redis,
    redis_namespace: str,
    sync_redis: Any,
) -> None:
    """The computation is released while the clear is held at one point of its scan, and its
    store lands there (on another pooled connection): once the clear has returned, the value
    is not in Redis, and the next call computes afresh."""
    cache = RedisCache(own_client, namespace=redis_namespace, timeout=WAIT)
    names = key_names(redis_namespace, CallKey("f", (0,)))
    if fillers:  # another function's entries, so that the clear scans in several steps
        pipe = sync_redis.pipeline(transaction=False)
        for i in range(fillers):
            pipe.set(key_names(redis_namespace, CallKey("g", (i,))).value, b"x")
        pipe.execute()
    scan = ScanGate(own_client, where, names.lock)
    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    @worker_queue(cache=cache, name="f")
    async def f(k: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        return {"computed": k, "call": calls}

    async def clear() -> None:
        if via == "acache_clear":
            await f.acache_clear()
        else:
            await cache.clear()

    try:
        async with asyncio.timeout(WAIT):
            # Several connections in the pool, as a busy process has.
            await asyncio.gather(*(cache.get(CallKey("h", (i,))) for i in range(4)))
            old = asyncio.create_task(f(0))
            await started.wait()
            assert sync_redis.exists(names.lock)  # it holds the key's lock
            clearing = asyncio.create_task(clear())
            if where == "after":
                await clearing
            else:
                await scan.reached.wait()
            gate.set()
            assert await old == {"computed": 0, "call": 1}  # its callers get it: stored or not
            scan.resume.set()
            await clearing
            assert await f.acache_peek(0) is MISSING, f"stored after the clear ({where})"
            assert not sync_redis.exists(names.value)
            assert cache.stats().lock_lost == 1
            assert await f(0) == {"computed": 0, "call": 2}  # computed afresh, and stored
            assert await f.acache_peek(0) == {"computed": 0, "call": 2}
        if fillers:
            assert scan.scans > 1
            assert not sync_redis.exists(key_names(redis_namespace, CallKey("g", (0,))).value)
    finally:
        await f.queue.aclose()
        await cache.aclose()


def gated(cache: RedisCache, name: str) -> tuple[Any, asyncio.Event, asyncio.Event]:
    """A function on cache whose computations start, then wait for the gate."""
    gate, started = asyncio.Event(), asyncio.Event()

    @worker_queue(cache=cache, name=name)
    async def f(k: int) -> dict[str, int]:
        started.set()
        await gate.wait()
        return {"computed": k}

    return f, gate, started


async def test_the_clear_of_the_report_with_two_pooled_connections(make_redis_cache: Make) -> None:
    """The sequence of the report, without any gate inside the cache: a computation released
    just before acache_clear(), with two connections in the pool."""
    cache = make_redis_cache()
    for round_ in range(5):
        f, gate, started = gated(cache, f"report-{round_}")
        async with asyncio.timeout(WAIT):
            await asyncio.gather(cache.get(CallKey("x", ())), cache.get(CallKey("y", ())))
            task = asyncio.create_task(f(0))
            await started.wait()
            gate.set()
            await f.acache_clear()
            assert await f.acache_peek(0) is MISSING, f"round {round_}"
            assert await task == {"computed": 0}
        await f.queue.aclose()
