"""Refresh-ahead in bulk (issue 19, point 7): the keys of a batch function found due are
refreshed in the background, in batches, under the rules of single refreshes: a refresh batch
takes only a spare slot, a failure keeps the old value until the back-off ends, an invalidation
wins, and a caller who comes to wait for a refresh makes it a caller's batch."""

from __future__ import annotations

import asyncio
from typing import Any

import cachetools
import pytest
from test_batch import GatedBatch, bounded, settle

from wq_memo import MISSING, worker_queue
from wq_memo._batch import check as check_batches


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refreshing(g: GatedBatch, clock: Clock, **options: Any) -> Any:
    return worker_queue.batch(cache={}, refresh_after=10, timer=clock, **options)(g)


async def loaded(g: GatedBatch, load: Any, keys: list[int]) -> None:
    """Load keys in one batch, answered at once."""
    many = asyncio.create_task(load.many(keys))
    await g.wait_calls(len(g.calls) + 1)
    g.release(len(g.calls) - 1)
    await bounded(many)


async def test_keys_found_due_are_refreshed_in_one_background_batch() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock)
    await loaded(g, load, [1, 2, 3])
    clock.now = 11
    assert await load.many([1, 2, 3]) == ["1#0", "2#0", "3#0"]  # at once: the old values
    await g.wait_calls(2)
    assert g.calls[1] == [1, 2, 3]
    assert await load(2) == "2#0"  # served while the refresh runs, no second refresh
    g.release(1)
    await settle()
    assert load.cache_peek(1) == "1#1"
    assert await load.many([3, 2]) == ["3#1", "2#1"]
    info = load.cache_info()
    assert (info.refreshes, info.batches, info.misses) == (3, 2, 3)
    assert len(g.calls) == 2


async def test_a_refresh_batch_waits_for_a_spare_slot_behind_callers_batches() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, maxsize=1)
    await loaded(g, load, [1])
    busy = asyncio.create_task(load(9))  # holds the only slot
    await g.wait_calls(2)
    clock.now = 11
    assert await load(1) == "1#0"  # due: a refresh, which waits for a spare slot
    later = asyncio.create_task(load(5))  # a caller's batch, after the refresh was due
    await settle()
    assert len(g.calls) == 2
    g.release(1)
    await g.wait_calls(3)
    await settle()
    assert g.calls[2] == [5]  # the caller's batch went first
    assert len(g.calls) == 3
    g.release(2)
    await g.wait_calls(4)
    assert g.calls[3] == [1]  # then the refresh, in a slot nobody waits for
    g.release(3)
    assert await bounded(asyncio.gather(busy, later)) == ["9#1", "5#2"]
    await settle()
    assert load.cache_peek(1) == "1#3"


async def test_a_caller_batch_starts_beside_a_refresh_batch_that_runs() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, maxsize=1)
    await loaded(g, load, [1])
    clock.now = 11
    assert await load(1) == "1#0"
    await g.wait_calls(2)  # the refresh runs, in the spare slot
    caller = asyncio.create_task(load(5))
    await g.wait_calls(3)  # not behind the refresh
    check_batches(load)  # two batches, maxsize=1: the caller's, and the refresh in a spare slot
    g.release(2)
    assert await bounded(caller) == "5#2"
    g.release(1)
    await settle()
    assert load.cache_peek(1) == "1#1"


async def test_a_failed_refresh_keeps_the_old_value_until_the_back_off_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, refresh_backoff=5)
    await loaded(g, load, [1, 2])
    clock.now = 11
    failure = LookupError("gone for now")
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await g.wait_calls(2)
    g.release(1, lambda keys, n: {1: failure, 2: f"2#{n}"})
    await settle()
    assert load.cache_peek(1) == "1#0"
    assert load.cache_peek(2) == "2#1"
    assert load.cache_info().refresh_failures == 1
    assert "refreshing 1 failed" in caplog.text
    clock.now = 15
    assert await load(1) == "1#0"  # within the back-off: no refresh
    await settle()
    assert len(g.calls) == 2
    clock.now = 16.5
    assert await load(1) == "1#0"
    await g.wait_calls(3)
    assert g.calls[2] == [1]
    g.release(2)
    await settle()
    assert load.cache_peek(1) == "1#2"


async def test_a_caller_joining_a_refresh_in_line_makes_it_a_callers_batch() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, maxsize=1)
    await loaded(g, load, [1])
    busy = asyncio.create_task(load(9))
    await g.wait_calls(2)
    clock.now = 11
    assert await load(1) == "1#0"
    await settle()  # its refresh batch waits for a spare slot
    load.cache.pop(1)  # the entry goes (evicted, say) while the refresh waits
    joining = asyncio.create_task(load(1))
    await settle()
    later = asyncio.create_task(load(5))
    await settle()
    g.release(1)
    await g.wait_calls(3)
    assert g.calls[2] == [1]  # ahead of the later caller's batch
    g.release(2)
    await g.wait_calls(4)
    g.release(3)
    assert await bounded(asyncio.gather(busy, joining, later)) == ["9#1", "1#2", "5#3"]
    assert load.cache_info().joined == 1


async def test_an_invalidation_wins_over_a_refresh_batch() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock)
    await loaded(g, load, [1, 2])
    clock.now = 11
    await load.many([1, 2])
    await g.wait_calls(2)
    assert load.cache_invalidate(1) is True
    g.release(1)
    await settle()
    assert load.cache_peek(1) is MISSING  # not stored: the invalidation came after it began
    assert load.cache_peek(2) == "2#1"


def test_refresh_options_are_checked() -> None:
    async def f(keys: list[int]) -> dict[int, int]:
        return {}

    with pytest.raises(ValueError, match="refresh_after needs a cache"):
        worker_queue.batch(cache=None, refresh_after=10)(f)
    with pytest.raises(ValueError, match="refresh_backoff"):
        worker_queue.batch(refresh_backoff=0)
    with pytest.raises(ValueError, match="below the cache's ttl"):
        worker_queue.batch(cache=cachetools.TTLCache(10, ttl=5), refresh_after=10)(f)
