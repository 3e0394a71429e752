"""@worker_queue.batch(cache=RedisCache(...)): batches across processes (issue 19, point 8)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

import redis_procs
from redis_spawn import CTX, Procs
from redis_waits import until

from wq_memo import MISSING, worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
NAME = "tests.batch"


def _key(k: Any) -> CallKey:
    return CallKey(NAME, k)


def _loader(
    cache: Any, sent: list[list[int]], gate: asyncio.Event | None = None, **options: Any
) -> Any:
    """A batch function over cache that records the keys of each call (waiting for gate)."""

    @worker_queue.batch(cache=cache, name=NAME, **options)
    async def load(ids: list[int]) -> Mapping[int, str]:
        sent.append(list(ids))
        if gate is not None:
            await gate.wait()
        return {i: f"v{i}" for i in ids}

    return load


async def test_lookups_and_stores_of_a_batch_take_one_round_trip_each(
    make_redis_cache: Make,
) -> None:
    cache = make_redis_cache()
    sent: list[list[int]] = []
    load = _loader(cache, sent)
    async with asyncio.timeout(10):
        before = cache.stats().round_trips
        assert await load.many(range(10)) == [f"v{i}" for i in range(10)]
        # One pipeline of claims (each key looked up, its lock taken), one of fenced stores.
        assert cache.stats().round_trips - before == 2
        before = cache.stats().round_trips
        assert await load.many(range(20)) == [f"v{i}" for i in range(20)]
        assert cache.stats().round_trips - before == 2
        before = cache.stats().round_trips
        assert await load.many(range(20)) == [f"v{i}" for i in range(20)]  # all found
        assert cache.stats().round_trips - before == 1
    assert sent == [list(range(10)), list(range(10, 20))]
    assert cache.stats().hits == 10 + 20
    info = load.cache_info()
    assert (info.hits, info.misses, info.batches) == (30, 20, 2)


async def test_a_key_another_process_computes_is_waited_for_not_recomputed(
    make_redis_cache: Make,
) -> None:
    here, there = make_redis_cache(), make_redis_cache()
    sent: list[list[int]] = []
    load = _loader(here, sent)
    holding, finish = asyncio.Event(), asyncio.Event()

    async def elsewhere() -> str:
        holding.set()
        await finish.wait()
        return "from there"

    async with asyncio.timeout(10):
        other = asyncio.create_task(there.get_or_compute(_key(3), elsewhere))
        await holding.wait()
        mine = asyncio.create_task(load.many([1, 2, 3]))
        await until(lambda: sent == [[1, 2]])  # 3 is not sent: it is being computed there
        await asyncio.sleep(0.05)
        assert not mine.done()
        finish.set()
        assert await mine == ["v1", "v2", "from there"]
        assert await other == "from there"
    assert sent == [[1, 2]]
    assert here.stats().waited == 1
    assert here.stats().computed == 2


async def test_a_key_whose_holder_gives_up_goes_in_a_later_batch(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    here, there = make_redis_cache(), make_redis_cache()
    sent: list[list[int]] = []
    load = _loader(here, sent)
    holding, fail = asyncio.Event(), asyncio.Event()

    async def elsewhere() -> str:
        holding.set()
        await fail.wait()
        raise RuntimeError("the holder failed")

    async with asyncio.timeout(10):
        other = asyncio.create_task(there.get_or_compute(_key(3), elsewhere))
        await holding.wait()
        mine = asyncio.create_task(load.many([1, 3]))
        await until(lambda: sent == [[1]])
        fail.set()
        assert await mine == ["v1", "v3"]
        with pytest.raises(RuntimeError, match="the holder failed"):
            await other
    assert sent == [[1], [3]]
    assert sync_redis.get(key_names(here.namespace, _key(3)).value) is not None


async def test_each_store_is_fenced_by_its_own_token(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    sent: list[list[int]] = []
    gate = asyncio.Event()
    load = _loader(cache, sent, gate)
    names = {i: key_names(cache.namespace, _key(i)) for i in (1, 2, 3)}
    async with asyncio.timeout(10):
        task = asyncio.create_task(load.many([1, 2, 3]))
        await until(lambda: sent == [[1, 2, 3]])
        # Key 2's lease ran out and another computation took its lock meanwhile.
        sync_redis.set(names[2].lock, b"a later holder", px=60_000)
        before = cache.stats().round_trips
        gate.set()
        assert await task == ["v1", "v2", "v3"]
        assert cache.stats().round_trips - before == 1  # the three stores in one round trip
    assert sync_redis.get(names[1].value) is not None
    assert sync_redis.get(names[2].value) is None  # not stored over the later holder's
    assert sync_redis.get(names[2].lock) == b"a later holder"
    assert sync_redis.get(names[3].value) is not None
    assert cache.stats().lock_lost == 1


async def test_leases_of_a_running_batch_are_renewed_together(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(lease=0.3)
    sent: list[list[int]] = []
    gate = asyncio.Event()
    load = _loader(cache, sent, gate)
    names = [key_names(cache.namespace, _key(i)) for i in (1, 2)]
    async with asyncio.timeout(10):
        task = asyncio.create_task(load.many([1, 2]))
        await until(lambda: sent == [[1, 2]])
        started = time.monotonic()
        while time.monotonic() - started < 0.9:  # three leases long
            assert all(sync_redis.get(n.lock) for n in names)
            await asyncio.sleep(0.05)
        gate.set()
        assert await task == ["v1", "v2"]
    assert all(sync_redis.get(n.value) for n in names)
    assert cache.stats().lock_lost == 0


async def test_invalidation_in_another_process_wins_for_that_key_only(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    here, there = make_redis_cache(), make_redis_cache()
    sent: list[list[int]] = []
    gate = asyncio.Event()
    load = _loader(here, sent, gate)
    async with asyncio.timeout(10):
        task = asyncio.create_task(load.many([1, 2, 3]))
        await until(lambda: sent == [[1, 2, 3]])
        await there.delete(_key(2))
        gate.set()
        assert await task == ["v1", "v2", "v3"]
    stored = {i: sync_redis.get(key_names(here.namespace, _key(i)).value) for i in (1, 2, 3)}
    assert stored[1] is not None
    assert stored[2] is None
    assert stored[3] is not None


async def test_invalidation_here_wins_for_that_key_only(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    sent: list[list[int]] = []
    gate = asyncio.Event()
    load = _loader(cache, sent, gate)
    async with asyncio.timeout(10):
        task = asyncio.create_task(load.many([1, 2, 3]))
        await until(lambda: sent == [[1, 2, 3]])
        assert await load.acache_invalidate(2) is False  # nothing stored yet
        gate.set()
        assert await task == ["v1", "v2", "v3"]
        assert await load.acache_peek(1) == "v1"
        assert await load.acache_peek(2) is MISSING
        assert await load.many([1, 2]) == ["v1", "v2"]
    assert sent == [[1, 2, 3], [2]]


async def test_a_prime_and_a_clear_win_over_the_batch_under_way(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    sent: list[list[int]] = []
    gate = asyncio.Event()
    load = _loader(cache, sent, gate)
    async with asyncio.timeout(10):
        task = asyncio.create_task(load.many([1, 2]))
        await until(lambda: sent == [[1, 2]])
        await load.acache_prime("primed", 1)
        gate.set()
        assert await task == ["v1", "v2"]
        assert await load.acache_peek(1) == "primed"
        assert await load.acache_peek(2) == "v2"
        gate.clear()
        task = asyncio.create_task(load.many([3]))
        await until(lambda: sent[-1] == [3])
        await load.acache_clear()
        gate.set()
        assert await task == ["v3"]
        assert await load.acache_peek(3) is MISSING
        assert await load.acache_peek(2) is MISSING
    assert load.cache_info().batches == 0  # counted since the clear


async def test_redis_down_computes_here_batched_and_deduplicated(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_redis_cache(url="redis://127.0.0.1:1/0", timeout=0.5, retry_interval=60)
    sent: list[list[int]] = []
    load = _loader(cache, sent)
    async with asyncio.timeout(10):
        results = list(await asyncio.gather(load.many([1, 2, 2]), load(3), load(1)))
    assert results == [["v1", "v2", "v2"], "v3", "v1"]
    assert sent == [[1, 2, 3]]
    assert cache.stats().fallbacks == 3
    assert any(r.name == "wq_memo" and r.levelno >= logging.WARNING for r in caplog.records)
    async with asyncio.timeout(10):
        assert await load.many([1, 4]) == ["v1", "v4"]  # nothing was stored
    assert sent == [[1, 2, 3], [1, 4]]


async def test_a_value_redis_cannot_store_is_returned_not_stored(make_redis_cache: Make) -> None:
    cache = make_redis_cache()  # JSON: a tuple does not come back as one
    sent: list[list[int]] = []

    @worker_queue.batch(cache=cache, name=NAME)
    async def load(ids: list[int]) -> list[Any]:
        sent.append(list(ids))
        return [(i,) if i == 2 else i for i in ids]

    async with asyncio.timeout(10):
        assert await load.many([1, 2]) == [1, (2,)]
        assert await load.many([1, 2]) == [1, (2,)]
    assert sent == [[1, 2], [2]]
    assert cache.stats().unencodable == 2


async def test_failures_and_missing_keys_store_nothing_and_let_waiters_compute(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    sent: list[list[int]] = []

    @worker_queue.batch(cache=cache, name=NAME)
    async def load(ids: list[int]) -> dict[int, Any]:
        sent.append(list(ids))
        return {1: "v1", 2: ValueError("no 2")}

    async with asyncio.timeout(10):
        results = await asyncio.gather(load(1), load(2), load(3), return_exceptions=True)
    assert results[0] == "v1"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], KeyError)
    for i in (2, 3):
        names = key_names(cache.namespace, _key(i))
        assert sync_redis.get(names.value) is None
        assert sync_redis.get(names.lock) is None  # released at once


async def test_explicit_refresh_recomputes_through_the_lock(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    sent: list[list[int]] = []
    load = _loader(cache, sent)
    async with asyncio.timeout(10):
        assert await load(1) == "v1"
        assert await load.refresh(1) == "v1"
        assert await load(1) == "v1"
    assert sent == [[1], [1]]


async def test_the_synchronous_controls_say_to_use_the_async_forms(make_redis_cache: Make) -> None:
    load = _loader(make_redis_cache(), [])
    for control, args in [
        ("cache_clear", ()),
        ("cache_invalidate", (1,)),
        ("cache_prime", ("v", 1)),
        ("cache_peek", (1,)),
    ]:
        with pytest.raises(TypeError, match=rf"\.{control}\(\): the cache is asynchronous; use"):
            getattr(load, control)(*args)
    async with asyncio.timeout(10):
        await load.acache_prime("p", 1)
        assert await load.acache_peek(1) == "p"
        assert await load(1) == "p"


def test_refresh_after_with_a_redis_cache_is_refused(make_redis_cache: Make) -> None:
    with pytest.raises(ValueError, match="refresh_after is not supported with a RedisCache"):

        @worker_queue.batch(cache=make_redis_cache(), name=NAME, refresh_after=5)
        async def load(ids: list[int]) -> list[int]:
            return ids


async def test_a_key_redis_cannot_encode_fails_that_key_only(make_redis_cache: Make) -> None:
    load = _loader(make_redis_cache(), [])
    async with asyncio.timeout(10):
        results = list(await asyncio.gather(load(1), load(object()), return_exceptions=True))
    assert results[0] == "v1"
    assert isinstance(results[1], TypeError)


def test_a_fleet_computes_each_key_once(
    redis_url: str, redis_namespace: str, sync_redis: Any, procs: Procs
) -> None:
    processes, callers, keys, per_request = 8, 200, 2000, 20
    go = CTX.Event()
    for _ in range(processes):
        procs.start(
            redis_procs.batch_fleet, redis_url, redis_namespace, callers, keys, per_request, go
        )
    procs.expect("ready", processes, timeout=60)
    started = time.monotonic()
    go.set()
    done = procs.expect("done", processes, timeout=60)
    took = time.monotonic() - started
    assert [message[2] for message in done] == [0] * processes  # every caller got its values
    stats = [message[5] for message in done]
    counted = sync_redis.hgetall(f"{redis_namespace}:computed")
    assert len(counted) == keys
    assert {int(v) for v in counted.values()} == {1}, stats  # each key once in the fleet
    assert sum(s["computed"] for s in stats) == keys
    assert sum(s["waited"] for s in stats) > 0  # keys other processes computed, waited for
    assert sum(s["fallbacks"] + s["wait_timeouts"] + s["redis_errors"] for s in stats) == 0
    assert took < 30, (took, [message[4] for message in done])
