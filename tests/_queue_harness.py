"""What the tests share: a gated, recording worker, a dict cache, an AsyncCache in memory,
bounded waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from wq_memo import WorkerQueue
from wq_memo.backends import MISSING

X = TypeVar("X")

WAIT = 5.0  # seconds; every wait in the queue tests is bounded by it


class Worker:
    """An async worker over ints that records its calls.

    ``gate(item)`` holds item's computation until the returned event is set; ``fail(item, exc)``
    makes it raise exc. ``started(item)`` is set once its computation has begun.
    """

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.cancelled: list[int] = []
        self.active = 0
        self.max_active = 0
        self._gates: dict[int, asyncio.Event] = {}
        self._started: dict[int, asyncio.Event] = {}
        self._errors: dict[int, BaseException] = {}
        self.on_call: Callable[[int], None] | None = None
        self.before_return: Callable[[int], None] | None = None

    def gate(self, item: int) -> asyncio.Event:
        gate = self._gates[item] = asyncio.Event()
        return gate

    def fail(self, item: int, exc: BaseException) -> None:
        self._errors[item] = exc

    def succeed(self, item: int) -> None:
        self._errors.pop(item, None)

    def started(self, item: int) -> asyncio.Event:
        return self._started.setdefault(item, asyncio.Event())

    async def __call__(self, item: int) -> str:
        self.calls.append(item)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.on_call is not None:
                self.on_call(item)
            self.started(item).set()
            gate = self._gates.get(item)
            if gate is not None:
                await gate.wait()
            exc = self._errors.get(item)
            if exc is not None:
                raise exc
            if self.before_return is not None:
                self.before_return(item)
            return f"r{item}"
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        finally:
            self.active -= 1


class Cache:
    """A dict behind cache_get / cache_set, with optional failures and a yield in cache_get."""

    def __init__(self, *, yields: bool = False) -> None:
        self.data: dict[int, str] = {}
        self.gets: list[int] = []
        self.yields = yields
        self.get_error: Exception | None = None
        self.set_error: Exception | None = None

    async def get(self, item: int) -> str | None:
        self.gets.append(item)
        if self.yields:
            await asyncio.sleep(0)
        if self.get_error is not None:
            raise self.get_error
        return self.data.get(item)

    async def set(self, item: int, value: str) -> None:
        if self.set_error is not None:
            raise self.set_error
        self.data[item] = value


class MemoryAsyncCache:
    """An AsyncCache over a dict; with ``yields``, each lookup suspends once, as a remote
    cache's would."""

    def __init__(self, yields: bool = False) -> None:
        self.data: dict[Hashable, Any] = {}
        self.yields = yields

    async def get(self, key: Hashable) -> Any:
        if self.yields:
            await asyncio.sleep(0)
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass


@dataclass
class Harness:
    queue: WorkerQueue[int, str]
    worker: Worker
    cache: Cache

    def flights(self) -> dict[Any, Any]:
        """The items the queue has accepted on its current loop (empty when it has none)."""
        table = self.queue._engine.table
        if table is None:
            return {}
        outside = table.outside()
        return {k: f for k, f in table.flights.items() if f not in outside}

    def assert_no_bookkeeping(self) -> None:
        """Nothing in flight, no slot taken, nobody waiting for room."""
        table = self.queue._engine.table
        if table is None:
            return
        assert table.flights == {}
        assert table.running == 0
        assert table.live == 0
        assert table.lines() == (0, 0, 0)
        assert not table.lookups
        table.check()


def make(*, maxsize: int = 3, finish_timeout: float = 3.0, yields: bool = False) -> Harness:
    worker = Worker()
    cache = Cache(yields=yields)
    queue: WorkerQueue[int, str] = WorkerQueue(
        worker, cache.get, cache.set, maxsize=maxsize, finish_timeout=finish_timeout
    )
    return Harness(queue, worker, cache)


async def until(event: asyncio.Event, within: float = WAIT) -> None:
    """Wait for event, failing the test after `within` seconds."""
    async with asyncio.timeout(within):
        await event.wait()


async def eventually(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Let other tasks run until condition() holds, failing the test after `within` seconds.

    For states of the queue that no event announces; it only yields, never sleeps.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0)


async def bounded(awaitable: Awaitable[X], within: float = WAIT) -> X:
    """Await awaitable, failing the test after `within` seconds."""
    async with asyncio.timeout(within):
        return await awaitable


async def gathered(*awaitables: Awaitable[X], within: float = WAIT) -> list[X]:
    """The results of awaitables, run concurrently, failing the test after `within` seconds."""
    async with asyncio.timeout(within):
        return list(await asyncio.gather(*awaitables))


async def returned(awaitable: Awaitable[object], within: float = WAIT) -> object:
    """What awaitable returns (for those typed as returning None), bounded like ``bounded``."""
    async with asyncio.timeout(within):
        return await awaitable


def room_waiters(queue: WorkerQueue[int, str]) -> int:
    """How many callers wait for room (their items were asked for while the line was full)."""
    table = queue._engine.table
    return 0 if table is None else sum(f.callers for f in table.outside())


def waiting_items(queue: WorkerQueue[int, str]) -> list[int]:
    """The items accepted and waiting for a slot, in order."""
    table = queue._engine.table
    return [] if table is None else [f.key for f in table.accepted()]


def callers(queue: WorkerQueue[int, str], item: int) -> int:
    """How many callers await item's computation."""
    table = queue._engine.table
    if table is None:
        return 0
    flight = table.flights.get(item)
    return 0 if flight is None else flight.callers
