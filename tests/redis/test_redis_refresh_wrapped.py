"""Refresh-ahead with cache_errors and stale_if_error through RedisCache (issue 20), across two
caches on one namespace: each process reads an entry as kept (``get_kept_with_lifetime``),
unwraps it (a remembered error raised, a fresh value served, an expired one a miss) and dates
it by the expiry the entry carries, not by its Redis key's, which includes the stale window. A
failing refresh leaves the fresh entry, a stale value served is not refreshed ahead before
refresh_backoff, one process refreshes while the other serves, and invalidation wins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo import CachedError, worker_queue
from wq_memo._policy import Kept
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0


class Source:
    """An async function of a key returning f"{key}#{n}" for its n-th computation; raises
    ``failure`` if set; held by ``gate`` if set."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.failure: Exception | None = None
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> str:
        self.calls += 1
        n = self.calls
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return f"{key}#{n}"


def _names(cache: RedisCache, key: str) -> KeyNames:
    return key_names(cache.namespace, CallKey("src", cachetools.keys.hashkey(key)))


def _seed_kept(
    sync_redis: Any,
    names: KeyNames,
    value: Any,
    age: float,
    left: float,
    stale: float,
    warned: bool = False,
) -> None:
    """Store a Kept value as if written age seconds ago, expiring in ``left`` seconds (on the
    wall clock) and kept in Redis for ``stale`` more."""
    now = time.time()
    entry = Kept(value, now + left, now + left + stale, None, warned)
    data = ValueCodec(None, lambda: now - age).dumps(names.value, entry)
    sync_redis.set(names.value, data, px=round((left + stale) * 1000))


def _memoized(cache: RedisCache, source: Source, **options: Any) -> Any:
    options.setdefault("refresh_after", 30)
    options.setdefault("ttl", 50)
    return worker_queue(cache=cache, name="src", **options)(source)


async def test_get_kept_with_lifetime_answers_the_entry_as_kept(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=100)
    key = CallKey("src", cachetools.keys.hashkey("k"))
    names = _names(cache, "k")
    async with asyncio.timeout(WAIT):
        assert await cache.get_kept_with_lifetime(key) == (MISSING, None, None)
        _seed_kept(sync_redis, names, "v", age=10, left=5, stale=100)
        entry, age, lifetime = await cache.get_kept_with_lifetime(key)
    assert type(entry) is Kept
    assert entry.value == "v"
    assert age is not None
    assert lifetime is not None
    assert 10 <= age < 10 + WAIT
    assert 114 <= lifetime <= 115 + WAIT  # its Redis key's: the stale window included


async def test_a_kept_value_is_due_by_its_own_expiry_not_by_its_redis_keys(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    # ttl=50 is the reference: an entry living 30 s (written 25 s ago, expiring in 5) is due
    # 30 * 30 / 50 = 18 s after its write, 7 s ago. By its Redis key's lifetime (225 s) it
    # would be due after refresh_after, 5 s from now.
    source = Source()
    a, b = make_redis_cache(ttl=100), make_redis_cache(ttl=100)
    fa = _memoized(a, source, stale_if_error=200)
    fb = _memoized(b, Source(), stale_if_error=200)
    names = _names(a, "k")
    _seed_kept(sync_redis, names, "v", age=25, left=5, stale=200)
    async with asyncio.timeout(WAIT):
        assert await fa("k") == "v"
        await until(lambda: source.calls == 1, WAIT)
        await until(lambda: not sync_redis.exists(names.lock), WAIT)
        assert await fb("k") == "k#1"  # the other process reads the refreshed value
    assert fa.cache_info().refreshes == 1
    assert fb.cache_info().refreshes == 0


async def test_one_process_refreshes_while_the_other_serves_the_entry(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    first, second = Source(), Source()
    first.gate = gate = asyncio.Event()
    a, b = make_redis_cache(ttl=100), make_redis_cache(ttl=100)
    fa = _memoized(a, first, stale_if_error=100, cache_errors={TimeoutError: 5.0})
    fb = _memoized(b, second, stale_if_error=100, cache_errors={TimeoutError: 5.0})
    names = _names(a, "k")
    _seed_kept(sync_redis, names, "v", age=40, left=10, stale=100)
    async with asyncio.timeout(WAIT):
        assert await fa("k") == "v"  # due: refreshed ahead by this process
        await first.started.wait()
        assert await fb("k") == "v"  # due here too: the other's refresh holds the key
        assert await fb("k") == "v"
        await until(lambda: b.stats().refresh_skipped == 1, WAIT)  # it tried, and left it
        gate.set()
        await until(lambda: not sync_redis.exists(names.lock), WAIT)
        assert await fb("k") == "k#1"
    assert second.calls == 0  # the other process never computed it


async def test_a_failing_refresh_leaves_a_fresh_value_not_a_remembered_error(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    source = Source()
    a, b = make_redis_cache(ttl=100), make_redis_cache(ttl=100)
    fa = _memoized(a, source, cache_errors={TimeoutError: 5.0}, refresh_backoff=1000)
    # Not due in the other process (refresh_after 45): it reads the entry and refreshes
    # nothing, neither racing the peek below nor running past the test.
    fb = _memoized(b, Source(), cache_errors={TimeoutError: 5.0}, refresh_after=45)
    names = _names(a, "k")
    data = ValueCodec(None, lambda: time.time() - 40).dumps(names.value, "v")
    sync_redis.set(names.value, data, px=10_000)  # a plain value (no stale window), due
    source.failure = TimeoutError("slow")
    async with asyncio.timeout(WAIT):
        assert await fa("k") == "v"
        await until(lambda: fa.cache_info().refresh_failures == 1, WAIT)
        await until(lambda: not sync_redis.exists(names.lock), WAIT)
        assert await fb("k") == "v"
        assert await fb.acache_peek("k") == "v"
    assert source.calls == 1
    assert fb.cache_info().refreshes == 0


async def test_a_remembered_error_is_raised_in_both_and_never_refreshed_ahead(
    make_redis_cache: Make,
) -> None:
    first, second = Source(), Source()
    a, b = make_redis_cache(ttl=100), make_redis_cache(ttl=100)
    fa = _memoized(a, first, cache_errors={TimeoutError: 60.0}, refresh_after=1, ttl=50)
    fb = _memoized(b, second, cache_errors={TimeoutError: 60.0}, refresh_after=1, ttl=50)
    first.failure = TimeoutError("slow", 1)
    async with asyncio.timeout(WAIT):
        with pytest.raises(TimeoutError):
            await fa("k")
        for f in (fa, fb, fa, fb):
            with pytest.raises(TimeoutError) as raised:
                await f("k")
            assert raised.value.args == ("slow", 1)
        assert await fb.acache_peek("k") == CachedError(TimeoutError, ("slow", 1))
        for _ in range(5):
            await asyncio.sleep(0)
    assert (first.calls, second.calls) == (1, 0)
    assert fa.cache_info().refreshes == fb.cache_info().refreshes == 0


async def test_a_stale_value_served_is_not_refreshed_ahead_before_the_back_off(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    # Served again (warned), written 40 s ago and fresh 5 s more: by its lifetime (45 s, due
    # after 45 * 30 / 50 = 27 s) it would be due; it is not before its expiry.
    source = Source()
    a, b = make_redis_cache(ttl=100), make_redis_cache(ttl=100)
    fa = _memoized(a, source, stale_if_error=100)
    fb = _memoized(b, Source(), stale_if_error=100)
    names = _names(a, "k")
    _seed_kept(sync_redis, names, "v", age=40, left=5, stale=100, warned=True)
    async with asyncio.timeout(WAIT):
        assert await fa("k") == "v"
        assert await fb("k") == "v"
        for _ in range(10):
            await asyncio.sleep(0)
    assert source.calls == 0
    assert fa.cache_info().refreshes == fb.cache_info().refreshes == 0


async def test_a_stale_value_served_here_is_not_refreshed_ahead_before_the_back_off(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    source = Source()
    cache = make_redis_cache(ttl=100)
    f = _memoized(cache, source, stale_if_error=100, refresh_backoff=5)
    names = _names(cache, "k")
    _seed_kept(sync_redis, names, "v", age=60, left=-1, stale=100)  # expired 1 s ago
    source.failure = OSError("down")
    async with asyncio.timeout(WAIT):
        assert await f("k") == "v"  # a miss whose failure serves the stale value
        assert f.cache_info().stale == 1
        assert await f("k") == "v"  # served again for the back-off, not refreshed ahead
        for _ in range(10):
            await asyncio.sleep(0)
    assert source.calls == 1
    assert f.cache_info().refreshes == 0


async def test_an_invalidation_during_a_refresh_wins_with_every_option(
    make_redis_cache: Make, sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = Source()
    source.gate = asyncio.Event()
    source.failure = TimeoutError("slow")
    cache = make_redis_cache(ttl=120)
    refreshed = asyncio.Event()
    real = RedisCache.refresh

    async def refresh(self: RedisCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return await real(self, *args, **kwargs)
        finally:
            refreshed.set()

    monkeypatch.setattr(RedisCache, "refresh", refresh)
    f = _memoized(cache, source, stale_if_error=100, cache_errors={TimeoutError: 60.0})
    names = _names(cache, "k")
    _seed_kept(sync_redis, names, "v", age=40, left=10, stale=100)
    async with asyncio.timeout(WAIT):
        assert await f("k") == "v"
        await source.started.wait()
        assert await f.acache_invalidate("k")
        source.gate.set()
        await refreshed.wait()  # the forgotten refresh ended, keeping nothing
        assert await f.acache_peek("k") is MISSING
        source.failure = None
        assert await f("k") == "k#2"
