"""Process bodies for the multi-process tests (spawned, so they live in an importable module)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
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
