"""cache_errors and stale_if_error with a plain async cache: wq_memo keeps its dated entries in
the cache (a value with its expiry, kept by set's ttl for the stale window; a remembered error
for its time), written as a computation's result is: never for a forgotten computation, and an
invalidation waits for a write on its way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

import pytest
from _policy_harness import Clock, ClockedAsyncCache, Source, bounded, settle

from wq_memo import MISSING, CachedError, worker_queue


def memoized(clock: Clock, cache: Any = None, **options: Any) -> tuple[Source, Any, Any]:
    source = Source()
    cache = ClockedAsyncCache(clock) if cache is None else cache
    f = worker_queue(cache=cache, timer=clock, name="policy.async", **options)(source)
    return source, f, cache


def remembering(clock: Clock, cache: Any = None, **options: Any) -> tuple[Source, Any, Any]:
    options.setdefault("cache_errors", {TimeoutError: 2.0})
    return memoized(clock, cache, **options)


def staling(clock: Clock, cache: Any = None, **options: Any) -> tuple[Source, Any, Any]:
    options.setdefault("ttl", 10)
    options.setdefault("stale_if_error", 60)
    options.setdefault("refresh_backoff", 5)
    return memoized(clock, cache, **options)


# -- cache_errors ---------------------------------------------------------------------------------


async def test_a_remembered_error_is_raised_anew_without_computing() -> None:
    clock = Clock()
    source, f, cache = remembering(clock)
    source.failures["a"] = TimeoutError("slow", 3)
    with pytest.raises(TimeoutError) as first:
        await bounded(f("a"))
    assert cache.ttls == [2.0]  # kept by the cache for its time
    raised = []
    for _ in range(2):
        clock.now += 0.9
        with pytest.raises(TimeoutError) as again:
            await bounded(f("a"))
        raised.append(again.value)
    assert source.calls == ["a"]
    assert all(e.args == ("slow", 3) for e in raised)
    assert len({id(first.value), *map(id, raised)}) == 3
    assert raised[0].__traceback__ is not raised[1].__traceback__
    assert f.cache_info().hits == 2
    assert await f.acache_peek("a") == CachedError(TimeoutError, ("slow", 3))
    clock.now = 2.0
    assert await f.acache_peek("a") is MISSING
    del source.failures["a"]
    assert await bounded(f("a")) == "a@1"


async def test_exceptions_outside_cache_errors_and_cancellation_are_never_cached() -> None:
    clock = Clock()
    source, f, cache = remembering(clock, cache_errors={Exception: 5.0})
    source.failures["a"] = asyncio.CancelledError()
    for _ in range(2):
        with pytest.raises(asyncio.CancelledError):
            await bounded(f("a"))
    assert source.calls == ["a", "a"]
    assert cache.data == {}
    source2, g, _ = remembering(clock)
    source2.failures["a"] = ValueError("nope")
    for _ in range(2):
        with pytest.raises(ValueError, match="nope"):
            await bounded(g("a"))
    assert source2.calls == ["a", "a"]
    assert await g.acache_peek("a") is MISSING


@pytest.mark.parametrize("how", ["invalidate", "clear", "prime"])
async def test_invalidate_clear_and_prime_forget_a_remembered_error(how: str) -> None:
    clock = Clock()
    source, f, _ = remembering(clock)
    source.failures["a"] = TimeoutError("t")
    with pytest.raises(TimeoutError):
        await bounded(f("a"))
    del source.failures["a"]
    if how == "invalidate":
        assert await f.acache_invalidate("a")
        assert await bounded(f("a")) == "a@1"
    elif how == "clear":
        await f.acache_clear()
        assert await bounded(f("a")) == "a@1"
    else:
        await f.acache_prime("primed", "a")
        assert await bounded(f("a")) == "primed"


async def test_an_invalidated_computation_remembers_nothing() -> None:
    clock = Clock()
    source, f, cache = remembering(clock)
    source.failures["a"] = TimeoutError("t")
    source.gate = asyncio.Event()
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    await f.acache_invalidate("a")
    source.gate.set()
    with pytest.raises(TimeoutError):
        await bounded(call)
    assert cache.data == {}


class GatedSetCache(ClockedAsyncCache):
    """set() waits for ``gate`` once ``hold`` is true."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.hold = False
        self.gate = asyncio.Event()
        self.setting = asyncio.Event()

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        if self.hold:
            self.setting.set()
            await self.gate.wait()
        await super().set(key, value, ttl)


async def test_an_invalidation_waits_for_the_remembered_errors_write_on_its_way() -> None:
    clock = Clock()
    cache = GatedSetCache(clock)
    source, f, _ = remembering(clock, cache)
    source.failures["a"] = TimeoutError("t")
    cache.hold = True
    call = asyncio.ensure_future(f("a"))
    await bounded(cache.setting.wait())
    invalidation = asyncio.ensure_future(f.acache_invalidate("a"))
    await settle()
    assert not invalidation.done()  # it waits for the write on its way
    cache.gate.set()
    with pytest.raises(TimeoutError):
        await bounded(call)
    await bounded(invalidation)
    assert await f.acache_peek("a") is MISSING
    del source.failures["a"]
    assert await bounded(f("a")) == "a@1"


# -- stale_if_error -------------------------------------------------------------------------------


async def test_a_failing_recomputation_serves_the_expired_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    source, f, cache = staling(clock)
    assert await bounded(f("a")) == "a@0"
    assert cache.ttls == [70]  # the entry's ttl and the stale window
    source.failures["a"] = ConnectionError("down")
    clock.now = 10
    assert await f.acache_peek("a") is MISSING
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await bounded(f("a")) == "a@0"
        clock.now = 14.9  # the next attempt waits refresh_backoff
        assert await bounded(f("a")) == "a@0"
        assert source.calls == ["a", "a"]
        clock.now = 15
        assert await bounded(f("a")) == "a@0"
        assert source.calls == ["a", "a", "a"]
    warnings = [r for r in caplog.records if "stale_if_error" in r.getMessage()]
    assert len(warnings) == 1  # once per key per window
    assert f.cache_info().stale == 2
    clock.now = 70  # past the window
    with pytest.raises(ConnectionError):
        await bounded(f("a"))


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_an_invalidated_value_is_never_served_stale(how: str) -> None:
    clock = Clock()
    source, f, _ = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    clock.now = 11
    if how == "invalidate":
        await f.acache_invalidate("a")
    else:
        await f.acache_clear()
    with pytest.raises(ConnectionError):
        await bounded(f("a"))


async def test_invalidating_during_the_failing_recomputation_serves_nothing_stale() -> None:
    clock = Clock()
    source, f, cache = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    source.gate = asyncio.Event()
    source.started.clear()
    clock.now = 11
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    await f.acache_invalidate("a")
    source.gate.set()
    with pytest.raises(ConnectionError):
        await bounded(call)
    assert cache.data == {}
    assert f.cache_info().stale == 0


async def test_every_caller_of_the_failing_recomputation_gets_the_stale_value() -> None:
    clock = Clock()
    source, f, _ = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    source.gate = asyncio.Event()
    source.started.clear()
    clock.now = 11
    calls = [asyncio.ensure_future(f("a")) for _ in range(3)]
    await bounded(source.started.wait())
    await settle()
    source.gate.set()
    assert await bounded(asyncio.gather(*calls)) == ["a@0"] * 3
    assert source.calls == ["a", "a"]


async def test_without_these_options_the_hit_path_is_the_plain_one() -> None:
    clock = Clock()
    _, plain, _ = memoized(clock)
    _, with_ttl, _ = memoized(clock, ttl=5)
    _, with_errors, _ = remembering(clock)
    assert with_ttl.__code__ is plain.__code__
    assert with_errors.__code__ is not plain.__code__


class GatedGetCache(ClockedAsyncCache):
    """get() waits for ``gate`` once ``hold`` is true, after reading the entry."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.hold = False
        self.gate = asyncio.Event()
        self.getting = asyncio.Event()

    async def get(self, key: Hashable) -> Any:
        found = await super().get(key)
        if self.hold:
            self.getting.set()
            await self.gate.wait()
        return found


@pytest.mark.parametrize("how", ["invalidate", "clear", "prime"])
@pytest.mark.parametrize("failure", ["stale", "remembered"])
async def test_an_invalidation_during_the_failure_paths_re_read_leaves_nothing(
    how: str, failure: str
) -> None:
    # The failed computation has read its key's entry (the expired value, or nothing) and
    # waits; the key is invalidated, cleared or primed; it goes on: its callers get its
    # exception, and nothing it would have written is in the cache.
    clock = Clock()
    cache = GatedGetCache(clock)
    source, f, _ = staling(clock, cache, cache_errors={ConnectionError: 30.0})
    if failure == "stale":
        assert await bounded(f("a")) == "a@0"
        clock.now = 11
    source.failures["a"] = ConnectionError("down")
    source.gate = asyncio.Event()
    source.started.clear()
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    cache.hold = True  # the lookups are done: the next get() is the failure path's re-read
    source.gate.set()
    await bounded(cache.getting.wait())
    if how == "invalidate":
        await bounded(f.acache_invalidate("a"))
    elif how == "clear":
        await bounded(f.acache_clear())
    else:
        await bounded(f.acache_prime("primed", "a"))
    cache.hold = False
    cache.gate.set()
    with pytest.raises(ConnectionError):
        await bounded(call)
    assert f.cache_info().stale == 0
    del source.failures["a"]
    source.gate = None
    expected = "primed" if how == "prime" else f"a@{len(source.calls)}"
    assert await bounded(f("a")) == expected
