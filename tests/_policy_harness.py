"""What the policy tests share: a fake clock, a source of results and failures, caches on the
fake clock (in-process and async, the async one honouring ``set``'s ttl)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

import cachetools

from wq_memo.backends import MISSING

WAIT = 5.0


class Clock:
    """A fake clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Source:
    """An async function of a key: its n-th computation returns results[key] if set, else
    f"{key}@{n}"; raises failures[key] if set; held by ``gate`` if set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.results: dict[str, Any] = {}
        self.failures: dict[str, BaseException] = {}
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> Any:
        n = len(self.calls)
        self.calls.append(key)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if key in self.failures:
            raise self.failures[key]
        if key in self.results:
            return self.results[key]
        return f"{key}@{n}"


class ClockedAsyncCache:
    """An AsyncCache over a dict whose entries expire after ``set``'s ttl on a clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.data: dict[Hashable, tuple[Any, float]] = {}
        self.ttls: list[float | None] = []

    async def get(self, key: Hashable) -> Any:
        value, expires = self.data.get(key, (MISSING, 0.0))
        if value is MISSING or self.clock() >= expires:
            return MISSING
        return value

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        self.ttls.append(ttl)
        self.data[key] = (value, float("inf") if ttl is None else self.clock() + ttl)

    async def delete(self, key: Hashable) -> bool:
        return self.data.pop(key, None) is not None

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass


MAPPINGS: dict[str, Callable[[Clock], Any]] = {
    "dict": lambda clock: {},
    "lru": lambda clock: cachetools.LRUCache(100),
    "ttl": lambda clock: cachetools.TTLCache(100, ttl=1000, timer=clock),
}
"""In-process caches, each on the clock given where it keeps time."""


async def bounded(awaitable: Any) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)
