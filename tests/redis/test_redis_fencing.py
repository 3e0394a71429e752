"""Fencing: a write is tied to the lock it was computed under (issue 11, item 4).

A holder that lost its lease never overwrites a value stored by a later holder, and a
computation under way when delete() or clear() ran does not store its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until

from wq_memo import worker_queue
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
KEY = CallKey("m.f", ("fenced",))


class Held:
    """A computation that starts, then waits for release."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        return self.value


def test_a_holder_that_lost_its_lease_never_overwrites_a_later_value(
    redis_url: str, redis_namespace: str, sync_redis: Any
) -> None:
    names = key_names(redis_namespace, KEY)
    p1 = RedisCache(redis_url, namespace=redis_namespace, lease=0.3)
    p2 = RedisCache(redis_url, namespace=redis_namespace, lease=0.3)
    computing, newer_stored = threading.Event(), threading.Event()

    def process_1() -> str:
        async def stalls() -> str:
            computing.set()
            # The whole process stalls (a long GC pause, swapping): its event loop cannot
            # renew the lease, which runs out; it wakes after another holder stored.
            assert newer_stored.wait(20)
            return "older"

        async def main() -> str:
            try:
                return await p1.get_or_compute(KEY, stalls)
            finally:
                await p1.aclose()

        return asyncio.run(main())

    async def process_2() -> str:
        async def newer() -> str:
            return "newer"

        try:
            async with asyncio.timeout(10):
                await until(lambda: not sync_redis.exists(names.lock))  # P1's lease ran out
                return await p2.get_or_compute(KEY, newer)
        finally:
            await p2.aclose()

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(process_1)
        assert computing.wait(10)
        assert asyncio.run(process_2()) == "newer"
        newer_stored.set()
        assert first.result(20) == "older"  # P1's own callers get what P1 computed
    assert sync_redis.get(names.value)[12:] == b'"newer"'  # after the tag and write time
    assert p1.stats().lock_lost == 1
    assert p2.stats().lock_lost == 0


@pytest.mark.parametrize("how", ["delete", "clear"])
async def test_a_computation_under_way_when_the_key_is_removed_stores_nothing(
    how: str, make_redis_cache: Make, sync_redis: Any
) -> None:
    holder, waiter, other = make_redis_cache(), make_redis_cache(), make_redis_cache()
    names = key_names(holder.namespace, KEY)
    old, fresh = Held("old"), Held("fresh")
    fresh.release.set()
    async with asyncio.timeout(10):
        computing = asyncio.create_task(holder.get_or_compute(KEY, old))
        await old.started.wait()
        waiting = asyncio.create_task(waiter.get_or_compute(KEY, fresh))
        await until(lambda: sync_redis.pubsub_numsub(names.channel)[0][1] == 1)
        if how == "delete":
            assert await other.delete(KEY) is False  # nothing stored yet, but the lock goes
        else:
            await other.clear()
        # The waiter is told at once, and computes afresh (the computation it waited for was
        # removed with the key).
        assert await waiting == "fresh"
        old.release.set()
        assert await computing == "old"  # its callers still get it ...
    assert await other.get(KEY) == "fresh"  # ... but it did not overwrite the fresh value
    assert holder.stats().lock_lost == 1
    assert (old.calls, fresh.calls) == (1, 1)


async def test_invalidating_a_call_under_way_keeps_its_result_out_of_redis(
    make_redis_cache: Make,
) -> None:
    cache = make_redis_cache()
    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    @worker_queue(cache=cache, name="slow")
    async def slow(x: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        return x * calls

    async with asyncio.timeout(10):
        first = asyncio.create_task(slow(5))
        await started.wait()
        await slow.acache_invalidate(5)
        gate.set()
        assert await first == 5
        assert await cache.get(CallKey("slow", (5,))) is MISSING
        assert await slow(5) == 10  # computed again, and stored this time
        assert await slow(5) == 10
    assert calls == 2
    await slow.queue.aclose()


async def test_a_repeated_finish_is_told_from_a_lost_lock(make_redis_cache: Make) -> None:
    """A store that timed out in the client may still run in Redis; its retry must not count
    as a lost lock."""
    cache = make_redis_cache()
    names = key_names(cache.namespace, KEY)
    scripts = cache._flight.scripts(cache._conn.link())
    keys = [names.value, names.lock, names.marker, cache._ns.epoch]
    claimed = await scripts.claim(keys=keys, args=[b"t1", 10_000, 1000, b"1", b"1"])
    epoch = claimed[2]

    async def finish(token: bytes, data: bytes, again: bytes) -> Any:
        args = [token, b"s", data, 0, names.channel, b"d", 60_000, epoch, again]
        return await scripts.finish(keys=keys, args=args)

    assert await finish(b"t1", b'wq1j"v"', b"0") == 1  # stored, unlocked, announced
    assert await finish(b"t1", b'wq1j"v"', b"1") == 2  # a repeat of that very store
    assert await finish(b"t1", b'wq1j"v"', b"0") == 0  # a first attempt without the lock
    assert await finish(b"t2", b'wq1j"w"', b"1") == 0  # another value without the lock: lost
    assert await cache.get(KEY) == "v"


class LosingCancellations:
    """Stands in for a cache's connector: its lease renewals take their time to answer and
    lose a cancellation, as redis-py sometimes does; then they wait for ``reply``."""

    def __init__(self, cache: RedisCache) -> None:
        self.conn = cache._conn
        self.renewing = asyncio.Event()
        self.reply = asyncio.Event()
        self.reply.set()
        self.renewals = 0
        cache._flight._conn = self  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    async def call(self, what: str, op: Any, **kwargs: Any) -> Any:
        if what == "lease renewal":
            self.renewals += 1
            self.renewing.set()
            with contextlib.suppress(asyncio.CancelledError):  # lost
                await asyncio.sleep(10)
            await self.reply.wait()
        return await self.conn.call(what, op, **kwargs)


async def test_a_cancellation_lost_by_redis_py_does_not_keep_the_lease_renewing(
    make_redis_cache: Make,
) -> None:
    """redis-py sometimes swallows a cancellation that arrives while it awaits a reply. The
    computation's end must still stop the renewals, or the holder waits for its renewing task
    forever while it keeps the lock alive for every waiter."""
    cache = make_redis_cache(lease=0.3)
    losing = LosingCancellations(cache)

    async def compute() -> str:
        await losing.renewing.wait()  # the renewal is on its way when the computation ends
        return "v"

    async with asyncio.timeout(5):
        assert await cache.get_or_compute(KEY, compute) == "v"
    await asyncio.sleep(0.3)  # a renewal period and more: none starts after the end
    assert losing.renewals == 1
    assert await cache.get(KEY) == "v"


async def test_a_caller_cancelled_while_the_renewals_stop_is_cancelled(
    make_redis_cache: Make,
) -> None:
    """The computation has ended and its renewing task is being stopped, slowly: a
    cancellation of the caller meanwhile reaches it, rather than being swallowed with the
    renewing task's own."""
    cache = make_redis_cache(lease=0.3)
    losing = LosingCancellations(cache)
    losing.reply.clear()

    async def compute() -> str:
        await losing.renewing.wait()
        return "v"

    caller = asyncio.create_task(cache.get_or_compute(CallKey("m.f", ("stopping",)), compute))
    async with asyncio.timeout(5):
        await losing.renewing.wait()
    for _ in range(5):  # the computation returns; stopping the renewals waits for the reply
        await asyncio.sleep(0)
    assert not caller.done()
    caller.cancel()
    await asyncio.wait([caller], timeout=2)
    try:
        assert caller.cancelled(), "the caller's cancellation was swallowed"
    finally:
        losing.reply.set()
        await asyncio.wait([caller], timeout=5)
