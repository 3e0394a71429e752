"""Process bodies for the multi-process tests (spawned, so they live in an importable module)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from functools import partial
from typing import Any

from wq_memo.backends import CallKey

KEY = CallKey("tests.shared", ("cold",))


async def _count(url: str, counter: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        await client.incr(counter)
    finally:
        await client.aclose()


def herd(
    url: str,
    namespace: str,
    callers: int,
    seconds: float,
    lease: float,
    go: Any,
    messages: Any,
) -> None:
    """Once go is set, make many concurrent calls on one cold key; report what they returned."""
    from wq_memo.backends.redis import RedisCache

    async def main() -> tuple[list[Any], dict[str, int]]:
        cache = RedisCache(url, namespace=namespace, lease=lease, wait=30)

        async def compute() -> dict[str, int]:
            await _count(url, f"{namespace}:computations")
            await asyncio.sleep(seconds)
            return {"pid": os.getpid()}

        try:
            results = await asyncio.gather(
                *(cache.get_or_compute(KEY, compute) for _ in range(callers))
            )
        finally:
            await cache.aclose()
        return results, dataclasses.asdict(cache.stats())

    messages.put(("ready", os.getpid()))
    if not go.wait(30):
        messages.put(("timeout", os.getpid()))
        return
    results, stats = asyncio.run(main())
    messages.put(("done", os.getpid(), results, stats))


def hang(url: str, namespace: str, lease: float, messages: Any) -> None:
    """Take the lock for KEY, say so, and compute forever (until killed)."""
    from wq_memo.backends.redis import RedisCache

    async def main() -> None:
        cache = RedisCache(url, namespace=namespace, lease=lease)

        async def compute() -> None:
            await _count(url, f"{namespace}:computations")
            messages.put(("computing", os.getpid()))
            await asyncio.Event().wait()

        await cache.get_or_compute(KEY, compute)

    asyncio.run(main())


def many_key(i: int) -> CallKey:
    return CallKey("tests.many", (i,))


def hold_many(url: str, namespace: str, keys: int, release: Any, messages: Any) -> None:
    """Take the locks of keys 0..keys-1, say so, and compute them once release is set."""
    from wq_memo.backends.redis import RedisCache

    async def main() -> tuple[bool, dict[str, int]]:
        cache = RedisCache(url, namespace=namespace, lease=30)
        started = 0
        all_started, gate = asyncio.Event(), asyncio.Event()

        async def compute(i: int) -> str:
            nonlocal started
            started += 1
            if started == keys:
                all_started.set()
            await gate.wait()
            return f"v{i}"

        try:
            tasks = [
                asyncio.create_task(cache.get_or_compute(many_key(i), partial(compute, i)))
                for i in range(keys)
            ]
            await all_started.wait()
            messages.put(("holding", os.getpid()))
            await asyncio.to_thread(release.wait, 60)
            gate.set()
            results = await asyncio.gather(*tasks)
        finally:
            await cache.aclose()
        return results == [f"v{i}" for i in range(keys)], dataclasses.asdict(cache.stats())

    ok, stats = asyncio.run(main())
    messages.put(("done", os.getpid(), ok, stats))


def swarm(
    url: str, namespace: str, callers: int, keys: int, seed: int, go: Any, messages: Any
) -> None:
    """Once go is set, callers concurrent callers go through every key (in an order of this
    process's own); report wrong results, the slowest call and the cache's counters."""
    from redis.asyncio import Redis

    from wq_memo.backends.redis import RedisCache

    async def main() -> tuple[int, float, float, dict[str, int]]:
        cache = RedisCache(url, namespace=namespace)
        counter = Redis.from_url(url)
        order = list(range(keys))
        random.Random(seed).shuffle(order)
        wrong = 0
        slowest = 0.0

        async def compute(i: int) -> str:
            await counter.incr(f"{namespace}:computations")
            await asyncio.sleep(0.005)
            return f"v{i}"

        async def caller(share: list[int]) -> None:
            nonlocal wrong, slowest
            for i in share:
                started = time.monotonic()
                if await cache.get_or_compute(many_key(i), partial(compute, i)) != f"v{i}":
                    wrong += 1
                slowest = max(slowest, time.monotonic() - started)

        started = time.monotonic()
        try:
            await asyncio.gather(*(caller(order[c::callers]) for c in range(callers)))
        finally:
            await cache.aclose()
            await counter.aclose()
        took = time.monotonic() - started
        return wrong, slowest, took, dataclasses.asdict(cache.stats())

    messages.put(("ready", os.getpid()))
    if not go.wait(60):
        messages.put(("timeout", os.getpid()))
        return
    wrong, slowest, took, stats = asyncio.run(main())
    messages.put(("done", os.getpid(), wrong, slowest, took, stats))


def stall_caller(
    url: str, namespace: str, callers: int, keys: int, seconds: float, go: Any, messages: Any
) -> None:
    """Through @worker_queue, callers concurrent calls over keys keys, each computation lasting
    seconds, while unrelated lookups go on beside them; report what each call got and took."""
    from collections import Counter

    from redis.asyncio import Redis

    from wq_memo import worker_queue
    from wq_memo.backends.redis import RedisCache

    async def main() -> tuple[int, float, dict[int, int], dict[str, int]]:
        cache = RedisCache(url, namespace=namespace, timeout=1.0, retry_interval=1.0)
        counter = Redis.from_url(url, socket_timeout=10)
        computed: Counter[int] = Counter()

        @worker_queue(cache=cache, maxsize=16, name="value")
        async def value(i: int) -> str:
            computed[i] += 1
            await counter.incr(f"{namespace}:started")
            await asyncio.sleep(seconds)
            return f"v{i}"

        done = asyncio.Event()

        async def unrelated() -> None:
            # Lookups of other keys go on all along: during a stall they time out, and may
            # open the breaker. The finished computations must be stored all the same.
            n = 0
            while not done.is_set():
                n += 1
                await cache.get(CallKey("tests.unrelated", (n,)))
                await asyncio.sleep(0.02)

        async def call(i: int) -> tuple[bool, float]:
            started = time.monotonic()
            ok = await value(i) == f"v{i}"
            return ok, time.monotonic() - started

        noise = asyncio.create_task(unrelated())
        try:
            calls = await asyncio.gather(*(call(j % keys) for j in range(callers)))
        finally:
            done.set()
            await noise
            await value.queue.aclose()
            await cache.aclose()
            await counter.aclose()
        wrong = sum(not ok for ok, _ in calls)
        return wrong, max(t for _, t in calls), dict(computed), dataclasses.asdict(cache.stats())

    messages.put(("ready", os.getpid()))
    if not go.wait(60):
        messages.put(("timeout", os.getpid()))
        return
    wrong, slowest, computed, stats = asyncio.run(main())
    messages.put(("done", os.getpid(), wrong, slowest, computed, stats))


def uncacheable_rounds(
    url: str, namespace: str, seconds: float, rounds: list[Any], messages: Any
) -> None:
    """Per round, once its event is set: one call of a function whose results JSON cannot
    hold (a tuple), on the round's own key; report how long it took."""
    from wq_memo.backends.redis import RedisCache

    async def one(cache: RedisCache, n: int) -> tuple[float, int]:
        computed = 0

        async def pair() -> tuple[int, int]:
            nonlocal computed
            computed += 1
            await asyncio.sleep(seconds)
            return (n, os.getpid())

        started = time.monotonic()
        value = await cache.get_or_compute(CallKey("tests.pair", (n,)), pair)
        assert value[0] == n
        return time.monotonic() - started, computed

    cache = RedisCache(url, namespace=namespace)
    messages.put(("ready", os.getpid()))
    for n, go in enumerate(rounds):
        if not go.wait(60):
            messages.put(("timeout", os.getpid()))
            return
        took, computed = asyncio.run(one(cache, n))
        messages.put(("round", os.getpid(), n, took, computed))
    asyncio.run(cache.aclose())


REFRESHED = CallKey("tests.refreshed", ("k",))
"""The key of refresh_due's function (named "tests.refreshed", called with "k")."""


def refresh_due(url: str, namespace: str, go: Any, release: Any, messages: Any) -> None:
    """Once go is set, call a function with refresh_after=30 on a key whose entry is due; report
    what the call returned once this process's refresh has computed or given up, then, once
    release is set (the computing process ends its refresh), what a call returns when the
    entry is fresh again."""
    from redis.asyncio import Redis
    from redis_waits import until

    from wq_memo import worker_queue
    from wq_memo.backends.redis import RedisCache

    async def main() -> None:
        cache = RedisCache(url, namespace=namespace, ttl=120)
        counter = Redis.from_url(url)
        computing = asyncio.Event()

        @worker_queue(cache=cache, name="tests.refreshed", refresh_after=30)
        async def value(key: str) -> str:
            await counter.incr(f"{namespace}:computations")
            computing.set()
            await asyncio.to_thread(release.wait, 30)
            return f"refreshed by {os.getpid()}"

        try:
            async with asyncio.timeout(30):
                started = time.monotonic()
                first = await value("k")
                took = time.monotonic() - started
                await until(lambda: computing.is_set() or cache.stats().refresh_skipped, 20)
                messages.put(("attempted", os.getpid(), first, took, cache.stats().computed))
                while True:  # until the refresh (in whichever process) has landed
                    _, age = await cache.get_with_age(REFRESHED)
                    if age is not None and age < 30:
                        break
                    await asyncio.sleep(0.01)
                second = await value("k")
        finally:
            await counter.aclose()
            await cache.aclose()
        messages.put(("done", os.getpid(), second, value.cache_info().refreshes))

    messages.put(("ready", os.getpid()))
    if not go.wait(30):
        messages.put(("timeout", os.getpid()))
        return
    asyncio.run(main())


def batch_fleet(
    url: str, namespace: str, callers: int, keys: int, per_request: int, go: Any, messages: Any
) -> None:
    """Once go is set, callers concurrent requests, each loading per_request keys through one
    batch function with a RedisCache (caller c asks for keys c * per_request / 2 onwards, so
    that every key is asked for twice here and in every process); each key computed is counted
    in Redis (one hash field per key). Reports wrong results, the batches and the counters."""
    from redis.asyncio import Redis

    from wq_memo import worker_queue
    from wq_memo.backends.redis import RedisCache

    async def main() -> tuple[int, int, float, dict[str, int]]:
        # A pipeline of 100 claims, in one of 8 processes on 2 busy cores, may take a while.
        cache = RedisCache(url, namespace=namespace, timeout=10)
        counter = Redis.from_url(url)

        @worker_queue.batch(cache=cache, name="tests.fleet", maxsize=4, max_batch=100)
        async def load(ids: list[int]) -> dict[int, str]:
            pipe = counter.pipeline(transaction=False)
            for i in ids:
                pipe.hincrby(f"{namespace}:computed", str(i), 1)
            await pipe.execute()
            await asyncio.sleep(0.01)
            return {i: f"v{i}" for i in ids}

        step = max(1, per_request // 2)

        async def request(c: int) -> int:
            wanted = [(c * step + j) % keys for j in range(per_request)]
            got = await load.many(wanted)
            return sum(value != f"v{i}" for i, value in zip(wanted, got, strict=True))

        started = time.monotonic()
        try:
            async with asyncio.timeout(60):
                wrong = sum(await asyncio.gather(*(request(c) for c in range(callers))))
        finally:
            await load.queue.aclose()
            await cache.aclose()
            await counter.aclose()
        took = time.monotonic() - started
        return wrong, load.cache_info().batches, took, dataclasses.asdict(cache.stats())

    messages.put(("ready", os.getpid()))
    if not go.wait(60):
        messages.put(("timeout", os.getpid()))
        return
    wrong, batches, took, stats = asyncio.run(main())
    messages.put(("done", os.getpid(), wrong, batches, took, stats))
