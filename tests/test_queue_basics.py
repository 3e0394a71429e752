"""WorkerQueue: the cache, deduplication, worker errors, lazy start, construction (issue 2: 1, 3, 4,
11)."""

from __future__ import annotations

import asyncio
import math
from importlib import resources
from typing import Any

import pytest
from _queue_harness import bounded, callers, eventually, gathered, make, until

from wq_memo import WorkerQueue

# -- 1. cache hit, join, compute -------------------------------------------------------------------


async def test_a_cached_item_is_returned_without_calling_the_worker() -> None:
    h = make()
    h.cache.data[1] = "cached"
    assert await bounded(h.queue.require(1)) == "cached"
    assert h.worker.calls == []
    assert h.cache.gets == [1]


async def test_a_missing_item_is_computed_stored_and_returned() -> None:
    h = make()
    assert await bounded(h.queue.require(2)) == "r2"
    assert h.worker.calls == [2]
    assert h.cache.data == {2: "r2"}
    # The next require is a cache hit.
    assert await bounded(h.queue.require(2)) == "r2"
    assert h.worker.calls == [2]
    h.assert_no_bookkeeping()


@pytest.mark.parametrize("yields", [False, True], ids=["sync-cache", "yielding-cache"])
async def test_concurrent_requires_of_one_item_make_one_worker_call(yields: bool) -> None:
    h = make(yields=yields)
    results: list[object] = []

    async def worker(item: int) -> Any:
        h.worker.calls.append(item)
        await gate.wait()
        result = [item]  # a fresh object: every caller must get this very one
        results.append(result)
        return result

    gate = asyncio.Event()
    queue: WorkerQueue[int, Any] = WorkerQueue(worker, h.cache.get, h.cache.set)
    tasks = [asyncio.create_task(queue.require(7)) for _ in range(10)]
    await eventually(lambda: callers(queue, 7) == 10)
    gate.set()
    got = await gathered(*tasks)
    assert h.worker.calls == [7]
    assert len(results) == 1
    assert all(r is results[0] for r in got)
    stored: object = h.cache.data[7]
    assert stored is results[0]


async def test_concurrent_requires_of_one_failing_item_get_the_same_exception_object() -> None:
    h = make()
    gate = h.worker.gate(1)
    error = ValueError("boom")
    h.worker.fail(1, error)
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(5)]
    await eventually(lambda: callers(h.queue, 1) == 5)
    gate.set()
    got = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert all(r is error for r in got)
    assert h.worker.calls == [1]


async def test_a_require_joins_an_item_that_is_still_waiting_for_a_slot() -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    first = asyncio.create_task(h.queue.require(0))
    await until(h.worker.started(0))
    waiting = [asyncio.create_task(h.queue.require(1)) for _ in range(4)]
    await eventually(lambda: callers(h.queue, 1) == 4)
    assert h.worker.calls == [0]  # item 1 waits: it has no slot yet
    gate0.set()
    assert await gathered(*waiting) == ["r1"] * 4
    assert await bounded(first) == "r0"
    assert h.worker.calls == [0, 1]
    h.assert_no_bookkeeping()


async def test_counters_tell_hits_computations_and_joins_apart() -> None:
    h = make()
    gate = h.worker.gate(1)
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(3)]
    await eventually(lambda: callers(h.queue, 1) == 3)
    gate.set()
    await gathered(*tasks)
    await bounded(h.queue.require(1))
    c = h.queue._engine.counts
    assert (c.hits, c.misses, c.joined) == (1, 1, 2)


# -- 3. lazy start, restart ------------------------------------------------------------------------


async def test_the_queue_starts_on_the_first_require() -> None:
    h = make()
    assert not h.queue.running
    assert h.queue._engine.table is None
    assert await bounded(h.queue.require(1)) == "r1"
    assert h.queue.running


async def test_the_first_require_after_aclose_starts_the_queue_again() -> None:
    h = make()
    await bounded(h.queue.require(1))
    await bounded(h.queue.aclose())
    assert not h.queue.running
    assert await bounded(h.queue.require(2)) == "r2"
    assert h.queue.running
    assert await bounded(h.queue.require(1)) == "r1"  # the cache survived the restart
    assert h.worker.calls == [1, 2]
    await bounded(h.queue.aclose())
    assert not h.queue.running


async def test_async_with_starts_and_closes_the_queue() -> None:
    h = make()
    async with h.queue as queue:
        assert queue is h.queue
        assert queue.running
        assert await bounded(queue.require(3)) == "r3"
    assert not h.queue.running
    assert h.queue._engine.table is None


async def test_async_with_closes_the_queue_when_its_body_raises() -> None:
    h = make()
    gate = h.worker.gate(1)
    tasks: list[asyncio.Task[str]] = []

    async def body() -> None:
        async with h.queue:
            tasks.append(asyncio.create_task(h.queue.require(1)))
            await until(h.worker.started(1))
            gate.set()  # an accepted item still finishes during the close
            raise KeyError("body")

    with pytest.raises(KeyError, match="body"):
        await body()
    assert not h.queue.running
    assert await bounded(tasks[0]) == "r1"


# -- 4. worker errors ------------------------------------------------------------------------------


async def test_a_worker_error_is_not_cached() -> None:
    h = make()
    h.worker.fail(1, ValueError("first"))
    with pytest.raises(ValueError, match="first"):
        await bounded(h.queue.require(1))
    assert h.cache.data == {}
    h.worker.succeed(1)
    assert await bounded(h.queue.require(1)) == "r1"
    assert h.worker.calls == [1, 1]
    h.assert_no_bookkeeping()


async def test_a_worker_error_leaves_other_items_and_the_queue_working() -> None:
    h = make()
    gate1 = h.worker.gate(1)
    gate2 = h.worker.gate(2)
    h.worker.fail(1, RuntimeError("one"))
    t1 = asyncio.create_task(h.queue.require(1))
    t2 = asyncio.create_task(h.queue.require(2))
    await until(h.worker.started(2))
    gate1.set()
    with pytest.raises(RuntimeError, match="one"):
        await bounded(t1)
    assert not t2.done()
    gate2.set()
    assert await bounded(t2) == "r2"
    assert h.queue.running
    assert await bounded(h.queue.require(3)) == "r3"
    h.assert_no_bookkeeping()


async def test_a_worker_that_is_not_async_fails_the_callers_not_the_queue() -> None:
    h = make()

    def not_async(item: int) -> str:
        return str(item)

    queue: WorkerQueue[int, str] = WorkerQueue(not_async, h.cache.get, h.cache.set)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await bounded(queue.require(1))
    assert queue.running
    assert queue._engine.table is not None
    assert queue._engine.table.flights == {}


# -- construction ----------------------------------------------------------------------------------


async def test_arguments_are_accepted_positionally_and_by_keyword() -> None:
    h = make()
    positional: WorkerQueue[int, str] = WorkerQueue(h.worker, h.cache.get, h.cache.set, 5, 0.5)
    keyword: WorkerQueue[int, str] = WorkerQueue(
        worker=h.worker,
        cache_get=h.cache.get,
        cache_set=h.cache.set,
        maxsize=5,
        finish_timeout=0.5,
    )
    for queue in (positional, keyword):
        assert (queue.maxsize, queue.finish_timeout) == (5, 0.5)
        assert await bounded(queue.require(1)) == "r1"
    defaults: WorkerQueue[int, str] = WorkerQueue(h.worker, h.cache.get, h.cache.set)
    assert (defaults.maxsize, defaults.finish_timeout) == (3, 3.0)


@pytest.mark.parametrize("name", ["worker", "cache_get", "cache_set"])
def test_a_callable_argument_that_is_not_callable_is_refused(name: str) -> None:
    h = make()
    args: dict[str, Any] = {"worker": h.worker, "cache_get": h.cache.get, "cache_set": h.cache.set}
    args[name] = "not a function"
    with pytest.raises(TypeError, match=name):
        WorkerQueue(**args)


@pytest.mark.parametrize("maxsize", [0, -1, 1.5, True, "3", None])
def test_a_bad_maxsize_is_refused(maxsize: Any) -> None:
    h = make()
    with pytest.raises((TypeError, ValueError), match="maxsize"):
        WorkerQueue(h.worker, h.cache.get, h.cache.set, maxsize=maxsize)


@pytest.mark.parametrize("finish_timeout", [-0.1, math.nan, True, "1", None])
def test_a_bad_finish_timeout_is_refused(finish_timeout: Any) -> None:
    h = make()
    with pytest.raises((TypeError, ValueError), match="finish_timeout"):
        WorkerQueue(h.worker, h.cache.get, h.cache.set, finish_timeout=finish_timeout)


def test_constructing_a_queue_needs_no_event_loop_and_starts_nothing() -> None:
    h = make()
    assert not h.queue.running
    assert h.queue._engine.table is None
    assert "maxsize=3" in repr(h.queue)


# -- 11. typed -------------------------------------------------------------------------------------


def test_the_package_ships_py_typed_and_the_queue_is_generic() -> None:
    assert resources.files("wq_memo").joinpath("py.typed").is_file()
    alias = WorkerQueue[int, str]
    assert alias.__origin__ is WorkerQueue  # type: ignore[attr-defined]


async def test_a_slow_lookup_never_lets_a_second_computation_start() -> None:
    # The first caller's lookup reads a miss, then answers late; meanwhile a second caller
    # would miss too, compute and store. It must share the first lookup instead.
    store: dict[str, str] = {}
    computed: list[str] = []
    slow = [True]

    async def cache_get(item: str) -> str | None:
        value = store.get(item)
        if slow.pop() if slow else False:
            for _ in range(3):
                await asyncio.sleep(0)
        return value

    async def cache_set(item: str, value: str) -> None:
        store[item] = value

    async def work(item: str) -> str:
        computed.append(item)
        return item.upper()

    queue: WorkerQueue[str, str] = WorkerQueue(work, cache_get, cache_set)
    assert await gathered(queue.require("k"), queue.require("k")) == ["K", "K"]
    assert computed == ["k"]
    assert queue._engine.table is not None
    assert not queue._engine.table.lookups
    assert queue._engine.table.flights == {}
    c = queue._engine.counts
    assert (c.hits, c.misses, c.joined) == (0, 1, 1)
    await bounded(queue.aclose())
