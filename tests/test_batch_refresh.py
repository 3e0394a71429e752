"""Refresh-ahead in bulk (issue 19, point 7): the keys of a batch function found due are
refreshed in the background, in batches, under the rules of single refreshes: a refresh batch
takes only a spare slot, a failure keeps the old value until the back-off ends, an invalidation
wins, and a caller who comes to wait for a refresh makes it a caller's batch. With the per-key
result policy (cache_if, ttl, cache_errors, stale_if_error): each key is due by its own
lifetime, a refresh result the policy refuses leaves the entry, a failing refresh leaves the
fresh value (nothing remembered over it), a remembered error is never refreshed ahead, and a
stale value served is not refreshed ahead before the back-off."""

from __future__ import annotations

import asyncio
from typing import Any

import cachetools
import pytest
from test_batch import GatedBatch, bounded, settle

from wq_memo import MISSING, CachedError, worker_queue
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


# -- with the per-key result policy ---------------------------------------------------------------


def lifetimes(value: str) -> float:
    """A ttl function: a value of an odd key lives 8 s, of an even key 40 s."""
    return 8.0 if int(value.split("#")[0]) % 2 else 40.0


async def test_with_a_ttl_function_each_key_is_due_by_its_own_lifetime() -> None:
    # No reference lifetime (a dict, a ttl function): an entry living L seconds is due after
    # min(refresh_after, L / 2): key 1 after 4 s, key 2 after 10 s.
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=lifetimes)
    await loaded(g, load, [1, 2])
    clock.now = 3.9
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await settle()
    assert len(g.calls) == 1
    clock.now = 4
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await g.wait_calls(2)
    assert g.calls[1] == [1]  # only the short-lived key
    g.release(1)
    await settle()
    assert load.cache_peek(1) == "1#1"
    clock.now = 7.9  # 1, refreshed at 4, is due at 8; 2 at 10
    assert await load.many([1, 2]) == ["1#1", "2#0"]
    await settle()
    assert len(g.calls) == 2
    clock.now = 10
    assert await load.many([1, 2]) == ["1#1", "2#0"]
    await g.wait_calls(3)
    assert g.calls[2] == [1, 2]
    g.release(2)
    await settle()
    assert [load.cache_peek(1), load.cache_peek(2)] == ["1#2", "2#2"]
    assert load.cache_info().refreshes == 3


async def test_a_refresh_result_the_policy_refuses_leaves_the_entry_until_it_expires() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=30, cache_if=lambda v: not v.endswith("#1"))
    await loaded(g, load, [1, 2])
    clock.now = 11
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await g.wait_calls(2)
    g.release(1, lambda keys, n: {1: "1#1", 2: "2#x"})
    await settle()
    assert load.cache_peek(1) == "1#0"  # refused: the entry stays as it was
    assert load.cache_peek(2) == "2#x"
    assert load.cache_info().uncached == 1
    clock.now = 29.9
    assert load.cache_peek(1) == "1#0"
    clock.now = 30  # it expires when it would have: the refused refresh did not extend it
    assert load.cache_peek(1) is MISSING


async def test_a_failing_refresh_leaves_fresh_values_and_remembers_nothing() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=30, cache_errors={LookupError: 5.0}, stale_if_error=50)
    await loaded(g, load, [1, 2])
    clock.now = 11
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await g.wait_calls(2)
    g.release(1, lambda keys, n: {1: LookupError("gone"), 2: f"2#{n}"})
    await settle()
    assert load.cache_peek(1) == "1#0"  # not a remembered error
    assert load.cache_peek(2) == "2#1"
    info = load.cache_info()
    assert (info.refresh_failures, info.stale) == (1, 0)


async def test_a_failing_refresh_batch_leaves_every_fresh_value() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=30, cache_errors={OSError: 5.0})
    await loaded(g, load, [1, 2])
    clock.now = 11
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await g.wait_calls(2)

    def down(keys: list[int], n: int) -> Any:
        raise OSError("down")

    g.release(1, down)
    await settle()
    assert [load.cache_peek(1), load.cache_peek(2)] == ["1#0", "2#0"]
    assert load.cache_info().refresh_failures == 2


async def test_a_remembered_error_is_never_refreshed_ahead() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=30, cache_errors={LookupError: 20.0})
    many = asyncio.create_task(load.many([1]))
    await g.wait_calls(1)
    g.release(0, lambda keys, n: {1: LookupError("gone")})
    with pytest.raises(LookupError):
        await bounded(many)
    assert load.cache_peek(1) == CachedError(LookupError, ("gone",))
    clock.now = 15  # past refresh_after: raised anew, not refreshed
    with pytest.raises(LookupError, match="gone"):
        await load(1)
    await settle()
    assert len(g.calls) == 1
    assert load.cache_info().refreshes == 0


async def test_a_stale_value_served_is_not_refreshed_ahead_before_the_back_off() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=30, stale_if_error=50, refresh_backoff=3)
    await loaded(g, load, [1])
    clock.now = 31  # expired: the load fails, its stale value is served
    one = asyncio.create_task(load(1))
    await g.wait_calls(2)
    g.release(1, lambda keys, n: {1: LookupError("gone")})
    assert await bounded(one) == "1#0"
    assert load.cache_info().stale == 1
    clock.now = 33.9  # served again for the back-off, neither loaded nor refreshed ahead
    assert await load(1) == "1#0"
    await settle()
    assert len(g.calls) == 2
    assert load.cache_info().refreshes == 0
    clock.now = 34  # the next attempt: a miss
    two = asyncio.create_task(load(1))
    await g.wait_calls(3)
    g.release(2)
    assert await bounded(two) == "1#2"


async def test_an_invalidation_wins_over_a_refresh_batch_with_the_policy() -> None:
    g, clock = GatedBatch(), Clock()
    load = refreshing(g, clock, ttl=30, cache_errors={LookupError: 5.0}, stale_if_error=50)
    await loaded(g, load, [1, 2])
    clock.now = 11
    assert await load.many([1, 2]) == ["1#0", "2#0"]
    await g.wait_calls(2)
    assert load.cache_invalidate(1)
    g.release(1, lambda keys, n: {1: LookupError("gone"), 2: f"2#{n}"})
    await settle()
    assert load.cache_peek(1) is MISSING  # nothing remembered, nothing stale kept
    assert load.cache_peek(2) == "2#1"
