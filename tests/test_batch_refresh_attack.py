"""Refresh-ahead in bulk with the per-key result policy, attacked: a batch function's keys
being a fresh value due, a remembered error and a stale value served, looked up together, and
an invalidation or a prime of one key while their refresh runs (the refresh then failing)."""

from __future__ import annotations

import asyncio

import pytest
from test_batch import GatedBatch, bounded, settle

from wq_memo import MISSING, CachedError, worker_queue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lifetimes(value: str) -> float:
    """A ttl function: key 1's values live 100 s, the others' 30 s."""
    return 100.0 if value.startswith("1#") else 30.0


@pytest.mark.parametrize("how", ["invalidate", "prime"])
async def test_only_the_fresh_key_due_is_refreshed_beside_an_error_and_a_stale_value(
    how: str,
) -> None:
    g, clock = GatedBatch(), Clock()
    load = worker_queue.batch(
        cache={},
        refresh_after=10,
        refresh_backoff=3,
        timer=clock,
        ttl=lifetimes,
        cache_errors={LookupError: 20.0},
        stale_if_error=50,
    )(g)
    many = asyncio.create_task(load.many([1, 3]))
    await g.wait_calls(1)
    g.release(0)
    assert await bounded(many) == ["1#0", "3#0"]
    clock.now = 25  # key 2's error is remembered until 45
    two = asyncio.create_task(load(2))
    await g.wait_calls(2)
    g.release(1, lambda keys, n: {2: LookupError("gone")})
    with pytest.raises(LookupError):
        await bounded(two)
    clock.now = 31  # key 3 expired: its load fails, its stale value served until 34
    three = asyncio.create_task(load(3))
    await g.wait_calls(3)
    g.release(2, lambda keys, n: {3: LookupError("down")})
    assert await bounded(three) == "3#0"
    await settle()
    assert len(g.calls) == 3
    clock.now = 32  # key 1 is due (since 10): refreshed alone
    assert await bounded(load.many([1, 3])) == ["1#0", "3#0"]
    with pytest.raises(LookupError, match="gone"):
        await bounded(load(2))
    await g.wait_calls(4)
    await settle()
    assert g.calls[3] == [1]
    assert len(g.calls) == 4
    # While its refresh runs: nothing of it is kept.
    if how == "invalidate":
        assert load.cache_invalidate(1)
    else:
        load.cache_prime("1#p", 1)
    if how == "prime":  # and the refresh fails: neither stale nor remembered over the prime
        g.release(3, lambda keys, n: {1: LookupError("late")})
    else:
        g.release(3)
    await settle()
    assert load.cache_peek(1) == ("1#p" if how == "prime" else MISSING)
    assert load.cache_peek(2) == CachedError(LookupError, ("gone",))
    assert load.cache_peek(3) == "3#0"
    info = load.cache_info()
    failed = 1 if how == "prime" else 0
    assert (info.refreshes, info.refresh_failures, info.stale, info.uncached) == (1, failed, 1, 0)
