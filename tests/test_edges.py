"""Edges real code reaches: any exception reaches the callers, hits while closing with every
cache, any async callable, the shutdown bound, and synchronous cache functions refused."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import cachetools
import pytest

from wq_memo import QueueShutDown, WorkerQueue, worker_queue
from wq_memo.backends import MISSING

WAIT = 5.0


async def bounded(awaitable: Any, within: float = WAIT) -> Any:
    async with asyncio.timeout(within):
        return await awaitable


# -- 7. whatever a worker raises reaches every caller ---------------------------------------------


@pytest.mark.parametrize("exc_type", [GeneratorExit, StopAsyncIteration, ValueError])
async def test_whatever_the_worker_raises_reaches_every_caller(exc_type: type) -> None:
    gate = asyncio.Event()

    @worker_queue(cache={})
    async def f(x: int) -> int:
        await gate.wait()
        raise exc_type("raised by the worker")

    tasks = [asyncio.create_task(f(1)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    results = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert [type(r) for r in results] == [exc_type] * 3
    assert results[0] is results[1] is results[2]
    assert f.cache == {}


# -- 8. hits are served while the queue closes, with every kind of cache --------------------------


class MemoryCache:
    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}

    async def get(self, key: Hashable) -> Any:
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


@pytest.mark.parametrize("kind", ["dict", "lru", "async"])
async def test_hits_are_served_while_the_queue_closes(kind: str) -> None:
    makers: dict[str, Callable[[], Any]] = {
        "dict": dict,
        "lru": lambda: cachetools.LRUCache(10),
        "async": MemoryCache,
    }
    cache = makers[kind]()
    gate = asyncio.Event()

    @worker_queue(cache=cache, name="hits-while-closing")
    async def f(x: int) -> int:
        if x == 2:
            await gate.wait()
        return x * 10

    assert await f(1) == 10
    slow = asyncio.create_task(f(2))
    await asyncio.sleep(0)
    closing = asyncio.create_task(f.queue.aclose())
    await asyncio.sleep(0)
    assert not f.queue.running
    assert await bounded(f(1)) == 10  # a hit
    with pytest.raises(QueueShutDown):
        await bounded(f(3))  # a miss
    gate.set()
    assert await bounded(slow) == 20
    await bounded(closing)


# -- 9. any async callable: partials and callable objects ---------------------------------------


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    async def __call__(self, x: Any) -> Any:
        return x * self.factor


async def add(x: Any, y: Any) -> Any:
    return x + y


@pytest.mark.parametrize(
    "func", [functools.partial(add, 1), Scaler(2)], ids=["partial", "callable-object"]
)
async def test_partials_and_callable_objects_behave_as_documented(
    func: Any, caplog: pytest.LogCaptureFixture
) -> None:
    f = worker_queue(cache=cachetools.LRUCache(maxsize=1, getsizeof=lambda v: 2))(func)
    assert isinstance(f.__name__, str)
    with pytest.raises(TypeError, match="pass key="):
        await f([1])
    with caplog.at_level(logging.INFO, logger="wq_memo"):
        await f(3)
    [record] = [r for r in caplog.records if r.name == "wq_memo"]
    assert record.levelno == logging.INFO
    assert "not cached" in record.getMessage()
    g = worker_queue(cache=MemoryCache(), name="scaled")(func)
    assert await g(3) == await func(3)
    assert await g(3) == await func(3)
    assert g.cache_info().hits == 1


# -- 10. aclose() keeps to its documented bound ----------------------------------------------------


async def test_aclose_returns_within_twice_finish_timeout_even_when_cleanup_is_slow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()

    @worker_queue(cache={}, finish_timeout=0.5)
    async def f(x: int) -> int:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(asyncio.sleep(2))  # slow cleanup, not cut short
        return x

    task = asyncio.create_task(f(1))
    await bounded(started.wait())
    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        await bounded(f.queue.aclose())
    elapsed = time.monotonic() - begin
    assert 0.9 <= elapsed <= 1.0 + 0.3  # 2 x finish_timeout, and a margin for a busy machine
    assert any("ignored cancellation" in r.getMessage() for r in caplog.records)
    with pytest.raises(TimeoutError):
        await bounded(task)


# -- 11. WorkerQueue refuses synchronous cache functions ------------------------------------------


async def worker(item: int) -> str:
    return str(item)


def test_builtin_cache_functions_are_refused_at_construction() -> None:
    store: dict[int, str] = {}
    with pytest.raises(TypeError, match="cache_get must be an async function"):
        WorkerQueue(worker, store.get, store.__setitem__)  # type: ignore[arg-type]


async def test_a_cache_function_that_returns_no_awaitable_is_refused_at_its_first_call() -> None:
    store: dict[int, str] = {}

    def cache_get(item: int) -> str | None:
        return store.get(item)

    async def cache_set(item: int, value: str) -> None:
        store[item] = value

    queue: WorkerQueue[int, str] = WorkerQueue(worker, cache_get, cache_set)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cache_get must be an async function"):
        await bounded(queue.require(1))


async def test_an_awaitable_returned_by_a_plain_function_is_accepted() -> None:
    store: dict[int, str] = {}

    async def lookup(item: int) -> str | None:
        return store.get(item)

    def cache_get(item: int) -> Any:
        return lookup(item)

    async def cache_set(item: int, value: str) -> None:
        store[item] = value

    queue: WorkerQueue[int, str] = WorkerQueue(worker, cache_get, cache_set)
    assert await bounded(queue.require(1)) == "1"
    assert store == {1: "1"}
