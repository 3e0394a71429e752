"""Refresh-ahead with the per-result policy (issue 20): each entry is due at the same part of its
own lifetime as refresh_after is of the reference lifetime (ttl=, or the cache's ttl; half of it
with neither), a background refresh applies the policy as a computation does, and invalidation
wins over a refresh under way with every option."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Any

import cachetools
import pytest
from _policy_harness import Clock, ClockedAsyncCache, Source, bounded, settle

from wq_memo import CachedError, worker_queue
from wq_memo.backends import MISSING

MAPPINGS: dict[str, Callable[[Clock], Any]] = {
    "dict": lambda clock: {},
    "lru": lambda clock: cachetools.LRUCache(100),
    "ttl": lambda clock: cachetools.TTLCache(100, ttl=100, timer=clock),
}
"""In-process caches; the TTLCache's ttl (100) is the reference lifetime of a ttl function."""


def short_or_long(result: Any) -> float | None:
    """A ttl function: 20 s for a result starting with "s", 100 s for one starting with "l",
    else the cache's own lifetime."""
    text = str(result)
    return 20.0 if text.startswith("s") else 100.0 if text.startswith("l") else None


def due(f: Any) -> dict[Hashable, float]:
    """The due times a memoized function keeps (internal)."""
    times: dict[Hashable, float] = f._refresher.due
    return times


def memoized(kind: str, source: Source, clock: Clock, **options: Any) -> Any:
    options.setdefault("refresh_after", 30)
    return worker_queue(cache=MAPPINGS[kind](clock), timer=clock, **options)(source)


@pytest.fixture(params=sorted(MAPPINGS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- when an entry is due -------------------------------------------------------------------------


async def test_with_a_number_ttl_every_entry_is_due_after_refresh_after(kind: str) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=50)
    assert await f("k") == "k@0"
    assert due(f)[("k",)] == 30
    clock.now = 29.9
    assert await f("k") == "k@0"
    await settle()
    assert source.calls == ["k"]
    clock.now = 30
    assert await f("k") == "k@0"  # due: served at once, refreshed in the background
    await settle()
    assert source.calls == ["k", "k"]
    assert await f("k") == "k@1"
    assert f.cache_info().refreshes == 1


@pytest.mark.parametrize(
    ("kind", "short_due", "long_due"),
    [
        ("dict", 10.0, 30.0),  # no reference lifetime: half of 20; min(30, half of 100)
        ("lru", 10.0, 30.0),
        ("ttl", 6.0, 30.0),  # 20 * 30 / 100; 100 * 30 / 100
    ],
)
async def test_a_short_lived_entry_is_due_at_the_same_part_of_its_own_lifetime(
    kind: str, short_due: float, long_due: float
) -> None:
    clock, source = Clock(), Source()
    source.results = {"s": "short", "l": "long"}
    f = memoized(kind, source, clock, ttl=short_or_long)
    assert await f("s") == "short"
    assert await f("l") == "long"
    assert due(f) == {("s",): short_due, ("l",): long_due}
    clock.now = short_due - 0.1
    assert await f("s") == "short"
    await settle()
    assert source.calls == ["s", "l"]  # not due yet
    clock.now = short_due
    assert await f("s") == "short"  # due before it expires at 20: refreshed ahead
    await settle()
    assert source.calls == ["s", "l", "s"]
    assert f.cache_info().refreshes == 1


async def test_an_entry_with_the_caches_own_lifetime_is_due_after_refresh_after(kind: str) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=short_or_long)  # "k@0": None, the cache's lifetime
    assert await f("k") == "k@0"
    assert due(f) == {("k",): 30.0}


async def test_jitter_spreads_a_short_entrys_due_time_within_its_lifetime(kind: str) -> None:
    clock, source = Clock(), Source()
    source.results = {"s": "short"}
    f = memoized(kind, source, clock, ttl=short_or_long, jitter=0.9)
    for n in range(30):
        f.cache_invalidate("s")
        clock.now = float(n)
        assert await f("s") == "short"
        assert 0 < due(f)[("s",)] - clock.now < 20  # always before it expires


async def test_an_expired_entry_is_never_refreshed_ahead(kind: str) -> None:
    clock, source = Clock(), Source()
    source.results = {"s": "short"}
    f = memoized(kind, source, clock, ttl=short_or_long)
    assert await f("s") == "short"
    clock.now = 20  # expired, never called while due: a miss that waits for its computation
    source.gate = asyncio.Event()
    call = asyncio.ensure_future(f("s"))
    await settle()
    assert not call.done()
    source.gate.set()
    assert await bounded(call) == "short"
    info = f.cache_info()
    assert (info.misses, info.refreshes) == (2, 0)


async def test_a_refreshed_results_ttl_sets_the_new_entrys_lifetime_and_due_time(
    kind: str,
) -> None:
    clock, source = Clock(), Source()
    source.results = {"k": "long"}
    f = memoized(kind, source, clock, ttl=short_or_long)
    assert await f("k") == "long"
    clock.now = 30
    source.results = {"k": "short"}  # the refresh's result lives 20 s
    assert await f("k") == "long"
    await settle()
    assert await f("k") == "short"
    short_due = 30 + (6.0 if kind == "ttl" else 10.0)
    assert due(f)[("k",)] == short_due
    clock.now = 49.9
    assert f.cache_peek("k") == "short"
    clock.now = 50  # 20 s after the refresh stored it
    assert f.cache_peek("k") is MISSING


async def test_a_prime_with_a_short_ttl_is_due_at_that_part_of_it(kind: str) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=short_or_long)
    f.cache_prime("short", "s")
    assert due(f)[("s",)] == (6.0 if kind == "ttl" else 10.0)


# -- the policy applied to a background refresh ---------------------------------------------------


async def test_a_refreshed_result_cache_if_refuses_is_not_stored_and_the_old_entry_stays(
    kind: str,
) -> None:
    clock, source = Clock(), Source()
    source.results = {"k": "good"}
    f = memoized(kind, source, clock, cache_if=lambda r: r != "bad", refresh_backoff=2)
    assert await f("k") == "good"
    clock.now = 30
    source.results = {"k": "bad"}
    assert await f("k") == "good"
    await settle()
    assert source.calls == ["k", "k"]
    assert await f("k") == "good"  # the old entry is served still
    assert f.cache_peek("k") == "good"
    info = f.cache_info()
    assert (info.uncached, info.refreshes, info.refresh_failures) == (1, 1, 0)
    clock.now = 31.9  # the next refresh waits refresh_backoff
    assert await f("k") == "good"
    await settle()
    assert source.calls == ["k", "k"]
    clock.now = 32
    source.results = {"k": "better"}
    assert await f("k") == "good"
    await settle()
    assert await f("k") == "better"


async def test_with_a_ttl_cache_if_refusing_a_refresh_leaves_the_entry_until_it_expires() -> None:
    clock, source = Clock(), Source()
    source.results = {"k": "good"}
    f = memoized("dict", source, clock, ttl=50, cache_if=lambda r: r != "bad")
    assert await f("k") == "good"
    clock.now = 30
    source.results = {"k": "bad"}
    assert await f("k") == "good"
    await settle()
    clock.now = 49.9
    assert f.cache_peek("k") == "good"
    clock.now = 50  # it expires when it would have: the refused refresh did not extend it
    assert f.cache_peek("k") is MISSING
    assert await f("k") == "bad"  # computed as a miss, returned uncached
    assert f.cache_peek("k") is MISSING


async def test_a_failing_refresh_never_replaces_a_fresh_value_by_a_remembered_error(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=50, cache_errors={TimeoutError: 5.0})
    assert await f("k") == "k@0"
    clock.now = 30
    source.failures = {"k": TimeoutError("slow")}
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await f("k") == "k@0"
        await settle()
    assert any("refreshing" in r.getMessage() for r in caplog.records)
    assert f.cache_peek("k") == "k@0"
    assert await f("k") == "k@0"
    info = f.cache_info()
    assert (info.refreshes, info.refresh_failures) == (1, 1)
    clock.now = 50  # expired: the miss's failure is remembered, as without refresh_after
    with pytest.raises(TimeoutError, match="slow"):
        await bounded(f("k"))
    assert f.cache_peek("k") == CachedError(TimeoutError, ("slow",))
    with pytest.raises(TimeoutError, match="slow"):
        await f("k")  # remembered: raised without computing, never refreshed ahead
    await settle()
    assert source.calls == ["k", "k", "k"]


@pytest.mark.parametrize("kind", ["dict", "lru"])
async def test_with_stale_if_error_a_failing_refresh_leaves_the_entry_then_the_stale_rules_apply(
    kind: str,
) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=50, stale_if_error=100, refresh_backoff=3)
    assert await f("k") == "k@0"
    clock.now = 30
    source.failures = {"k": OSError("down")}
    assert await f("k") == "k@0"
    await settle()
    assert f.cache_info().refresh_failures == 1
    assert f.cache_info().stale == 0  # a fresh value served, not a stale one
    clock.now = 60  # expired: the miss fails, within the window the stale value is served
    assert await bounded(f("k")) == "k@0"
    assert f.cache_info().stale == 1
    clock.now = 62.9  # for refresh_backoff, without computing
    assert await f("k") == "k@0"
    assert source.calls == ["k", "k", "k"]
    clock.now = 151  # past the window: the failure reaches the caller
    with pytest.raises(OSError, match="down"):
        await bounded(f("k"))


@pytest.mark.parametrize("kind", ["dict", "lru"])
async def test_a_refresh_a_caller_joined_after_the_entry_expired_serves_it_stale(
    kind: str,
) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=50, stale_if_error=100, maxsize=1)
    assert await f("k") == "k@0"
    source.gate = asyncio.Event()
    source.started.clear()
    busy = asyncio.ensure_future(f("busy"))  # holds the one slot
    await bounded(source.started.wait())
    clock.now = 30
    assert await f("k") == "k@0"  # due: the refresh waits for a spare slot
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


EVERY_OPTION: dict[str, dict[str, Any]] = {
    "cache_if": {"cache_if": lambda r: True},
    "ttl": {"ttl": 50},
    "ttl_function": {"ttl": short_or_long},
    "cache_errors": {"cache_errors": {OSError: 5.0}},
    "stale_if_error": {"stale_if_error": 100, "ttl": 50},
}


@pytest.mark.parametrize(
    ("kind", "option"),
    [
        (kind, option)
        for kind in sorted(MAPPINGS)
        for option in EVERY_OPTION
        if not (kind == "ttl" and option == "stale_if_error")  # a TTLCache takes no stale
    ],
)
@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_invalidation_wins_over_a_refresh_under_way_with_every_option(
    kind: str, option: str, how: str
) -> None:
    options = EVERY_OPTION[option]
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, **options)
    assert await f("k") == "k@0"
    clock.now = 30
    source.gate = asyncio.Event()
    source.started.clear()
    assert await f("k") == "k@0"
    await bounded(source.started.wait())
    if how == "invalidate":
        assert f.cache_invalidate("k") is True
    else:
        f.cache_clear()
    source.gate.set()
    await settle()
    assert f.cache_peek("k") is MISSING  # the refresh's result was not stored
    clock.now = 1000  # and nothing of the old value is served stale
    source.failures = {"k": OSError("down")}
    with pytest.raises(OSError, match="down"):
        await bounded(f("k"))


# -- async caches ---------------------------------------------------------------------------------


def async_memoized(source: Source, clock: Clock, **options: Any) -> tuple[Any, ClockedAsyncCache]:
    cache = ClockedAsyncCache(clock)
    cache.ttl = 100  # type: ignore[attr-defined]  # the reference lifetime
    f = worker_queue(cache=cache, refresh_after=30, timer=clock, name="p.f", **options)(source)
    return f, cache


async def test_with_an_async_cache_a_short_entry_is_due_at_its_part_and_its_ttl_goes_to_set() -> (
    None
):
    clock, source = Clock(), Source()
    source.results = {"s": "short", "l": "long"}
    f, cache = async_memoized(source, clock, ttl=short_or_long)
    assert await f("s") == "short"
    assert await f("l") == "long"
    assert cache.ttls == [20.0, 100.0]
    assert sorted(due(f).values()) == [6.0, 30.0]
    clock.now = 6
    assert await f("s") == "short"
    await settle()
    assert source.calls == ["s", "l", "s"]
    assert cache.ttls == [20.0, 100.0, 20.0]
    clock.now = 11.9  # the refreshed entry, stored at 6, is due at 6 + 6
    assert await f("s") == "short"
    await settle()
    assert source.calls == ["s", "l", "s"]
    clock.now = 12
    assert await f("s") == "short"
    await settle()
    assert source.calls == ["s", "l", "s", "s"]


async def test_with_an_async_cache_a_refreshed_result_cache_if_refuses_is_not_stored() -> None:
    clock, source = Clock(), Source()
    source.results = {"k": "good"}
    f, cache = async_memoized(source, clock, cache_if=lambda r: r != "bad")
    assert await f("k") == "good"
    clock.now = 30
    source.results = {"k": "bad"}
    assert await f("k") == "good"
    await settle()
    assert source.calls == ["k", "k"]
    assert await f("k") == "good"
    assert len(cache.ttls) == 1  # one set: the refused refresh wrote nothing
    assert f.cache_info().uncached == 1


async def test_with_an_async_cache_invalidation_wins_over_a_refresh_with_a_ttl_function() -> None:
    clock, source = Clock(), Source()
    f, cache = async_memoized(source, clock, ttl=short_or_long, cache_if=lambda r: True)
    assert await f("k") == "k@0"
    clock.now = 30
    source.gate = asyncio.Event()
    source.started.clear()
    assert await f("k") == "k@0"
    await bounded(source.started.wait())
    assert await f.acache_invalidate("k") is True
    source.gate.set()
    await settle()
    assert cache.data == {}


@pytest.mark.parametrize("kind", ["dict", "lru"])
async def test_a_stale_value_served_is_not_refreshed_ahead_before_the_backoff(kind: str) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, ttl=50, stale_if_error=100, refresh_backoff=3)
    assert await f("k") == "k@0"
    source.failures = {"k": OSError("down")}
    clock.now = 60  # expired, never refreshed: the miss fails, the stale value is served
    assert await bounded(f("k")) == "k@0"
    assert f.cache_info().stale == 1
    clock.now = 62.9  # within refresh_backoff: served as it is, neither computed nor refreshed
    assert await f("k") == "k@0"
    await settle()
    assert source.calls == ["k", "k"]
    assert f.cache_info().refreshes == 0
    clock.now = 63  # the back-off over: the next call computes again (a miss)
    del source.failures["k"]
    assert await bounded(f("k")) == "k@2"
    assert f.cache_info().refreshes == 0
