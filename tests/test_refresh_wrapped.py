"""Refresh-ahead with cache_errors and stale_if_error on a plain async cache (issue 20): the
lookup unwraps the kept entries (a remembered error raised and never refreshed ahead, a fresh
value served, an expired one a miss) and dates each value by its own lifetime, not by the cache
ttl that keeps it for the stale window; a background refresh leaves a fresh entry when it fails,
a stale value served is not refreshed ahead before refresh_backoff, and invalidation wins."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _policy_harness import Clock, ClockedAsyncCache, Source, bounded, settle

from wq_memo import CachedError, worker_queue
from wq_memo.backends import MISSING


def memoized(source: Source, clock: Clock, **options: Any) -> Any:
    options.setdefault("refresh_after", 30)
    cache = ClockedAsyncCache(clock)
    return worker_queue(cache=cache, timer=clock, name="wrapped.f", **options)(source)


def short(result: Any) -> float:
    """A ttl function: every result lives 20 s."""
    return 20.0


async def test_a_value_kept_for_a_stale_window_is_due_by_its_own_lifetime() -> None:
    clock, source = Clock(), Source()
    # No reference lifetime (the cache has no ttl): due at half of its own 20 s, not of the
    # 120 s the cache keeps it for (its ttl plus the stale window).
    f = memoized(source, clock, ttl=short, stale_if_error=100)
    assert await bounded(f("k")) == "k@0"
    clock.now = 9.9
    assert await bounded(f("k")) == "k@0"
    await settle()
    assert source.calls == ["k"]
    clock.now = 10
    assert await bounded(f("k")) == "k@0"
    await settle()
    assert source.calls == ["k", "k"]
    assert await bounded(f("k")) == "k@1"
    assert f.cache_info().refreshes == 1


async def test_a_failing_background_refresh_leaves_the_fresh_value_not_a_remembered_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, cache_errors={TimeoutError: 5.0})
    assert await bounded(f("k")) == "k@0"
    clock.now = 30
    source.failures = {"k": TimeoutError("slow")}
    assert await bounded(f("k")) == "k@0"
    await settle()
    assert f.cache_info().refresh_failures == 1
    assert await bounded(f.acache_peek("k")) == "k@0"
    assert await bounded(f("k")) == "k@0"
    clock.now = 50  # expired: the miss's failure is remembered
    with pytest.raises(TimeoutError, match="slow"):
        await bounded(f("k"))
    assert await bounded(f.acache_peek("k")) == CachedError(TimeoutError, ("slow",))
    clock.now = 54  # remembered: raised without computing, and never refreshed ahead
    with pytest.raises(TimeoutError, match="slow"):
        await bounded(f("k"))
    await settle()
    assert source.calls == ["k", "k", "k"]
    assert f.cache_info().refreshes == 1


async def test_an_explicit_refresh_that_fails_leaves_a_fresh_value_as_it_is() -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, cache_errors={TimeoutError: 5.0})
    assert await bounded(f("k")) == "k@0"
    source.failures = {"k": TimeoutError("slow")}
    with pytest.raises(TimeoutError, match="slow"):
        await bounded(f.refresh("k"))
    assert await bounded(f.acache_peek("k")) == "k@0"  # not replaced by the remembered error


async def test_a_stale_value_served_is_not_refreshed_ahead_before_the_back_off() -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, stale_if_error=100, refresh_backoff=3)
    assert await bounded(f("k")) == "k@0"
    clock.now = 30
    source.failures = {"k": OSError("down")}
    assert await bounded(f("k")) == "k@0"  # due: its refresh fails, the entry stays
    await settle()
    assert f.cache_info().stale == 0
    clock.now = 60  # expired: the miss fails, the stale value is served
    assert await bounded(f("k")) == "k@0"
    assert f.cache_info().stale == 1
    calls = len(source.calls)
    clock.now = 62.9  # served again for the back-off, neither computed nor refreshed ahead
    assert await bounded(f("k")) == "k@0"
    await settle()
    assert len(source.calls) == calls
    assert f.cache_info().refreshes == 1
    clock.now = 63  # the next attempt: a miss, failing again within the window
    assert await bounded(f("k")) == "k@0"
    assert len(source.calls) == calls + 1
    del source.failures["k"]
    clock.now = 66
    assert await bounded(f("k")) == f"k@{calls + 1}"


async def test_invalidation_wins_over_a_background_refresh_under_way() -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, cache_errors={TimeoutError: 5.0}, stale_if_error=100)
    assert await bounded(f("k")) == "k@0"
    clock.now = 30
    source.gate = gate = asyncio.Event()
    source.started.clear()
    assert await bounded(f("k")) == "k@0"
    await bounded(source.started.wait())  # the refresh computes, held
    assert await bounded(f.acache_invalidate("k"))
    gate.set()
    await settle()
    assert await bounded(f.acache_peek("k")) is MISSING  # its result was not stored
    source.gate = None
    assert await bounded(f("k")) == "k@2"


async def test_a_refresh_failing_under_way_when_its_key_is_invalidated_keeps_nothing() -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, cache_errors={TimeoutError: 5.0}, stale_if_error=100)
    assert await bounded(f("k")) == "k@0"
    clock.now = 30
    source.gate = gate = asyncio.Event()
    source.failures = {"k": TimeoutError("slow")}
    source.started.clear()
    assert await bounded(f("k")) == "k@0"
    await bounded(source.started.wait())
    assert await bounded(f.acache_invalidate("k"))
    gate.set()
    await settle()
    assert await bounded(f.acache_peek("k")) is MISSING  # no remembered error, no stale value


async def test_a_refresh_a_caller_joined_after_the_entry_expired_serves_it_stale() -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, stale_if_error=100, maxsize=1)
    assert await bounded(f("k")) == "k@0"
    source.gate = asyncio.Event()
    source.started.clear()
    busy = asyncio.ensure_future(f("busy"))  # holds the one slot
    await bounded(source.started.wait())
    clock.now = 30
    assert await bounded(f("k")) == "k@0"  # due: the refresh waits for a spare slot
    await settle()
    assert source.calls == ["k", "busy"]
    clock.now = 60  # the entry expired meanwhile: a caller joins the refresh
    source.failures = {"k": OSError("down")}
    call = asyncio.ensure_future(f("k"))
    await settle()
    source.gate.set()
    assert await bounded(busy) == "busy@1"
    assert await bounded(call) == "k@0"  # the refresh failed: its caller gets the stale value
    assert source.calls == ["k", "busy", "k"]
    assert f.cache_info().stale == 1


async def test_a_refresh_a_caller_joined_remembers_its_error() -> None:
    clock, source = Clock(), Source()
    f = memoized(source, clock, ttl=50, cache_errors={OSError: 5.0}, maxsize=1)
    assert await bounded(f("k")) == "k@0"
    source.gate = asyncio.Event()
    source.started.clear()
    busy = asyncio.ensure_future(f("busy"))
    await bounded(source.started.wait())
    clock.now = 30
    assert await bounded(f("k")) == "k@0"
    await settle()
    clock.now = 60  # expired: a caller joins the refresh, which fails
    source.failures = {"k": OSError("down")}
    call = asyncio.ensure_future(f("k"))
    await settle()
    source.gate.set()
    assert await bounded(busy) == "busy@1"
    with pytest.raises(OSError, match="down"):
        await bounded(call)
    assert await bounded(f.acache_peek("k")) == CachedError(OSError, ("down",))
