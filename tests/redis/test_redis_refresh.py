"""Refresh-ahead through RedisCache: entry ages read with the entry, one refresh per key across
processes through the lease lock, nobody waiting for it (issue 12)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo import worker_queue
from wq_memo.backends import MISSING, CallKey, RefreshingCache
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0
KEY = CallKey("m.f", ("k",))


def _seed(sync_redis: Any, names: KeyNames, value: Any, age: float, ttl: float = 120) -> None:
    """Store value as if written age seconds ago (JSON format, Redis TTL of ttl seconds)."""
    data = ValueCodec(None, lambda: time.time() - age).dumps(names.value, value)
    sync_redis.set(names.value, data, px=round(ttl * 1000))


class Source:
    """An async function of a key returning f"{key}#{n}" for its n-th computation; each
    computation can be held by a gate, or fail."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls = 0
        self.gate = gate
        self.started = asyncio.Event()
        self.error: Exception | None = None

    async def __call__(self, key: str) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return f"{key}#{n}"


def _memoized(cache: RedisCache, source: Source, **kwargs: Any) -> Any:
    kwargs.setdefault("refresh_after", 30)
    return worker_queue(cache=cache, name="src", **kwargs)(source)


def _names(cache: RedisCache, *args: Any) -> KeyNames:
    return key_names(cache.namespace, CallKey("src", cachetools.keys.hashkey(*args)))


# -- the cache alone -----------------------------------------------------------------------------


async def test_redis_cache_is_a_refreshing_cache(make_redis_cache: Make) -> None:
    assert isinstance(make_redis_cache(), RefreshingCache)


async def test_get_with_age_reads_the_value_and_its_age_in_one_read(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    names = key_names(cache.namespace, KEY)
    async with asyncio.timeout(WAIT):
        assert await cache.get_with_age(KEY) == (MISSING, None)
        _seed(sync_redis, names, {"v": 1}, age=100)
        value, age = await cache.get_with_age(KEY)
        assert value == {"v": 1}
        assert age is not None
        assert 100 <= age < 100 + WAIT
        await cache.set(KEY, "new")
        value, age = await cache.get_with_age(KEY)
    assert value == "new"
    assert age is not None
    assert 0 <= age < WAIT
    assert (cache.stats().hits, cache.stats().misses) == (2, 1)


async def test_an_entry_of_the_previous_format_is_due_at_once(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    sync_redis.set(key_names(cache.namespace, KEY).value, b'wq1j"old"', px=60_000)
    async with asyncio.timeout(WAIT):
        value, age = await cache.get_with_age(KEY)
    assert value == "old"
    assert age is not None
    assert age > time.time() - 1  # as if written at the epoch


async def test_refresh_computes_and_replaces_the_entry_under_the_lock(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=120)
    names = key_names(cache.namespace, KEY)
    _seed(sync_redis, names, "old", age=50)
    gate = asyncio.Event()
    computing = asyncio.Event()
    other = make_redis_cache(ttl=120)  # another process

    async def compute() -> str:
        computing.set()
        await gate.wait()
        return "new"

    async def never() -> str:
        raise AssertionError("a refresh computed while another held the key")

    async with asyncio.timeout(WAIT):
        task = asyncio.create_task(cache.refresh(KEY, compute))
        await computing.wait()
        assert sync_redis.exists(names.lock)
        # While it runs, every reader gets the entry as it was, at once; another refresh gives up.
        value, age = await other.get_with_age(KEY)
        assert value == "old"
        assert age is not None
        assert age >= 50
        assert await other.refresh(KEY, never) == (False, MISSING)
        gate.set()
        assert await task == (True, "new")
        value, age = await other.get_with_age(KEY)
    assert value == "new"
    assert age is not None
    assert age < 50  # the refresh reset it
    assert not sync_redis.exists(names.lock)
    assert 0 < sync_redis.pttl(names.value) <= 120_000
    assert other.stats().refresh_skipped == 1
    assert cache.stats().computed == 1


async def test_refresh_gives_up_while_a_miss_is_being_computed(make_redis_cache: Make) -> None:
    holder, refresher = make_redis_cache(), make_redis_cache()
    gate = asyncio.Event()
    computing = asyncio.Event()

    async def compute() -> str:
        computing.set()
        await gate.wait()
        return "computed"

    async def never() -> str:
        raise AssertionError("a refresh computed while another held the key")

    async with asyncio.timeout(WAIT):
        task = asyncio.create_task(holder.get_or_compute(KEY, compute))
        await computing.wait()
        assert await refresher.refresh(KEY, never) == (False, MISSING)
        gate.set()
        assert await task == "computed"


async def test_a_failed_refresh_keeps_the_entry_and_frees_the_lock(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    names = key_names(cache.namespace, KEY)
    _seed(sync_redis, names, "old", age=50)

    async def fail() -> str:
        raise LookupError("source down")

    async def works() -> str:
        return "new"

    async with asyncio.timeout(WAIT):
        with pytest.raises(LookupError, match="source down"):
            await cache.refresh(KEY, fail)
        value, age = await cache.get_with_age(KEY)
        assert value == "old"
        assert age is not None
        assert age >= 50
        assert not sync_redis.exists(names.lock)
        assert await cache.refresh(KEY, works) == (True, "new")


async def test_a_delete_during_a_refresh_wins(make_redis_cache: Make, sync_redis: Any) -> None:
    cache, other = make_redis_cache(), make_redis_cache()
    names = key_names(cache.namespace, KEY)
    _seed(sync_redis, names, "old", age=50)
    gate = asyncio.Event()
    computing = asyncio.Event()

    async def compute() -> str:
        computing.set()
        await gate.wait()
        return "refreshed before the delete"

    async with asyncio.timeout(WAIT):
        task = asyncio.create_task(cache.refresh(KEY, compute))
        await computing.wait()
        assert await other.delete(KEY)
        gate.set()
        # Its own callers get what it computed; it is not stored.
        assert await task == (True, "refreshed before the delete")
        assert await other.get(KEY) is MISSING
    assert cache.stats().lock_lost == 1


async def test_refresh_without_redis_gives_up_without_computing(
    make_redis_cache: Make,
) -> None:
    cache = make_redis_cache(url="redis://127.0.0.1:1/0", timeout=0.5)

    async def never() -> str:
        raise AssertionError("computed without Redis")

    async with asyncio.timeout(WAIT):
        assert await cache.refresh(KEY, never) == (False, MISSING)
        assert await cache.get_with_age(KEY) == (MISSING, None)
    assert cache.stats().redis_errors >= 1


# -- through the decorator: two RedisCaches stand for two processes ------------------------------


@pytest.mark.parametrize("jitter", [0.0, 0.1])
async def test_refresh_after_must_be_below_the_redis_ttl(
    make_redis_cache: Make, jitter: float
) -> None:
    cache = make_redis_cache(ttl=60)
    with pytest.raises(ValueError, match=r"below the cache's ttl=60"):
        worker_queue(cache=cache, name="src", refresh_after=60 / (1 + jitter), jitter=jitter)(
            Source()
        )
    worker_queue(cache=cache, name="ok", refresh_after=50)(Source())  # below it: accepted
    worker_queue(cache=make_redis_cache(), name="src", refresh_after=10**6)(Source())  # no ttl


async def test_one_refresh_per_key_across_two_processes_that_both_find_it_due(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    gate = asyncio.Event()
    sources = [Source(gate), Source(gate)]
    caches = [make_redis_cache(ttl=120), make_redis_cache(ttl=120)]
    a, b = (_memoized(c, s) for c, s in zip(caches, sources, strict=True))
    names = _names(caches[0], "k")
    _seed(sync_redis, names, "k#0", age=40)
    async with asyncio.timeout(WAIT):
        # Both find the entry due at once; both get it at once.
        assert list(await asyncio.gather(a("k"), b("k"))) == ["k#0", "k#0"]
        await until(lambda: sum(s.calls for s in sources) == 1, WAIT)
        await until(lambda: sum(c.stats().refresh_skipped for c in caches) == 1, WAIT)
        # While the refresh runs, every call still gets the current value at once.
        assert list(await asyncio.gather(a("k"), b("k"))) == ["k#0", "k#0"]
        assert sum(s.calls for s in sources) == 1
        gate.set()
        await until(lambda: not sync_redis.exists(names.lock), WAIT)
        value, age = await caches[1].get_with_age(CallKey("src", cachetools.keys.hashkey("k")))
        assert value == "k#1"
        assert age is not None
        assert age < 30  # the refresh reset its age: it is fresh again
        assert list(await asyncio.gather(a("k"), b("k"))) == ["k#1", "k#1"]
    assert sum(s.calls for s in sources) == 1
    assert a.cache_info().refreshes == b.cache_info().refreshes == 1
    assert a.cache_info().refresh_failures == b.cache_info().refresh_failures == 0


async def test_a_failed_refresh_keeps_the_value_and_is_counted(
    make_redis_cache: Make, sync_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source()
    source.error = LookupError("source down")
    cache = make_redis_cache(ttl=120)
    f = _memoized(cache, source, refresh_backoff=1000)
    names = _names(cache, "k")
    _seed(sync_redis, names, "k#0", age=40)
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        async with asyncio.timeout(WAIT):
            assert await f("k") == "k#0"
            await until(lambda: f.cache_info().refresh_failures == 1, WAIT)
            assert await f("k") == "k#0"  # kept; not tried again before the back-off
    assert source.calls == 1
    assert f.cache_info().refreshes == 1
    assert sync_redis.get(names.value)[12:] == b'"k#0"'
    assert not sync_redis.exists(names.lock)
    assert "refreshing" in caplog.text
    assert "source down" in caplog.text


async def test_an_invalidation_in_another_process_during_a_refresh_wins(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    gate = asyncio.Event()
    sources = [Source(gate), Source()]
    caches = [make_redis_cache(ttl=120), make_redis_cache(ttl=120)]
    a, b = (_memoized(c, s) for c, s in zip(caches, sources, strict=True))
    names = _names(caches[0], "k")
    _seed(sync_redis, names, "k#0", age=40)
    async with asyncio.timeout(WAIT):
        assert await a("k") == "k#0"
        await sources[0].started.wait()  # a's refresh computes, under the lock
        assert await b.acache_invalidate("k")
        gate.set()
        await until(lambda: caches[0].stats().lock_lost == 1, WAIT)
        assert await b.acache_peek("k") is MISSING  # the refresh's result was not stored
        assert await b("k") == "k#1"  # computed afresh, after the invalidation
    assert sources[0].calls == sources[1].calls == 1
    assert await a("k") == "k#1"


async def test_an_invalidation_in_the_refreshing_process_wins(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    source = Source(asyncio.Event())
    cache = make_redis_cache(ttl=120)
    f = _memoized(cache, source)
    names = _names(cache, "k")
    _seed(sync_redis, names, "k#0", age=40)
    async with asyncio.timeout(WAIT):
        assert await f("k") == "k#0"
        await source.started.wait()
        assert await f.acache_invalidate("k")
        assert source.gate is not None
        source.gate.set()
        await until(lambda: cache.stats().lock_lost == 1, WAIT)
        assert await f.acache_peek("k") is MISSING
