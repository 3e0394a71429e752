"""Refresh-ahead through RedisCache: each entry gets one jittered due time (issue 17)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

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
