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
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis.asyncio import Redis
from redis_waits import until, waiting

from wq_memo import MISSING, worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import Namespace, key_names
from wq_memo.backends._redis_values import ValueCodec
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
@pytest.mark.parametrize("computes_in", ["this process", "another process"])
async def test_a_store_landing_around_a_clear_is_not_kept(
    computes_in: str,
    via: str,
    where: str,
    fillers: int,
    own_client: Redis,
    redis_namespace: str,
    sync_redis: Any,
    make_redis_cache: Make,
) -> None:
    """The computation is released while the clear is held at one point of its scan, and its
    store lands there (on another pooled connection, or from another process): once the clear
    has returned, the value is not in Redis, and the next call computes afresh."""
    cache = RedisCache(own_client, namespace=redis_namespace, timeout=WAIT)
    holder = cache if computes_in == "this process" else make_redis_cache()
    names = key_names(redis_namespace, CallKey("f", (0,)))
    if fillers:  # another function's entries, so that the clear scans in several steps
        pipe = sync_redis.pipeline(transaction=False)
        for i in range(fillers):
            pipe.set(key_names(redis_namespace, CallKey("g", (i,))).value, b"x")
        pipe.execute()
    scan = ScanGate(own_client, where, names.lock)
    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    async def compute(k: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        return {"computed": k, "call": calls}

    f = worker_queue(cache=cache, name="f")(compute)
    computes = f if holder is cache else worker_queue(cache=holder, name="f")(compute)

    async def clear() -> None:
        if via == "acache_clear":
            await f.acache_clear()
        else:
            await cache.clear()

    try:
        async with asyncio.timeout(WAIT):
            # Several connections in the pool, as a busy process has.
            await asyncio.gather(*(cache.get(CallKey("h", (i,))) for i in range(4)))
            old = asyncio.create_task(computes(0))
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
            assert not sync_redis.exists(Namespace(redis_namespace).epoch)  # nothing stays
            assert holder.stats().lock_lost == 1
            assert await f(0) == {"computed": 0, "call": 2}  # computed afresh, and stored
            assert await f.acache_peek(0) == {"computed": 0, "call": 2}
        if fillers:
            assert scan.scans > 1
            assert not sync_redis.exists(key_names(redis_namespace, CallKey("g", (0,))).value)
    finally:
        await f.queue.aclose()
        await computes.queue.aclose()
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


# -- a prime wins over a computation under way (issue 17, item 2) -------------------------------


class Source:
    """An async function of a key returning f"{key}#{n}" for its n-th computation, held by a
    gate; ``started`` is set once it runs."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        await self.gate.wait()
        return f"{key}#{n}"


def _seed(sync_redis: Any, name: bytes, value: Any, age: float) -> None:
    """Store value as if written age seconds ago (JSON format), for two minutes."""
    data = ValueCodec(None, lambda: time.time() - age).dumps(name, value)
    sync_redis.set(name, data, px=120_000)


@pytest.mark.parametrize("during", ["miss", "background refresh", "refresh()", "other process"])
async def test_a_prime_is_never_overwritten_by_a_computation_begun_before_it(
    during: str, make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=120)
    source = Source()
    f = worker_queue(cache=cache, name="src", refresh_after=30)(source)
    name = key_names(cache.namespace, CallKey("src", ("k",))).value
    other = make_redis_cache(ttl=120)  # another process computing the key
    try:
        async with asyncio.timeout(WAIT):
            if during == "miss":
                computing = asyncio.create_task(f("k"))
            elif during == "background refresh":
                _seed(sync_redis, name, "old", age=50)  # due: refresh_after is 30
                assert await f("k") == "old"  # served at once; the refresh starts
                computing = None
            elif during == "refresh()":
                _seed(sync_redis, name, "old", age=0)
                computing = asyncio.create_task(f.refresh("k"))
            else:
                computing = asyncio.create_task(
                    other.get_or_compute(CallKey("src", ("k",)), lambda: source("k"))
                )
            await source.started.wait()
            await f.acache_prime("primed", "k")
            assert await f("k") == "primed"
            source.gate.set()
            if computing is not None:
                assert await computing == "k#1"  # its callers get their own result ...
            else:
                await until(lambda: cache.stats().lock_lost == 1)  # its store was refused
            assert await f.acache_peek("k") == "primed"  # ... which did not overwrite the prime
            assert await f("k") == "primed"
        assert source.calls == 1
    finally:
        await f.queue.aclose()


async def test_the_waiters_of_a_computation_get_the_primed_value(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    holder, waiter = make_redis_cache(), make_redis_cache()
    key = CallKey("src", ("k",))
    names = key_names(holder.namespace, key)
    source = Source()
    async with asyncio.timeout(WAIT):
        computing = asyncio.create_task(holder.get_or_compute(key, lambda: source("k")))
        await source.started.wait()
        waiting = asyncio.create_task(waiter.get_or_compute(key, lambda: source("k")))
        await until(lambda: sync_redis.pubsub_numsub(names.channel)[0][1] == 1)
        await holder.set(key, "primed")
        assert await waiting == "primed"  # woken by the prime, not by the computation
        source.gate.set()
        assert await computing == "k#1"
    assert await waiter.get(key) == "primed"
    assert source.calls == 1
    assert holder.stats().lock_lost == 1


# -- f.refresh() stores through the fenced path (issue 17, item 1) ------------------------------


@pytest.mark.parametrize("how", ["acache_invalidate", "acache_clear", "delete elsewhere"])
async def test_a_refresh_never_stores_after_an_invalidation(
    how: str, make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=120)
    source = Source()
    f = worker_queue(cache=cache, name="src")(source)
    name = key_names(cache.namespace, CallKey("src", ("k",))).value
    _seed(sync_redis, name, "old", age=0)
    try:
        async with asyncio.timeout(WAIT):
            refreshing = asyncio.create_task(f.refresh("k"))
            await source.started.wait()
            if how == "acache_invalidate":
                assert await f.acache_invalidate("k") is True
            elif how == "acache_clear":
                await f.acache_clear()
            else:
                assert await make_redis_cache().delete(CallKey("src", ("k",))) is True
            source.gate.set()
            assert await refreshing == "k#1"  # its caller gets it ...
            assert await f.acache_peek("k") is MISSING  # ... but it is not stored
            assert not sync_redis.exists(name)
            assert await f("k") == "k#2"  # computed afresh
            assert await f.acache_peek("k") == "k#2"
    finally:
        await f.queue.aclose()


async def test_a_refresh_replaces_the_entry_and_readers_get_the_old_one_meanwhile(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=120)
    source = Source()
    f = worker_queue(cache=cache, name="src")(source)
    _seed(sync_redis, key_names(cache.namespace, CallKey("src", ("k",))).value, "old", age=0)
    try:
        async with asyncio.timeout(WAIT):
            refreshing = asyncio.create_task(f.refresh("k"))
            await source.started.wait()
            assert await f("k") == "old"
            source.gate.set()
            assert await refreshing == "k#1"
            assert await f.acache_peek("k") == "k#1"
            assert await f("k") == "k#1"
    finally:
        await f.queue.aclose()


# -- peeking counts nothing (issue 17, item 7) --------------------------------------------------


async def test_peeking_adds_nothing_to_the_stats(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    f = worker_queue(cache=cache, name="src")(Source())
    await f.acache_prime("primed", "k")
    before = cache.stats()

    def counted() -> Any:
        # Everything but the round trips, which a peek makes like any read.
        return dataclasses.replace(cache.stats(), round_trips=before.round_trips)

    async with asyncio.timeout(WAIT):
        assert await f.acache_peek("k") == "primed"
        assert await f.acache_peek("nothing") is MISSING
        assert counted() == before
        assert await cache.peek(CallKey("src", ("k",))) == "primed"
    assert counted() == before
    assert cache.stats().round_trips == before.round_trips + 3
    assert f.cache_info() == (0, 0, 0, None, None, 0, 0, 0, 0, 0)


# -- what the queue counts (issue 22) ------------------------------------------------------------


async def test_the_queue_counts_each_computation_once(make_redis_cache: Make) -> None:
    cache, elsewhere = make_redis_cache(), make_redis_cache()
    gate = asyncio.Event()
    started: dict[int, asyncio.Event] = {0: asyncio.Event(), 1: asyncio.Event()}

    async def compute(k: int) -> int:
        started[k].set()
        await gate.wait()
        return k

    f = worker_queue(cache=cache, name="count", maxsize=1)(compute)
    g = worker_queue(cache=elsewhere, name="count", maxsize=1)(compute)  # another process
    try:
        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(f(0))
            await started[0].wait()
            assert (f.queue.running, f.queue.computing, f.queue.waiting) == (True, 1, 0)
            second = asyncio.create_task(f(1))  # its lock taken, waits for f's only slot
            await until(lambda: f.queue.waiting == 1)
            assert f.queue.computing == 1
            joined = asyncio.create_task(f(0))
            waiting_elsewhere = asyncio.create_task(g(0))  # waits for f's computation
            names = key_names(cache.namespace, CallKey("count", (0,)))
            await until(lambda: waiting(elsewhere, names.channel) == 1)
            assert (f.queue.computing, f.queue.waiting) == (1, 1)
            assert (g.queue.computing, g.queue.waiting) == (0, 0)  # it computes nothing
            gate.set()
            assert [await t for t in (first, second, joined, waiting_elsewhere)] == [0, 1, 0, 0]
            assert (f.queue.computing, f.queue.waiting) == (0, 0)
    finally:
        await f.queue.aclose()
        await g.queue.aclose()
