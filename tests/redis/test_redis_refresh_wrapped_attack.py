"""Refresh-ahead with the result policy through RedisCache, attacked across two caches on one
namespace: a background refresh that waited for a slot looks at the entry again, and finds
what the other process left meanwhile (a remembered error is never refreshed ahead)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo import CachedError, worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0


class Gated:
    """An async function of a key returning f"{key}#{n}" for its n-th call; the key "busy"
    waits for ``gate``; ``failure``, if set, is raised for every other key."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.busy = asyncio.Event()
        self.failure: Exception | None = None

    async def __call__(self, key: str) -> str:
        self.calls.append(key)
        if key == "busy":
            self.busy.set()
            await self.gate.wait()
        elif self.failure is not None:
            raise self.failure
        return f"{key}#{len(self.calls)}"


def _names(cache: RedisCache, key: str) -> KeyNames:
    return key_names(cache.namespace, CallKey("src", cachetools.keys.hashkey(key)))


async def test_a_refresh_that_waited_for_a_slot_leaves_an_error_remembered_meanwhile(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    here, there = Gated(), Gated()
    there.failure = TimeoutError("slow")
    a, b = make_redis_cache(ttl=100), make_redis_cache(ttl=100)
    options: dict[str, Any] = {
        "refresh_after": 30,
        "ttl": 50,
        "cache_errors": {TimeoutError: 60.0},
        "name": "src",
    }
    fa = worker_queue(cache=a, maxsize=1, **options)(here)
    fb = worker_queue(cache=b, **options)(there)
    names = _names(a, "k")
    # A plain value written 40 s ago (due), which Redis drops soon.
    data = ValueCodec(None, lambda: time.time() - 40).dumps(names.value, "v")
    sync_redis.set(names.value, data, px=300)
    async with asyncio.timeout(WAIT):
        busy = asyncio.create_task(fa("busy"))  # holds this process's only slot
        await here.busy.wait()
        assert await fa("k") == "v"  # due: its refresh waits for a slot
        await until(lambda: not sync_redis.exists(names.value), WAIT)
        with pytest.raises(TimeoutError):  # the other process's miss: its error remembered
            await fb("k")
        here.gate.set()
        assert await busy == "busy#1"
        await until(lambda: fa.queue._engine.live == 0, WAIT)  # the refresh ended
        assert await fb.acache_peek("k") == CachedError(TimeoutError, ("slow",))
    assert here.calls == ["busy"]  # the remembered error was not refreshed ahead
