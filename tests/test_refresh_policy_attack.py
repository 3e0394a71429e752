"""Refresh-ahead with the per-result policy under invalidations, primes and edge lifetimes: what
a refresh that an invalidation or a prime overtook leaves behind (nothing: not its due time, not
a warning that a value is served), and the due times of lifetimes at the edges."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import cachetools
import pytest
from _policy_harness import Clock, Source, bounded, settle

from wq_memo import worker_queue

CACHES: dict[str, Any] = {
    "dict": lambda clock: {},
    "lru": lambda clock: cachetools.LRUCache(100),
    "ttl": lambda clock: cachetools.TTLCache(100, ttl=100, timer=clock),
}

OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "cache_if": {"cache_if": lambda r: True},
    "ttl": {"ttl": 70},
    "ttl_function": {"ttl": lambda r: 70.0},
    "cache_errors": {"ttl": 70, "cache_errors": {OSError: 5.0}},
}


def memoized(kind: str, source: Source, clock: Clock, **options: Any) -> Any:
    return worker_queue(cache=CACHES[kind](clock), timer=clock, refresh_after=30, **options)(source)


def due(f: Any) -> dict[Any, float]:
    """The due times a memoized function keeps (internal)."""
    times: dict[Any, float] = f._refresher.due
    return dict(times)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("kind", sorted(CACHES))
@pytest.mark.parametrize("how", ["prime", "invalidate"])
async def test_a_refresh_overtaken_by_a_prime_or_an_invalidation_leaves_no_due_time_when_it_fails(
    kind: str, option: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, **OPTIONS[option])
    assert await f("k") == "k@0"
    clock.now = 30
    source.gate = asyncio.Event()
    source.started.clear()
    source.failures = {"k": OSError("down")}
    assert await f("k") == "k@0"  # due: refreshed in the background, held by the gate
    await bounded(source.started.wait())
    # 30 s after its write; 70 x 30 / 100 with a ttl function under a TTLCache's ttl of 100
    after = 21.0 if (kind, option) == ("ttl", "ttl_function") else 30.0
    if how == "prime":
        f.cache_prime("primed", "k")
        assert due(f) == {("k",): 30 + after}
    else:
        assert f.cache_invalidate("k") is True
        assert due(f) == {}
    replaced = due(f)
    source.gate.set()
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        await settle()
    # The overtaken refresh's failure moves nothing: the new entry is refreshed when it is due,
    # not refresh_backoff after that failure, and no "cached value is served" is claimed.
    assert due(f) == replaced
    assert not [r for r in caplog.records if "refreshing" in r.getMessage()]
    assert f.cache_info().refresh_failures == 1
    source.failures = {}
    if how == "invalidate":
        assert await bounded(f("k")) == "k@2"
        assert due(f) == {("k",): 30 + after}
    clock.now = 31
    assert await f("k") in ("primed", "k@2")
    await settle()
    assert len(source.calls) == (2 if how == "prime" else 3)  # not refreshed before it is due
