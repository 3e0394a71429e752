"""Hit and miss latency of memoized calls kept in Redis: wq_memo's RedisCache, aiocache, cashews.

    python -m benchmarks.redis_backends [--quick]      # Redis at $WQ_MEMO_REDIS_URL or 6379/0

Every contender memoizes the same trivial ``async def f(x): return x`` in the same Redis server,
each under a prefix of its own. Rounds interleave the contenders (in a rotating order); each
round times ``calls`` sequential calls one by one and keeps their median. The table shows the
median of those medians, and each figure's ratio to wq_memo's (single-flight) figure.

- hit: the same argument again and again (after a first call stored it).
- miss: a new argument every call, so every call computes and stores.

This script installs nothing: a peer that is not installed gets a row saying so.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

DEFAULT_URL = "redis://127.0.0.1:6379/0"

Fn = Callable[[Any], Awaitable[Any]]


@dataclass
class Contender:
    name: str
    fn: Fn | None = None
    note: str = ""
    close: Callable[[], Awaitable[None]] | None = None
    hits: list[float] = field(default_factory=list)
    misses: list[float] = field(default_factory=list)


async def _identity(x: Any) -> Any:
    return x


def _wq_memo(url: str, prefix: str, single_flight: bool) -> Contender:
    from wq_memo import worker_queue
    from wq_memo.backends.redis import RedisCache

    name = "wq_memo RedisCache" + ("" if single_flight else " (single_flight=False)")
    namespace = f"{prefix}:wq{int(single_flight)}"
    cache = RedisCache(url, namespace=namespace, single_flight=single_flight)
    fn = worker_queue(cache=cache)(_identity)

    async def close() -> None:
        await cache.clear()  # its names are not under the peers' prefix (":" is doubled)
        await cache.aclose()

    return Contender(name, fn, close=close)


def _aiocache(url: str, prefix: str, stampede: bool) -> Contender:
    name = "aiocache cached_stampede" if stampede else "aiocache cached"
    try:
        from aiocache import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
            Cache,
            cached,
            cached_stampede,
        )
    except ImportError:
        return Contender(name, note="not installed (pip install 'aiocache[redis]')")
    from redis.asyncio.connection import parse_url

    where = parse_url(url)
    decorator = cached_stampede if stampede else cached
    memo = decorator(
        cache=Cache.REDIS,
        namespace=f"{prefix}:aiocache{int(stampede)}:",
        endpoint=where.get("host", "127.0.0.1"),
        port=where.get("port", 6379),
        db=where.get("db", 0),
    )
    fn = memo(_identity)

    async def close() -> None:
        if memo.cache is not None:
            await memo.cache.close()

    return Contender(f"{name} {version('aiocache')}", fn, close=close)


def _cashews(url: str, prefix: str, lock: bool) -> Contender:
    name = "cashews cache" + (" lock=True" if lock else "")
    try:
        import cashews
    except ImportError:
        return Contender(name, note="not installed (pip install 'cashews[redis]')")
    cache = cashews.Cache()
    cache.setup(url)
    fn = cache(ttl="1h", prefix=f"{prefix}:cashews{int(lock)}", lock=lock)(_identity)
    return Contender(f"{name} {version('cashews')}", fn, close=cache.close)


async def _time_calls(fn: Fn, args: list[Any]) -> float:
    """Return the median latency, in seconds, of fn(arg) for each arg, called one by one."""
    took = []
    clock = time.perf_counter
    for arg in args:
        start = clock()
        await fn(arg)
        took.append(clock() - start)
    return statistics.median(took)


async def _reachable(url: str) -> str | None:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None


async def _delete_prefix(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        names = [name async for name in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(names), 1000):
            await client.delete(*names[i : i + 1000])
    finally:
        await client.aclose()


def _table(contenders: list[Contender], url: str, rounds: int, calls: int) -> str:
    def us(seconds: float) -> str:
        return f"{seconds * 1e6:9.0f}"

    base = contenders[0]
    base_hit = statistics.median(base.hits) if base.hits else None
    base_miss = statistics.median(base.misses) if base.misses else None
    lines = [
        f"Redis backends at {url}: median latency per call, microseconds "
        f"({rounds} interleaved rounds x {calls} calls; ratio = this / wq_memo)",
        f"{'contender':44} {'hit':>9} {'ratio':>6} {'miss':>9} {'ratio':>6}",
    ]
    for c in contenders:
        if c.fn is None:
            lines.append(f"{c.name:44} {c.note}")
            continue
        hit, miss = statistics.median(c.hits), statistics.median(c.misses)
        hit_ratio = f"{hit / base_hit:6.2f}" if base_hit else "     -"
        miss_ratio = f"{miss / base_miss:6.2f}" if base_miss else "     -"
        lines.append(f"{c.name:44} {us(hit)} {hit_ratio} {us(miss)} {miss_ratio}")
    return "\n".join(lines)


async def measure(quick: bool) -> str:
    """Run the comparison and return it as a printable table."""
    url = os.environ.get("WQ_MEMO_REDIS_URL") or DEFAULT_URL
    try:
        import redis  # noqa: F401
    except ImportError:
        return "Redis backends: skipped, no redis package (pip install 'wq_memo[redis]')"
    problem = await _reachable(url)
    if problem is not None:
        return f"Redis backends: skipped, no Redis at {url} ({problem})"
    rounds, calls = (3, 100) if quick else (7, 1000)
    prefix = f"wq_memo_bench:{uuid.uuid4().hex[:10]}"
    contenders = [
        _wq_memo(url, prefix, True),
        _wq_memo(url, prefix, False),
        _aiocache(url, prefix, False),
        _aiocache(url, prefix, True),
        _cashews(url, prefix, False),
        _cashews(url, prefix, True),
    ]
    active = [c for c in contenders if c.fn is not None]
    try:
        for c in active:  # warm up connections and the stored hit key
            assert c.fn is not None
            for _ in range(3):
                await c.fn("hit")
        for r in range(rounds):
            order = active[r % len(active) :] + active[: r % len(active)]
            for c in order:
                assert c.fn is not None
                c.hits.append(await _time_calls(c.fn, ["hit"] * calls))
                c.misses.append(await _time_calls(c.fn, [f"miss-{r}-{i}" for i in range(calls)]))
    finally:
        try:
            for c in active:
                if c.close is not None:
                    with warnings.catch_warnings():
                        # the peers' close() calls a redis-py method deprecated since 5.0.1
                        warnings.simplefilter("ignore", DeprecationWarning)
                        await c.close()
        finally:
            await _delete_prefix(url, prefix)
    return _table(contenders, url, rounds, calls)


if __name__ == "__main__":
    print(asyncio.run(measure(quick="--quick" in sys.argv[1:])))
