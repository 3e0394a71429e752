"""Uncacheable results do not make processes compute one after another (issue 11, item 5)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

import redis_procs
from redis_spawn import CTX, Procs
from redis_waits import until, waiting

from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
PROCESSES = 8
COMPUTATION = 0.5


def test_eight_processes_compute_an_uncacheable_value_side_by_side(
    procs: Procs, redis_url: str, redis_namespace: str
) -> None:
    rounds = [CTX.Event(), CTX.Event()]
    for _ in range(PROCESSES):
        procs.start(redis_procs.uncacheable_rounds, redis_url, redis_namespace, COMPUTATION, rounds)
    procs.expect("ready", PROCESSES, timeout=60)
    took: list[list[float]] = []
    for go in rounds:
        go.set()
        done = procs.expect("round", PROCESSES, timeout=30)
        assert [message[4] for message in done] == [1] * PROCESSES  # one computation each
        took.append([message[3] for message in done])
    # First time: the holder's computation, then the seven others at once, side by side
    # (one after another, the slowest would take eight computations: 4 s).
    assert max(took[0]) < 3 * COMPUTATION, took[0]
    # From then on the function is known not to be stored: nobody waits at all.
    assert max(took[1]) < 1.8 * COMPUTATION, took[1]


async def test_waiters_learn_the_value_is_not_stored_and_compute_at_once(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    holder, waiter = make_redis_cache(), make_redis_cache()
    key = CallKey("m.pair", (1,))
    release, started = asyncio.Event(), asyncio.Event()

    async def held_pair() -> tuple[int, str]:
        started.set()
        await release.wait()
        return (1, "holder")

    async def pair() -> tuple[int, str]:
        return (1, "waiter")

    async with asyncio.timeout(10):
        first = asyncio.create_task(holder.get_or_compute(key, held_pair))
        await started.wait()
        second = asyncio.create_task(waiter.get_or_compute(key, pair))
        channel = key_names(holder.namespace, key).channel
        await until(lambda: waiting(waiter, channel) == 1)
        release.set()
        assert await first == (1, "holder")
        assert await second == (1, "waiter")  # computed at once, not after taking the lock
        # The function is now marked: a later waiter does not wait for a holder at all.
        other = CallKey("m.pair", (2,))
        sync_redis.set(key_names(holder.namespace, other).lock, "someone", px=60_000)
        assert await waiter.get_or_compute(other, pair) == (1, "waiter")
    assert waiter.stats().unencodable == 0  # the waiter computed, but never tried to store
    assert holder.stats().unencodable == 1
    assert waiter.stats().wait_timeouts == 0


async def test_a_cacheable_result_lifts_the_mark(make_redis_cache: Make, sync_redis: Any) -> None:
    cache = make_redis_cache()
    flip = {"tuple": True}

    async def sometimes_a_tuple() -> Any:
        return (1, 2) if flip["tuple"] else [1, 2]

    marker = key_names(cache.namespace, CallKey("m.g", ())).marker
    assert await cache.get_or_compute(CallKey("m.g", (1,)), sometimes_a_tuple) == (1, 2)
    assert sync_redis.exists(marker)
    flip["tuple"] = False
    assert await cache.get_or_compute(CallKey("m.g", (2,)), sometimes_a_tuple) == [1, 2]
    assert not sync_redis.exists(marker)
    assert await cache.get(CallKey("m.g", (2,))) == [1, 2]
