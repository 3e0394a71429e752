"""RedisCache raises no warning on any redis-py release pyproject.toml allows.

A warning from redis-py (a deprecated construction) reaches every user of RedisCache: under
`-W error` each call raises, and without it each new event loop prints one. The test turns every
warning into an error and records them, then drives what builds and uses clients: a URL-built
client and a given one, reads and writes, a computation other callers wait for through the
subscription, a refresh, an invalidation, a clear and closing.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable

import pytest

pytest.importorskip("redis.asyncio")

from redis.asyncio import Redis

from wq_memo import worker_queue
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]


async def _use(cache: RedisCache, name: str) -> None:
    gate = asyncio.Event()
    calls = 0

    @worker_queue(cache=cache, name=name)
    async def f(k: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return {"k": k}

    async with asyncio.timeout(10):
        await cache.set("plain", [1, 2])
        assert await cache.get("plain") == [1, 2]
        first = asyncio.create_task(f(1))
        others = [asyncio.create_task(f(1)) for _ in range(3)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.gather(first, *others) == [{"k": 1}] * 4
        assert await f.refresh(1) == {"k": 1}
        assert await f.acache_invalidate(1)
        assert await f(2) == {"k": 2}
        await f.acache_clear()
        assert await cache.delete("plain") is False
    assert calls == 3


def _new_loop_use(url: str, namespace: str, name: str, *, given: bool = False) -> None:
    """One RedisCache used from a fresh event loop: a client is built per loop."""

    async def main() -> None:
        client = Redis.from_url(url) if given else None
        cache = RedisCache(client or url, namespace=namespace)
        try:
            await _use(cache, name)
        finally:
            await cache.aclose()
            if client is not None:
                await client.aclose()

    asyncio.run(main())


def test_no_warning_from_redis_clients(
    redis_url: str, redis_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every warning becomes an error, so none can pass unseen; nothing is logged as failed."""
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, "wq_memo"):
        warnings.simplefilter("always")
        _new_loop_use(redis_url, redis_namespace, "by_url")
        # A second loop: redis-py's warning came once per client, that is once per loop.
        _new_loop_use(redis_url, redis_namespace, "by_url_again")
        _new_loop_use(redis_url, redis_namespace, "given", given=True)
    assert [f"{w.category.__name__}: {w.message}" for w in seen] == []
    assert [r.getMessage() for r in caplog.records] == []


async def test_no_warning_as_error_in_a_running_loop(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """With warnings as errors, a warning would raise inside the calls, or be logged as a
    failed Redis call and taken for a miss (one computation more); all three are checked."""
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, "wq_memo"):
        warnings.simplefilter("error")
        await _use(make_redis_cache(), "strict")
    assert [r.getMessage() for r in caplog.records] == []
