"""WorkerQueue: maxsize, backpressure, waking callers that wait for room, no head-of-line blocking
(issue 2: 2)."""

from __future__ import annotations

import asyncio
import time

import _queue_harness as harness
import pytest
from _queue_harness import Harness, bounded, eventually, gathered, make, until

from wq_memo import ShutdownTimeout, WorkerQueue


def room_waiters(h: Harness) -> int:
    return harness.room_waiters(h.queue)


def waiting_items(h: Harness) -> list[int]:
    return harness.waiting_items(h.queue)


def items_waiting_for_room(h: Harness) -> list[int]:
    table = h.queue._engine.table
    return [] if table is None else [f.key for f in table.outside()]


@pytest.mark.parametrize("maxsize", [1, 2, 3])
async def test_maxsize_bounds_running_computations_and_waiting_items(maxsize: int) -> None:
    h = make(maxsize=maxsize)
    n = 4 * maxsize + 2
    gates = {i: h.worker.gate(i) for i in range(n)}
    in_flight: list[int] = []
    h.worker.on_call = lambda _item: in_flight.append(len(h.flights()))
    tasks = [asyncio.create_task(h.queue.require(i)) for i in range(n)]
    # maxsize items run, maxsize wait for a slot, the other callers wait for room.
    await eventually(lambda: room_waiters(h) == n - 2 * maxsize and h.worker.active == maxsize)
    assert sorted(h.worker.calls) == list(range(maxsize))
    assert len(h.flights()) == 2 * maxsize
    assert not any(t.done() for t in tasks)
    # Release one computation at a time: the bounds hold all the way through.
    for i in range(n):
        await until(h.worker.started(i))
        assert h.worker.active <= maxsize
        assert len(h.flights()) <= 2 * maxsize
        gates[i].set()
    assert await gathered(*tasks) == [f"r{i}" for i in range(n)]
    assert h.worker.max_active == maxsize
    assert max(in_flight) <= 2 * maxsize
    assert sorted(h.worker.calls) == list(range(n))
    h.assert_no_bookkeeping()


async def test_a_full_queue_makes_callers_wait_then_serves_them_all() -> None:
    h = make(maxsize=2)
    gate = asyncio.Event()

    async def slow(item: int) -> str:
        h.worker.calls.append(item)
        await gate.wait()
        return f"r{item}"

    queue: WorkerQueue[int, str] = WorkerQueue(slow, h.cache.get, h.cache.set, maxsize=2)
    h = Harness(queue, h.worker, h.cache)
    tasks = [asyncio.create_task(queue.require(i % 25)) for i in range(100)]
    await eventually(lambda: room_waiters(h) > 0)
    gate.set()
    results = await gathered(*tasks)
    assert results == [f"r{i % 25}" for i in range(100)]
    assert sorted(h.worker.calls) == list(range(25))  # waiting callers joined, never recomputed
    h.assert_no_bookkeeping()


def sharing_lookup(h: Harness, item: int) -> bool:
    table = h.queue._engine.table
    assert table is not None
    lookup = table.lookups.under_way(item)
    return lookup is not None and lookup.answer is not None


async def test_callers_of_one_item_waiting_for_room_share_one_place_in_line() -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    gate1 = h.worker.gate(1)
    t0 = asyncio.create_task(h.queue.require(0))
    t1 = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: waiting_items(h) == [1])
    w2a = asyncio.create_task(h.queue.require(2))
    w2b = asyncio.create_task(h.queue.require(2))
    # Both wait for room, on one item: the second joined the first's rather than queuing again.
    await eventually(lambda: room_waiters(h) == 2 and items_waiting_for_room(h) == [2])
    gate0.set()  # item 1 runs; item 2 takes the place it left in line, for both callers
    await eventually(lambda: waiting_items(h) == [2] and room_waiters(h) == 0)
    gate1.set()
    assert await gathered(t0, t1, w2a, w2b) == ["r0", "r1", "r2", "r2"]
    assert h.worker.calls == [0, 1, 2]
    h.assert_no_bookkeeping()


async def test_callers_waiting_for_room_are_not_woken_until_their_result_is_ready() -> None:
    h = make(maxsize=1)
    gates = {i: h.worker.gate(i) for i in range(4)}
    t0 = asyncio.create_task(h.queue.require(0))
    t1 = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: waiting_items(h) == [1])
    # Through _call, as @worker_queue calls it after its own cache lookup.
    w2a = h.queue._engine.table_now().call(2, (2,), {})
    w2b = h.queue._engine.table_now().call(2, (2,), {})
    w3 = asyncio.create_task(h.queue.require(3))
    await eventually(lambda: room_waiters(h) == 3)
    gates[0].set()  # item 1 runs; item 2 is admitted into the line for both of its callers
    await eventually(lambda: waiting_items(h) == [2])
    assert not w2a.done()
    assert not w2b.done()
    gates[1].set()  # item 2 runs; item 3 is admitted while item 2 still runs
    await until(h.worker.started(2))
    await eventually(lambda: waiting_items(h) == [3])
    assert not w2a.done()  # their one wake-up is the result
    assert not w2b.done()
    for gate in gates.values():
        gate.set()
    assert await gathered(t0, t1, w2a, w2b, w3) == ["r0", "r1", "r2", "r2", "r3"]
    assert h.worker.calls == [0, 1, 2, 3]
    h.assert_no_bookkeeping()


async def test_an_item_filled_in_the_cache_while_it_waited_is_not_computed() -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    gate1 = h.worker.gate(1)
    t0 = asyncio.create_task(h.queue.require(0))
    t1 = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: waiting_items(h) == [1])
    w5 = asyncio.create_task(h.queue.require(5))
    w6 = asyncio.create_task(h.queue.require(6))
    await eventually(lambda: room_waiters(h) == 2)
    h.cache.data[5] = "from elsewhere"  # filled by someone else while w5 waits
    gate0.set()
    await eventually(lambda: waiting_items(h) == [5])
    gate1.set()
    # Item 5's turn: it is looked up again before computing, found, and item 6 runs at once.
    assert await bounded(w5) == "from elsewhere"
    assert await gathered(t0, t1, w6) == ["r0", "r1", "r6"]
    assert 5 not in h.worker.calls
    h.assert_no_bookkeeping()


async def test_callers_cancelled_while_waiting_for_room_leave_their_items_behind() -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    gate1 = h.worker.gate(1)
    t0 = asyncio.create_task(h.queue.require(0))
    t1 = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: waiting_items(h) == [1])
    waiters = {i: asyncio.create_task(h.queue.require(i)) for i in range(2, 8)}
    await eventually(lambda: room_waiters(h) == 6)
    for i in (2, 4, 6):
        waiters[i].cancel()
    await eventually(lambda: room_waiters(h) == 3)
    gate0.set()
    # The place item 1 left in the line goes to the first item whose callers are still there.
    await eventually(lambda: waiting_items(h) == [3])
    gate1.set()
    assert await gathered(t0, t1, waiters[3], waiters[5], waiters[7]) == [
        "r0",
        "r1",
        "r3",
        "r5",
        "r7",
    ]
    for i in (2, 4, 6):
        assert waiters[i].cancelled()
    assert h.worker.calls == [0, 1, 3, 5, 7]
    h.assert_no_bookkeeping()


async def test_an_item_whose_callers_left_after_it_was_admitted_is_dropped_at_its_turn() -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    gate1 = h.worker.gate(1)
    t0 = asyncio.create_task(h.queue.require(0))
    t1 = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: waiting_items(h) == [1])
    w2 = asyncio.create_task(h.queue.require(2))
    w3 = asyncio.create_task(h.queue.require(3))
    await eventually(lambda: room_waiters(h) == 2)
    loop = asyncio.get_running_loop()

    def cancel_w2_soon(item: int) -> None:
        # Item 0 ends in this very step, which admits item 2 into the line: w2 is cancelled
        # right after that.
        if item == 0:
            loop.call_soon(w2.cancel)

    h.worker.before_return = cancel_w2_soon
    gate0.set()
    with pytest.raises(asyncio.CancelledError):
        await bounded(w2)
    gate1.set()
    # Item 2's turn comes with nobody waiting for it: it is dropped and item 3 runs at once.
    assert await gathered(t0, t1, w3) == ["r0", "r1", "r3"]
    assert 2 not in h.worker.calls
    h.assert_no_bookkeeping()


async def test_a_look_up_at_an_items_turn_holds_its_slot_like_a_computation() -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    gate1 = h.worker.gate(1)
    looking = asyncio.Event()

    async def cache_get(item: int) -> str | None:
        # Item 2's second look (at its turn, before computing) hangs until cancelled.
        if item == 2 and h.cache.gets.count(2) == 1:
            looking.set()
            await asyncio.Event().wait()
        return await h.cache.get(item)

    queue: WorkerQueue[int, str] = WorkerQueue(h.worker, cache_get, h.cache.set, maxsize=1)
    h = Harness(queue, h.worker, h.cache)
    t0 = asyncio.create_task(queue.require(0))
    t1 = asyncio.create_task(queue.require(1))
    await eventually(lambda: waiting_items(h) == [1])
    w2 = asyncio.create_task(queue.require(2))
    w3 = asyncio.create_task(queue.require(3))
    await eventually(lambda: room_waiters(h) == 2)
    gate0.set()
    gate1.set()
    await until(looking)
    w2.cancel()  # its item goes on: the look-up hangs, the slot is item 2's
    with pytest.raises(asyncio.CancelledError):
        await bounded(w2)
    assert await gathered(t0, t1) == ["r0", "r1"]
    assert not w3.done()
    await bounded(queue.aclose(), within=2 * queue.finish_timeout + 1)
    with pytest.raises(ShutdownTimeout):
        await bounded(w3)
    h.assert_no_bookkeeping()


# -- no head-of-line blocking ----------------------------------------------------------------------


async def test_one_slow_item_does_not_hold_back_the_others() -> None:
    h = make(maxsize=3)
    slow_gate = h.worker.gate(0)
    slow = asyncio.create_task(h.queue.require(0))
    await until(h.worker.started(0))
    fast = [asyncio.create_task(h.queue.require(i)) for i in range(1, 13)]
    assert await gathered(*fast) == [f"r{i}" for i in range(1, 13)]
    assert not slow.done()
    assert h.worker.active == 1  # the slow item, still held
    slow_gate.set()
    assert await bounded(slow) == "r0"
    h.assert_no_bookkeeping()


async def test_a_computation_that_ends_starts_the_next_waiting_item_at_once() -> None:
    h = make(maxsize=2)
    gates = {i: h.worker.gate(i) for i in range(4)}
    tasks = [asyncio.create_task(h.queue.require(i)) for i in range(4)]
    await eventually(lambda: waiting_items(h) == [2, 3])
    gates[1].set()  # item 0 still runs: item 2 starts in item 1's slot
    await until(h.worker.started(2))
    assert not h.worker.started(3).is_set()
    assert await bounded(tasks[1]) == "r1"
    for gate in gates.values():
        gate.set()
    assert await gathered(*tasks) == ["r0", "r1", "r2", "r3"]


async def test_twelve_quick_items_finish_quickly_beside_one_slow_item() -> None:
    """Coarse wall-clock check, bounded generously: ideal is 6 rounds of 10 ms."""
    slow_gate = asyncio.Event()

    async def worker(item: int) -> str:
        if item == 0:
            await slow_gate.wait()
        else:
            await asyncio.sleep(0.01)
        return f"r{item}"

    async def cache_get(item: int) -> str | None:
        return None

    async def cache_set(item: int, value: str) -> None:
        pass

    queue: WorkerQueue[int, str] = WorkerQueue(worker, cache_get, cache_set, maxsize=3)
    slow = asyncio.create_task(queue.require(0))
    await asyncio.sleep(0)
    start = time.perf_counter()
    await gathered(*(queue.require(i) for i in range(1, 13)))
    elapsed = time.perf_counter() - start
    assert not slow.done()
    assert elapsed < 1.0
    slow_gate.set()
    assert await bounded(slow) == "r0"
