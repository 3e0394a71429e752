"""Refresh-ahead with the result policy through RedisCache, attacked across two caches on one
namespace: a background refresh that waited for a slot looks at the entry again and finds what
the other process left meanwhile (a remembered error is never refreshed ahead); a background
refresh while Redis stalls or is down ends within the cache's timeouts, logged, with nothing
remembered over the fresh value; a refresh a caller joined, failing after an invalidation, clear
or prime in the other process, keeps nothing."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer
from redis_waits import until

from wq_memo import CachedError, worker_queue
from wq_memo._policy import Kept
from wq_memo.backends import MISSING, CallKey
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


TIMEOUT = 0.3


def _seed_kept(client: Any, names: KeyNames, value: Any, age: float, left: float) -> None:
    """A Kept value written age seconds ago, fresh ``left`` seconds more, kept 100 s past."""
    now = time.time()
    entry = Kept(value, now + left, now + left + 100, None, False)
    data = ValueCodec(None, lambda: now - age).dumps(names.value, entry)
    client.set(names.value, data, px=round((left + 100) * 1000))


@pytest.mark.parametrize("fault", ["stall", "down"])
@pytest.mark.parametrize("outcome", ["value", "remembered error"])
async def test_a_background_refresh_when_redis_fails_is_bounded_and_keeps_nothing(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture, fault: str, outcome: str
) -> None:
    import redis

    caplog.set_level(logging.INFO, logger="wq_memo")
    started, hold = asyncio.Event(), asyncio.Event()

    async def src(key: str) -> str:
        started.set()
        await hold.wait()
        if outcome == "remembered error":
            raise TimeoutError("slow")
        return "new"

    cache = RedisCache(own_redis.url, namespace="refresh-faults", timeout=TIMEOUT)
    f = worker_queue(
        cache=cache,
        name="src",
        refresh_after=30,
        ttl=50,
        cache_errors={TimeoutError: 60.0},
        stale_if_error=100,
    )(src)
    client = redis.Redis.from_url(own_redis.url, socket_timeout=5)
    paused = False
    try:
        _seed_kept(client, _names(cache, "k"), "v", age=40, left=10)  # due
        async with asyncio.timeout(10):
            assert await f("k") == "v"  # due: refreshed ahead
            await started.wait()
        assert own_redis.proc is not None
        if fault == "stall":
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            paused = True
        else:
            own_redis.stop()
        loop = asyncio.get_running_loop()
        began = loop.time()
        hold.set()
        # The refresh ends within the cache's timeouts, its failure logged: a value is
        # returned unstored (nobody waits for it), an error neither remembered nor counted stale.
        await until(lambda: f.queue._engine.live == 0, 10 * TIMEOUT + 2)
        assert loop.time() - began < 10 * TIMEOUT + 1
        assert any(r.levelno >= logging.WARNING for r in caplog.records)
        info = f.cache_info()
        failed = 1 if outcome == "remembered error" else 0
        assert (info.refreshes, info.refresh_failures, info.stale) == (1, failed, 0)
        if fault == "stall":
            os.kill(own_redis.proc.pid, signal.SIGCONT)
            paused = False
            async with asyncio.timeout(10):
                found = await cache.peek_kept(CallKey("src", cachetools.keys.hashkey("k")))
            assert type(found) is Kept
            assert found.error is None  # no remembered error over the fresh value
            assert found.value in ("v", "new")
    finally:
        if paused:
            os.kill(own_redis.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        client.close()
        await cache.aclose()


@pytest.mark.parametrize("how", ["invalidate", "clear", "prime"])
@pytest.mark.parametrize("failure", ["stale", "remembered error"])
async def test_a_joined_refresh_failing_after_an_invalidation_elsewhere_keeps_nothing(
    make_redis_cache: Make, sync_redis: Any, failure: str, how: str
) -> None:
    # A refresh here is joined by a caller once its entry expired; the other process
    # invalidates the key; then the refresh fails. Neither the stale value nor the remembered
    # error is kept, and calls after the invalidation returned compute anew in both processes.
    started, hold = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def here(key: str) -> str:
        calls.append(key)
        if len(calls) == 1:
            started.set()
            await hold.wait()
            raise TimeoutError("slow")
        return f"{key}#{len(calls)}"

    a, b = make_redis_cache(ttl=200), make_redis_cache(ttl=200)
    options: dict[str, Any] = {
        "refresh_after": 30,
        "ttl": 50,
        "cache_errors": {TimeoutError: 60.0},
        "name": "src",
    }
    if failure == "stale":
        options["stale_if_error"] = 100
    fa = worker_queue(cache=a, **options)(here)
    fb = worker_queue(cache=b, **options)(Gated())
    names = _names(a, "k")
    expires = time.time() + 0.3
    entry = Kept("v", expires, expires + 100, None, False)
    data = ValueCodec(None, lambda: expires - 40.3).dumps(names.value, entry)
    sync_redis.set(names.value, data, px=100_300)
    async with asyncio.timeout(WAIT):
        assert await fa("k") == "v"  # due: its refresh computes, held
        await started.wait()
        await until(lambda: time.time() > expires + 0.05, WAIT)
        joined = asyncio.ensure_future(fa("k"))  # expired: joins the refresh
        await until(lambda: fa.cache_info().joined == 1, WAIT)
        if how == "invalidate":
            assert await fb.acache_invalidate("k")
        elif how == "clear":
            await fb.acache_clear()
        else:
            await fb.acache_prime("primed", "k")
        hold.set()
        try:
            got: Any = await joined
        except TimeoutError as exc:
            got = exc
        assert got == "v" or isinstance(got, TimeoutError)  # it began before the invalidation
        await until(lambda: fa.queue._engine.live == 0, WAIT)
        if how == "prime":
            assert await fb.acache_peek("k") == "primed"
            assert await fa("k") == "primed"
        else:
            assert await fb.acache_peek("k") is MISSING
            assert await fb("k") == "k#1"
            assert await fa("k") == "k#1"
