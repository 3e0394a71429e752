"""WorkerQueue.aclose_all() and the weak registry behind it (issue 2: 8)."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Iterator

import pytest
from _queue_harness import bounded, eventually, make, returned, until

from wq_memo import WorkerQueue, _queue_registry


async def test_aclose_all_closes_every_running_queue() -> None:
    started = [make() for _ in range(10)]
    idle = make()
    for i, h in enumerate(started):
        assert await bounded(h.queue.require(i)) == f"r{i}"
    assert all(h.queue.running for h in started)
    assert await returned(WorkerQueue.aclose_all()) is None
    assert not any(h.queue.running for h in started)
    assert all(h.queue._engine.table is None for h in started)
    assert not idle.queue.running
    assert idle.queue._engine.table is None  # aclose_all did not start it
    assert not any(h.queue in _queue_registry._queues for h in started)


async def test_aclose_all_lets_accepted_items_finish() -> None:
    a, b = make(), make(finish_timeout=0.05)
    gate = a.worker.gate(1)
    b.worker.gate(2)  # never opened: times out
    ta = asyncio.create_task(a.queue.require(1))
    tb = asyncio.create_task(b.queue.require(2))
    await until(a.worker.started(1))
    await until(b.worker.started(2))
    closing = asyncio.create_task(WorkerQueue.aclose_all())
    await eventually(lambda: not a.queue.running and not b.queue.running)
    gate.set()
    assert await returned(closing) is None
    assert await bounded(ta) == "r1"
    with pytest.raises(TimeoutError):
        await bounded(tb)


async def test_aclose_all_waits_for_a_queue_already_closing() -> None:
    h = make(finish_timeout=5.0)
    gate = h.worker.gate(1)
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    closing = asyncio.create_task(h.queue.aclose())
    await eventually(lambda: not h.queue.running)
    closing_all = asyncio.create_task(WorkerQueue.aclose_all())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing_all.done()  # it waits for the shutdown under way
    gate.set()
    assert await returned(closing_all) is None
    assert h.queue._engine.table is None
    assert task.done()
    assert await bounded(task) == "r1"
    assert await returned(closing) is None


async def test_aclose_all_with_nothing_running_does_nothing() -> None:
    await bounded(WorkerQueue.aclose_all())
    await bounded(WorkerQueue.aclose_all())


async def test_queues_started_after_aclose_all_are_registered_again() -> None:
    h = make()
    await bounded(h.queue.require(1))
    await bounded(WorkerQueue.aclose_all())
    await bounded(h.queue.require(2))
    assert h.queue in _queue_registry._queues
    await bounded(WorkerQueue.aclose_all())
    assert not h.queue.running


async def test_a_queue_dropped_by_its_owner_is_garbage_collected() -> None:
    never_started = make().queue
    started = make().queue
    closed = make().queue
    await bounded(started.require(1))
    await bounded(closed.require(1))
    await bounded(closed.aclose())
    refs = [weakref.ref(q) for q in (never_started, started, closed)]
    assert started in _queue_registry._queues
    del never_started, started, closed
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    await bounded(WorkerQueue.aclose_all())  # the registry copes with the vanished queues


async def test_a_queue_dropped_while_its_callers_were_cancelled_is_collected_after_its_work() -> (
    None
):
    h = make()
    gate = h.worker.gate(1)
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    task.cancel()
    await eventually(task.done)  # not awaited: its CancelledError would hold the caller's frames
    assert task.cancelled()
    ref = weakref.ref(h.queue)
    table = h.queue._engine.table
    assert table is not None
    del h.queue, task
    gc.collect()
    assert ref() is None  # the computation does not keep the queue alive
    gate.set()
    await eventually(lambda: not table.flights)
    assert h.cache.data == {1: "r1"}  # and it still ran to the end


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in another thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def test_aclose_all_leaves_alone_queues_running_on_another_live_loop(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    async def value(item: int) -> str:
        return f"v{item}"

    async def cache_get(item: int) -> str | None:
        return None

    async def cache_set(item: int, value: str) -> None:
        pass

    elsewhere: WorkerQueue[int, str] = WorkerQueue(value, cache_get, cache_set)
    future = asyncio.run_coroutine_threadsafe(elsewhere.require(1), other_loop)
    assert await bounded(asyncio.wrap_future(future)) == "v1"
    here = make()
    await bounded(here.queue.require(1))
    await bounded(WorkerQueue.aclose_all())
    assert not here.queue.running
    assert elsewhere.running  # it belongs to the other loop, which still runs
    # Using it from this loop is refused with a clear message.
    with pytest.raises(RuntimeError, match="another running event loop"):
        await elsewhere.require(2)
    closing = asyncio.run_coroutine_threadsafe(elsewhere.aclose(), other_loop)
    await bounded(asyncio.wrap_future(closing))
    assert closing.exception() is None
    assert not elsewhere.running
