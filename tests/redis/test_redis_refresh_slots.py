"""Refresh-ahead through RedisCache, and the process's slots: a background refresh takes a spare
slot before it tries the key's lock (so a busy process leaves refreshes to idle ones, and a miss
never waits behind refreshes), and each entry gets one jittered due time (issue 17)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo import worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 20.0


def _seed(sync_redis: Any, names: KeyNames, value: Any, age: float, ttl: float = 120) -> None:
    """Store value as if written age seconds ago (JSON format, Redis TTL of ttl seconds)."""
    data = ValueCodec(None, lambda: time.time() - age).dumps(names.value, value)
    sync_redis.set(names.value, data, px=round(ttl * 1000))


def _names(cache: RedisCache, key: str) -> KeyNames:
    return key_names(cache.namespace, CallKey("src", cachetools.keys.hashkey(key)))


class Source:
    """An async function of a key returning f"{key}#{n}" for its n-th computation; keys given a
    gate are held by it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}

    def began(self, key: str) -> asyncio.Event:
        return self.started.setdefault(key, asyncio.Event())

    async def __call__(self, key: str) -> str:
        self.calls.append(key)
        n = len(self.calls)
        self.began(key).set()
        gate = self.gates.get(key)
        if gate is not None:
            await gate.wait()
        return f"{key}#{n}"


def _locks(sync_redis: Any, cache: RedisCache, keys: list[str]) -> int:
    """How many of keys' lease locks exist in Redis."""
    return int(sync_redis.exists(*(_names(cache, k).lock for k in keys)))


async def test_a_miss_never_waits_behind_queued_refreshes(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    """maxsize=1, five due keys: one refresh computes (held), four wait for a spare slot without
    taking their locks; a miss arriving after them computes at once."""
    cache = make_redis_cache(ttl=120)
    source = Source()
    f = worker_queue(maxsize=1, cache=cache, name="src", refresh_after=30)(source)
    keys = [f"k{i}" for i in range(5)]
    for key in keys:
        _seed(sync_redis, _names(cache, key), f"{key}#0", age=40)
    held = source.gates["k0"] = asyncio.Event()
    async with asyncio.timeout(WAIT):
        for key in keys:
            assert await f(key) == f"{key}#0"  # due: served at once, refreshed in the background
        await source.began("k0").wait()
        assert _locks(sync_redis, cache, keys) == 1  # only the refresh that can run claims
        assert await f("miss") == "miss#2"  # k0's refresh is still held
        assert not held.is_set()
        assert source.calls == ["k0", "miss"]
        held.set()
        await until(lambda: len(source.calls) == 6, WAIT)
        await until(lambda: f.queue.computing == 0 and f.queue.waiting == 0, WAIT)
    assert sorted(source.calls) == sorted([*keys, "miss"])
    assert f.cache_info().refreshes == 5


async def test_a_busy_process_leaves_due_keys_to_an_idle_one(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    """40 due keys, process A with maxsize=1 busy refreshing one of them: A claims only that one,
    so idle process B refreshes the other 39; A's queued refreshes, once they get a slot, find
    their entries refreshed and compute nothing."""
    cache_a, cache_b = make_redis_cache(ttl=120), make_redis_cache(ttl=120)
    source_a, source_b = Source(), Source()
    a = worker_queue(maxsize=1, cache=cache_a, name="src", refresh_after=30)(source_a)
    b = worker_queue(maxsize=40, cache=cache_b, name="src", refresh_after=30)(source_b)
    keys = [f"k{i}" for i in range(40)]
    for key in keys:
        _seed(sync_redis, _names(cache_a, key), f"{key}#0", age=40)
    held = source_a.gates["k0"] = asyncio.Event()
    async with asyncio.timeout(WAIT):
        assert [await a(key) for key in keys] == [f"{key}#0" for key in keys]
        await source_a.began("k0").wait()
        assert _locks(sync_redis, cache_a, keys) == 1
        assert [await b(key) for key in keys] == [f"{key}#0" for key in keys]
        await until(lambda: len(source_b.calls) == 39, WAIT)
        await until(lambda: _locks(sync_redis, cache_a, keys) == 1, WAIT)
        assert sorted(source_b.calls) == sorted(keys[1:])
        held.set()
        await until(lambda: a.queue.computing == 0 and a.queue.waiting == 0, WAIT)
        await until(lambda: _locks(sync_redis, cache_a, keys) == 0, WAIT)
        assert source_a.calls == ["k0"]  # each key refreshed once, across both processes
        values = [await b.acache_peek(key) for key in keys]
    assert values[0] == "k0#1"
    assert all(
        isinstance(v, str) and v.startswith(f"{key}#") and v != f"{key}#0"
        for key, v in zip(keys, values, strict=True)
    )
    assert cache_b.stats().refresh_skipped == 1
    assert a.cache_info().refreshes == 40


async def test_a_refresh_waiting_for_another_process_gives_its_slot_back(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    """maxsize=1: A's refresh of k1 finds k1's lock held by B and its entry gone (expired), so it
    waits for B's result: it does so without a slot, and A's refresh of k2 computes meanwhile."""
    cache_a, cache_b = make_redis_cache(ttl=120), make_redis_cache(ttl=120)
    source_a, source_b = Source(), Source()
    a = worker_queue(maxsize=1, cache=cache_a, name="src", refresh_after=30)(source_a)
    b = worker_queue(maxsize=4, cache=cache_b, name="src", refresh_after=30)(source_b)
    keys = ["k0", "k1", "k2"]
    for key in keys:
        _seed(sync_redis, _names(cache_a, key), f"{key}#0", age=40)
    held_by_a = source_a.gates["k0"] = asyncio.Event()
    held_by_b = source_b.gates["k1"] = asyncio.Event()
    try:
        async with asyncio.timeout(WAIT):
            assert await b("k1") == "k1#0"
            await source_b.began("k1").wait()  # B refreshes k1, under its lock
            assert [await a(key) for key in keys] == ["k0#0", "k1#0", "k2#0"]
            await source_a.began("k0").wait()  # A's one slot: k0; k1 and k2 wait for it
            sync_redis.delete(_names(cache_a, "k1").value)  # k1's entry expires
            held_by_a.set()
            await until(lambda: "k2" in source_a.calls, 5.0)
            assert not held_by_b.is_set()
            assert cache_a.stats().refresh_skipped == 1  # k1: B holds it
            held_by_b.set()
            # A's refresh of k1 waits for B's result holding no slot, so it counts in neither
            # computing nor waiting: wait for B's store itself.
            k1 = _names(cache_a, "k1").value
            await until(
                lambda: (
                    sync_redis.exists(k1) == 1 and a.queue.computing == 0 and a.queue.waiting == 0
                ),
                WAIT,
            )
            assert await a.acache_peek("k1") == "k1#1"  # B's result
    finally:
        held_by_a.set()
        held_by_b.set()
        await a.queue.aclose()
        await b.queue.aclose()
    assert source_a.calls == ["k0", "k2"]
    assert source_b.calls == ["k1"]


async def test_jitter_draws_once_per_entry(make_redis_cache: Make, sync_redis: Any) -> None:
    """200 entries written together, each read 30 times: every entry keeps the due time drawn
    when it was first read, spread over refresh_after=10 +- 50%, about 3 in 4 of them due by
    12.5 s (a draw at each read, keeping the latest, pushes them all towards 15 s)."""
    cache = make_redis_cache(ttl=120)
    random.seed(17)
    f = worker_queue(
        maxsize=8, cache=cache, name="src", refresh_after=10, jitter=0.5, timer=time.time
    )(Source())
    keys = [f"k{i}" for i in range(200)]
    first = time.time() - 0.001  # write times are kept in milliseconds
    for key in keys:
        _seed(sync_redis, _names(cache, key), key, age=0)
    last = time.time()
    due: dict[Any, float] | None = None
    async with asyncio.timeout(WAIT):
        for _ in range(30):
            assert await asyncio.gather(*(f(key) for key in keys)) == keys
            if due is None:
                due = dict(f._refresher.due)  # type: ignore[attr-defined]
            else:
                assert f._refresher.due == due  # type: ignore[attr-defined]
    assert due is not None
    assert len(due) == 200
    assert all(first + 5 <= d <= last + 15 for d in due.values())
    share = sum(d <= first + 12.5 for d in due.values()) / len(due)
    assert 0.6 <= share <= 0.9, share
    assert f.cache_info().refreshes == 0
