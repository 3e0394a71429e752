"""Refresh-ahead with cache_if and ttl through RedisCache (issue 20): the write time and the expiry
each entry has in Redis set its due time in every process; a refresh's result goes through the
policy in the fenced store, as a computation's does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo import worker_queue
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0
KEY = CallKey("m.f", ("k",))


def _seed(sync_redis: Any, names: KeyNames, value: Any, age: float, left: float | None) -> None:
    """Store value as if written age seconds ago, expiring in left seconds (None: never)."""
    data = ValueCodec(None, lambda: time.time() - age).dumps(names.value, value)
    if left is None:
        sync_redis.set(names.value, data)
    else:
        sync_redis.set(names.value, data, px=round(left * 1000))


class Source:
    """An async function of a key returning f"{key}#{n}" for its n-th computation, optionally
    held by a gate."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls = 0
        self.gate = gate
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return f"{key}#{n}"


def short_or_cache(value: Any) -> float | None:
    """A ttl function: 20 s for a value of a key starting with "s", else the cache's ttl."""
    return 20.0 if str(value).startswith("s") else None


def _memoized(cache: RedisCache, source: Source, **kwargs: Any) -> Any:
    kwargs.setdefault("refresh_after", 30)
    return worker_queue(cache=cache, name="src", **kwargs)(source)


def _names(cache: RedisCache, *args: Any) -> KeyNames:
    return key_names(cache.namespace, CallKey("src", cachetools.keys.hashkey(*args)))


async def test_get_with_lifetime_reads_the_age_and_the_lifetime_in_one_round_trip(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=100)
    names = key_names(cache.namespace, KEY)
    async with asyncio.timeout(WAIT):
        assert await cache.get_with_lifetime(KEY) == (MISSING, None, None)
        _seed(sync_redis, names, "v", age=5, left=15)
        value, age, lifetime = await cache.get_with_lifetime(KEY)
        assert value == "v"
        assert age is not None
        assert lifetime is not None
        assert 5 <= age < 5 + WAIT
        assert 19 <= lifetime <= 20 + WAIT  # its age plus what its expiry leaves
        _seed(sync_redis, names, "v", age=5, left=None)
        assert (await cache.get_with_lifetime(KEY))[2] is None  # no expiry
    assert (cache.stats().hits, cache.stats().misses) == (2, 1)


async def test_an_entry_written_elsewhere_is_due_at_its_part_of_its_own_lifetime(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    # The cache's ttl (100) is the reference: an entry living 20 s is due 20 * 30 / 100 = 6 s
    # after its write, whichever process wrote it; one living 100 s after refresh_after (30 s).
    source = Source()
    cache = make_redis_cache(ttl=100)
    f = _memoized(cache, source, ttl=short_or_cache)
    _seed(sync_redis, _names(cache, "s1"), "short", age=3, left=17)  # due in 3 s
    _seed(sync_redis, _names(cache, "s2"), "short", age=8, left=12)  # due 2 s ago
    _seed(sync_redis, _names(cache, "l"), "long", age=8, left=92)  # due in 22 s
    async with asyncio.timeout(WAIT):
        assert await f("s1") == "short"
        assert await f("l") == "long"
        await asyncio.sleep(0)
        assert source.calls == 0
        now = time.monotonic()
        due = f._refresher.due
        assert 1 < due[CallKey("src", ("s1",))] - now <= 3
        assert 20 < due[CallKey("src", ("l",))] - now <= 22
        assert await f("s2") == "short"  # due: served at once, refreshed ahead
        await until(lambda: source.calls == 1, WAIT)
        await until(lambda: not sync_redis.exists(_names(cache, "s2").lock), WAIT)
        assert await f("s2") == "s2#1"
    # The refreshed value lives 20 s in Redis, as its ttl says, and is due 6 s after its write.
    assert 0 < sync_redis.pttl(_names(cache, "s2").value) <= 20_000
    assert 4 < f._refresher.due[CallKey("src", ("s2",))] - time.monotonic() <= 6


async def test_a_refreshed_result_cache_if_refuses_is_not_stored_and_the_entry_stays(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    source = Source()
    cache = make_redis_cache(ttl=120)
    f = _memoized(cache, source, cache_if=lambda v: v == "k#0", refresh_backoff=1000)
    names = _names(cache, "k")
    _seed(sync_redis, names, "k#0", age=40, left=80)
    async with asyncio.timeout(WAIT):
        assert await f("k") == "k#0"
        await until(lambda: f.cache_info().uncached == 1, WAIT)
        await until(lambda: not sync_redis.exists(names.lock), WAIT)
        assert await f("k") == "k#0"  # the entry stays, served until it expires
    assert source.calls == 1  # not tried again before the back-off
    assert sync_redis.get(names.value)[12:] == b'"k#0"'
    assert 0 < sync_redis.pttl(names.value) <= 80_000  # its expiry unchanged
    info = f.cache_info()
    assert (info.refreshes, info.refresh_failures) == (1, 0)


@pytest.mark.parametrize(
    "options",
    [{"cache_if": lambda v: True}, {"ttl": 50}, {"ttl": short_or_cache}],
    ids=["cache_if", "ttl", "ttl_function"],
)
async def test_an_invalidation_during_a_refresh_wins_with_the_policy(
    make_redis_cache: Make,
    sync_redis: Any,
    options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = Source(asyncio.Event())
    cache = make_redis_cache(ttl=120)
    refreshed = asyncio.Event()
    real = RedisCache.refresh

    async def refresh(self: RedisCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real(self, *args, **kwargs)
        finally:
            refreshed.set()

    monkeypatch.setattr(RedisCache, "refresh", refresh)
    f = _memoized(cache, source, **options)
    names = _names(cache, "k")
    _seed(sync_redis, names, "k#0", age=40, left=80)
    async with asyncio.timeout(WAIT):
        assert await f("k") == "k#0"
        await source.started.wait()
        assert await f.acache_invalidate("k")
        assert source.gate is not None
        source.gate.set()
        await refreshed.wait()  # the forgotten refresh ended, without storing
        assert await f.acache_peek("k") is MISSING
        assert await f("k") == "k#2"


async def test_a_number_ttl_on_redis_is_the_reference_refresh_after_must_be_below(
    make_redis_cache: Make,
) -> None:
    async def g(x: int) -> int:
        return x

    cache = make_redis_cache(ttl=100)
    with pytest.raises(ValueError, match="below ttl=20"):
        worker_queue(cache=cache, name="g1", ttl=20, refresh_after=30)(g)
    # ttl= replaces the cache's ttl with Redis: entries living 200 s may be refreshed at 150.
    worker_queue(cache=cache, name="g2", ttl=200, refresh_after=150)(g)


async def test_a_refresh_whose_write_an_invalidation_elsewhere_refused_dates_the_entry_there(
    make_redis_cache: Make, sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Process A refreshes; process B invalidates the key meanwhile and stores a short-lived
    # value (20 s: due 6 s after its write). A's refresh finishes after that: its long-lived
    # result (the cache's 120 s) is refused by the fence. A dates the entry by what Redis
    # holds, not by the write it did not make (which put it due 30 s after: expired by then,
    # never refreshed ahead in A).
    gate, started, refreshed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real = RedisCache.refresh

    async def refresh(self: RedisCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real(self, *args, **kwargs)
        finally:
            refreshed.set()

    monkeypatch.setattr(RedisCache, "refresh", refresh)

    async def in_a(key: str) -> str:
        started.set()
        await gate.wait()
        return "long, from A"

    async def in_b(key: str) -> str:
        return "short, from B"

    def ttl(value: Any) -> float | None:
        return 20.0 if str(value).startswith("short") else None

    cache_a, cache_b = make_redis_cache(ttl=120), make_redis_cache(ttl=120)
    a: Any = worker_queue(cache=cache_a, name="src", ttl=ttl, refresh_after=30)(in_a)
    b = worker_queue(cache=cache_b, name="src", ttl=ttl, refresh_after=30)(in_b)
    names = _names(cache_a, "k")
    key = CallKey("src", ("k",))
    _seed(sync_redis, names, "short, seeded", age=7, left=13)  # due 1 s ago
    async with asyncio.timeout(WAIT):
        assert await a("k") == "short, seeded"  # refreshed in the background, held
        await started.wait()
        assert await b.acache_invalidate("k")
        assert await b("k") == "short, from B"
        written = time.monotonic()
        gate.set()
        await refreshed.wait()
        await asyncio.sleep(0)  # the refresh's end, past the cache's refresh()
        assert sync_redis.get(names.value)[12:] == b'"short, from B"'
        assert await a("k") == "short, from B"
    assert a._refresher.due[key] - written <= 6  # B's entry: due 6 s after its write
    assert a.cache_info().refreshes == 1
