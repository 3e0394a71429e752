"""Edges real code reaches: any exception reaches the callers, hits while closing with every
cache, any async callable, the shutdown bound, and synchronous cache functions refused."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import cachetools
import pytest
from _queue_harness import MemoryAsyncCache

from wq_memo import QueueShutDown, WorkerQueue, worker_queue

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


@pytest.mark.parametrize("kind", ["dict", "lru", "async"])
async def test_hits_are_served_while_the_queue_closes(kind: str) -> None:
    makers: dict[str, Callable[[], Any]] = {
        "dict": dict,
        "lru": lambda: cachetools.LRUCache(10),
        "async": lambda: MemoryAsyncCache(yields=True),
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
    g = worker_queue(cache=MemoryAsyncCache(yields=True), name="scaled")(func)
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


async def test_a_cache_set_that_returns_no_awaitable_is_logged_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store: dict[int, str] = {}

    async def cache_get(item: int) -> str | None:
        return store.get(item)

    def cache_set(item: int, value: str) -> None:
        store[item] = value

    queue: WorkerQueue[int, str] = WorkerQueue(worker, cache_get, cache_set)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert await bounded(queue.require(1)) == await worker(1)
        await bounded(queue.aclose())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "cache_set must be an async function" in message
    assert "no result is stored until it is" in message
    assert errors[0].exc_info is None  # a mistake to fix, not a failure to trace


class Boom(Exception):
    """Weakly referenceable, unlike the built-in exceptions."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _fail_first_call(refs: list[weakref.ref[Boom]]) -> None:
    @worker_queue(cache={})
    async def fail(x: int) -> int:
        raise Boom(x)

    try:
        await bounded(fail(1))
    except Boom as exc:
        refs.append(weakref.ref(exc))


async def _fail_from_the_line(refs: list[weakref.ref[Boom]]) -> None:
    # Started when the item ahead of it finishes: on 3.12 and newer its first step runs on
    # the stack of the one that finished.
    gate = asyncio.Event()

    @worker_queue(maxsize=1, cache={})
    async def f(x: int) -> int:
        if x == 1:
            await gate.wait()
            return x
        raise Boom(x)

    first = asyncio.ensure_future(f(1))
    second = asyncio.ensure_future(f(2))
    for _ in range(3):
        await asyncio.sleep(0)
    assert (f.queue.computing, f.queue.waiting) == (1, 1)  # the second waits in line
    gate.set()
    assert await bounded(first) == 1
    try:
        async with asyncio.timeout(WAIT):  # not bounded(second): its frame would hold the task
            await second
    except Boom as exc:
        refs.append(weakref.ref(exc))
    del first, second


async def _fail_a_background_refresh(refs: list[weakref.ref[Boom]]) -> None:
    clock = Clock()
    calls: list[int] = []

    @worker_queue(cache={}, refresh_after=5, timer=clock)
    async def f(x: int) -> int:
        calls.append(x)
        if len(calls) > 1:
            raise remembered(Boom(x))  # no local: this frame is in its traceback
        return x

    def remembered(exc: Boom) -> Boom:
        refs.append(weakref.ref(exc))
        return exc

    assert await bounded(f(1)) == 1
    clock.now = 6
    # Served, and refreshed in the background. Its warning is not logged: a log record
    # captured by pytest would hold the exception.
    logger = logging.getLogger("wq_memo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        assert await bounded(f(1)) == 1
        for _ in range(5):
            await asyncio.sleep(0)
    finally:
        logger.setLevel(level)
    assert calls == [1, 1]
    assert f.cache_info().refresh_failures == 1


@pytest.mark.parametrize(
    "fail", [_fail_first_call, _fail_from_the_line, _fail_a_background_refresh]
)
async def test_a_failed_computation_leaves_no_reference_cycle_behind(
    fail: Callable[[list[weakref.ref[Boom]]], Any],
) -> None:
    gc.collect()
    gc.disable()
    try:
        refs: list[weakref.ref[Boom]] = []
        await fail(refs)
        [ref] = refs
        for _ in range(5):  # the computation's task ends
            await asyncio.sleep(0)
        assert ref() is None, gc.get_referrers(ref())
    finally:
        gc.enable()


async def test_callers_that_left_while_their_item_waited_are_still_counted() -> None:
    gate = asyncio.Event()

    @worker_queue(maxsize=1, cache={})
    async def f(key: str) -> str:
        await gate.wait()
        return key

    first = asyncio.ensure_future(f("a"))
    queued = [asyncio.ensure_future(f("b")), asyncio.ensure_future(f("b"))]
    for _ in range(5):
        await asyncio.sleep(0)
    assert f.queue.waiting == 1
    for task in queued:
        task.cancel()
    gate.set()
    assert await bounded(first) == "a"
    info = f.cache_info()
    assert (info.hits, info.misses, info.joined) == (0, 2, 1)  # three calls


class Mutable:
    """A key whose hash the worker changes (a mistake, which must not break the queue)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mutable) and other.n == self.n


async def test_a_key_whose_hash_changes_during_its_computation_is_still_let_go() -> None:
    async def mutate(item: Mutable) -> int:
        item.n += 1003  # another slot of the table: found again only by identity
        await asyncio.sleep(0)
        return item.n

    async def no_lookup(item: Mutable) -> None:
        return None

    async def no_store(item: Mutable, value: int) -> None:
        pass

    queue: WorkerQueue[Mutable, int] = WorkerQueue(mutate, no_lookup, no_store, maxsize=1)
    assert await bounded(queue.require(Mutable(1))) == 1004
    assert await bounded(queue.require(Mutable(2))) == 1005  # the slot was freed
    assert queue.computing == 0
    await bounded(queue.aclose())


async def test_a_caller_sharing_a_lookup_whose_item_was_dropped_is_not_left_waiting() -> None:
    """B shares A's lookup of 'k'; A's miss queues 'k' behind 'x' and A leaves; the queue then
    closes, dropping 'k' unstarted before B hears the answer: B must not join it."""
    gate_k, gate_x, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def cache_get(item: str) -> str | None:
        if item == "k":
            await gate_k.wait()
            answered.set()
        return None

    async def cache_set(item: str, value: str) -> None:
        pass

    async def work(item: str) -> str:
        if item == "x":
            await gate_x.wait()
        return item

    queue: WorkerQueue[str, str] = WorkerQueue(work, cache_get, cache_set, maxsize=1)
    x = asyncio.ensure_future(queue.require("x"))
    for _ in range(5):
        await asyncio.sleep(0)
    a = asyncio.ensure_future(queue.require("k"))
    await asyncio.sleep(0)
    b = asyncio.ensure_future(queue.require("k"))
    await asyncio.sleep(0)
    gate_k.set()
    await bounded(answered.wait())
    # A has queued 'k' in this same turn; B has not heard the answer yet.
    a.cancel()
    closing = asyncio.ensure_future(queue.aclose())
    await asyncio.sleep(0)
    with pytest.raises(QueueShutDown):
        await bounded(b, 2.0)
    gate_x.set()
    assert await bounded(x) == "x"
    await bounded(closing)


def test_calls_left_waiting_when_the_loop_ends_are_counted() -> None:
    gate = asyncio.Event()

    @worker_queue(maxsize=1, cache={})
    async def f(x: int) -> int:
        await gate.wait()
        return x

    async def main() -> None:
        left = [asyncio.ensure_future(f(x)) for x in (0, 1, 2, 2)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert (f.queue.computing, f.queue.waiting) == (1, 2)
        assert not any(task.done() for task in left)

    asyncio.run(main())  # cancels every task left, the computation and its waiting callers
    info = f.cache_info()
    assert (info.hits, info.misses, info.joined) == (0, 3, 1)  # four calls
