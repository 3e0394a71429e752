"""Single flight through the Redis lock, with several RedisCaches standing in for processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis")

import cachetools.keys
from redis_waits import until, waiting

from wq_memo import worker_queue
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
KEY = CallKey("m.f", ("cold",))


class Gauge:
    """Counts computations and the most that ran at once."""

    def __init__(self, expected: int = 1) -> None:
        self.expected = expected
        self.all_running = asyncio.Event()
        self.calls = 0
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, value: Any = "v", fail: bool = False) -> Any:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.started.set()
        if self.running == self.expected:
            self.all_running.set()
        try:
            await self.release.wait()
            if fail:
                raise RuntimeError("compute failed")
            return value
        finally:
            self.running -= 1


async def test_many_callers_on_many_caches_compute_once(make_redis_cache: Make) -> None:
    caches = [make_redis_cache() for _ in range(4)]
    gauge = Gauge()
    async with asyncio.timeout(10):
        tasks = [
            asyncio.create_task(cache.get_or_compute(KEY, gauge))
            for _ in range(10)
            for cache in caches
        ]
        await gauge.started.wait()
        gauge.release.set()
        assert await asyncio.gather(*tasks) == ["v"] * 40
    assert gauge.calls == 1
    assert sum(c.stats().computed for c in caches) == 1
    # The others waited for it, or found it stored if they looked after it was done.
    assert sum(c.stats().waited + c.stats().hits for c in caches) == 39
    assert await caches[0].get(KEY) == "v"


async def test_hit_does_not_compute(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    await cache.set(KEY, "stored")

    async def compute() -> str:
        raise AssertionError("must not run")

    assert await cache.get_or_compute(KEY, compute) == "stored"


async def test_failed_computation_is_not_cached_and_waiters_go_one_at_a_time(
    make_redis_cache: Make,
) -> None:
    caches = [make_redis_cache() for _ in range(4)]
    gauge = Gauge()
    outcomes: list[Any] = []

    async def compute() -> Any:
        return await gauge("v", fail=gauge.calls < 3)  # the first three computations fail

    async def call(cache: RedisCache) -> None:
        try:
            outcomes.append(await cache.get_or_compute(KEY, compute))
        except RuntimeError as exc:
            outcomes.append(str(exc))

    gauge.release.set()
    async with asyncio.timeout(10):
        await asyncio.gather(*(call(c) for c in caches for _ in range(3)))
    assert gauge.peak == 1
    assert gauge.calls == 4
    assert sorted(outcomes) == ["compute failed"] * 3 + ["v"] * 9
    assert await caches[0].get(KEY) == "v"


async def test_computation_longer_than_the_lease_keeps_its_lock(make_redis_cache: Make) -> None:
    caches = [make_redis_cache(lease=0.25) for _ in range(3)]
    gauge = Gauge()
    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(c.get_or_compute(KEY, gauge)) for c in caches]
        await gauge.started.wait()
        await asyncio.sleep(1.0)  # the computation lasts four leases: only renewal keeps the lock
        gauge.release.set()
        assert await asyncio.gather(*tasks) == ["v"] * 3
    assert gauge.calls == 1
    assert sum(c.stats().lock_lost for c in caches) == 0


async def test_cancelled_holder_releases_the_lock_at_once(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    holder_cache, waiter_cache = make_redis_cache(lease=30), make_redis_cache(lease=30)
    first, second = Gauge(), Gauge()
    second.release.set()
    async with asyncio.timeout(5):  # far less than the 30 s lease
        holder = asyncio.create_task(holder_cache.get_or_compute(KEY, first))
        await first.started.wait()
        waiter = asyncio.create_task(waiter_cache.get_or_compute(KEY, second))
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert await waiter == "v"
    assert (first.calls, second.calls) == (1, 1)
    assert not sync_redis.exists(key_names(holder_cache.namespace, KEY).lock)


async def test_waiter_gives_up_after_wait_and_computes_itself_without_storing(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(wait=0.2)
    lock = key_names(cache.namespace, KEY).lock
    sync_redis.set(lock, "someone else", px=60_000)

    async def compute() -> str:
        return "mine"

    async with asyncio.timeout(5):
        assert await cache.get_or_compute(KEY, compute) == "mine"
    assert cache.stats().wait_timeouts == 1
    # Computed without the lock, so not stored: the holder stores its own value.
    assert await cache.get(KEY) is MISSING


async def test_dead_holder_lease_expires_and_one_waiter_takes_over(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    caches = [make_redis_cache() for _ in range(3)]
    sync_redis.set(key_names(caches[0].namespace, KEY).lock, "dead holder", px=300)
    gauge = Gauge()
    gauge.release.set()
    async with asyncio.timeout(5):
        results = await asyncio.gather(*(c.get_or_compute(KEY, gauge) for c in caches))
    assert results == ["v"] * 3
    assert gauge.calls == 1


async def test_compute_exception_propagates_even_if_it_is_a_redis_error(
    make_redis_cache: Make,
) -> None:
    import redis

    cache = make_redis_cache()

    async def compute() -> str:
        raise redis.ConnectionError("from the user's own code")

    with pytest.raises(redis.ConnectionError, match="user's own"):
        await cache.get_or_compute(KEY, compute)
    assert cache.stats().redis_errors == 0


async def test_without_single_flight_every_cache_computes(make_redis_cache: Make) -> None:
    caches = [make_redis_cache(single_flight=False) for _ in range(3)]
    gauge = Gauge(expected=3)
    async with asyncio.timeout(5):
        tasks = [asyncio.create_task(c.get_or_compute(KEY, gauge)) for c in caches]
        await gauge.all_running.wait()
        gauge.release.set()
        assert await asyncio.gather(*tasks) == ["v"] * 3
    assert gauge.calls == 3
    assert await caches[0].get_or_compute(KEY, gauge) == "v"
    assert gauge.calls == 3


def _finish_as_holder(sync_redis: Any, cache: RedisCache, value: bytes) -> None:
    """Do what a holder in another process does when it is done: store, unlock, announce."""
    names = key_names(cache.namespace, KEY)
    sync_redis.set(names.value, value)
    sync_redis.delete(names.lock)
    sync_redis.publish(names.channel, "d")


async def test_waiter_is_woken_by_the_announcement_not_by_the_lease(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    names = key_names(cache.namespace, KEY)
    sync_redis.set(names.lock, "holder elsewhere", px=60_000)

    async def compute() -> str:
        raise AssertionError("the waiter must read the holder's value")

    waiter = asyncio.create_task(cache.get_or_compute(KEY, compute))
    async with asyncio.timeout(10):  # far less than the 60 s lease
        await until(lambda: waiting(cache, names.channel) == 1)
        _finish_as_holder(sync_redis, cache, b'wq1j"from elsewhere"')
        assert await waiter == "from elsewhere"
    assert cache.stats().waited == 1


async def test_small_value_travels_in_the_announcement(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    names = key_names(cache.namespace, KEY)
    sync_redis.set(names.lock, "holder elsewhere", px=60_000)

    async def compute() -> str:
        raise AssertionError("the waiter must take the announced value")

    waiter = asyncio.create_task(cache.get_or_compute(KEY, compute))
    async with asyncio.timeout(10):
        await until(lambda: waiting(cache, names.channel) == 1)
        # Nothing stored: the value is only in the announcement, and the lock stays held.
        sync_redis.publish(names.channel, b'dwq1j"inline"')
        assert await waiter == "inline"


async def test_result_announced_while_subscribing_is_not_missed(
    make_redis_cache: Make, sync_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wq_memo.backends._redis_flight import SingleFlight

    cache = make_redis_cache()
    sync_redis.set(key_names(cache.namespace, KEY).lock, "holder elsewhere", px=60_000)
    claim = SingleFlight.claim
    claims = 0

    async def claim_after_the_holder_finished(self: SingleFlight, *args: Any) -> Any:
        nonlocal claims
        claims += 1
        if claims == 2:
            # The holder finishes after the waiter found the lock held and subscribed, but
            # before it looks again: the value must be found by that look, not after the lease.
            _finish_as_holder(sync_redis, cache, b'wq1j"raced"')
        return await claim(self, *args)

    monkeypatch.setattr(SingleFlight, "claim", claim_after_the_holder_finished)

    async def compute() -> str:
        raise AssertionError("the waiter must read the holder's value")

    async with asyncio.timeout(10):
        assert await cache.get_or_compute(KEY, compute) == "raced"
    assert claims == 2


async def test_recursion_joining_a_claimed_computation_waiting_for_the_slot(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    """maxsize=1: fib(5) holds the slot; fib(3), called from outside, has claimed its lock and
    waits for the slot; fib(5)'s nested fib(4) joins fib(3) and lends it its slot (the three
    waited on each other for ever, the lock's lease renewed all along)."""
    go = asyncio.Event()
    cache = make_redis_cache()

    @worker_queue(cache=cache, name="fib", maxsize=1)
    async def fib(n: int) -> int:
        if n == 5:
            await go.wait()
        return n if n < 2 else await fib(n - 1) + await fib(n - 2)

    async with asyncio.timeout(10):
        five = asyncio.ensure_future(fib(5))
        await until(lambda: fib.queue.computing == 1)
        three = asyncio.ensure_future(fib(3))
        names = key_names(cache.namespace, CallKey("fib", cachetools.keys.hashkey(3)))
        await until(lambda: sync_redis.exists(names.lock) == 1)
        go.set()
        assert await five == 5
        assert await three == 2


async def test_a_computation_awaiting_an_explicit_refresh_of_another_key_lends_it_its_slot(
    make_redis_cache: Make,
) -> None:
    """f(3) awaits f.refresh(2), which awaits f.refresh(1)...: with maxsize=1 each refresh runs
    in the slot of the computation awaiting it (before, it waited for that slot for ever)."""
    cache = make_redis_cache()

    @worker_queue(maxsize=1, cache=cache, name="tests.redis.nested_refresh")
    async def f(k: int) -> int:
        return 0 if k == 0 else 1 + await f.refresh(k - 1)

    async with asyncio.timeout(10):
        assert await f(3) == 3
    assert f.queue.computing == 0


async def test_a_nested_call_joining_an_explicit_refresh_that_waits_for_a_slot_lends_it_its_own(
    make_redis_cache: Make,
) -> None:
    """f(2) holds the only slot; f.refresh(1) waits for it; then f(2) calls f(1), joining the
    refresh: it lends the refresh its slot (before, each waited for the other for ever)."""
    cache = make_redis_cache()
    go = asyncio.Event()
    computing_two = asyncio.Event()

    @worker_queue(maxsize=1, cache=cache, name="tests.redis.join_refresh")
    async def f(k: int) -> int:
        if k == 2:
            computing_two.set()
            await go.wait()
            return 1 + await f(1)
        return k

    async with asyncio.timeout(10):
        top = asyncio.create_task(f(2))
        await computing_two.wait()
        refresh = asyncio.create_task(f.refresh(1))
        await until(lambda: f.queue.waiting == 1)
        go.set()
        assert await top == 2
        assert await refresh == 1
