"""WorkerQueue.aclose(): refuse, drain within finish_timeout, then time out (issue 2: 7)."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import _queue_harness as harness
import pytest
from _queue_harness import (
    Harness,
    bounded,
    callers,
    eventually,
    gathered,
    make,
    returned,
    room_waiters,
    until,
)

from wq_memo import QueueShutDown, ShutdownTimeout, WorkerQueue


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


def waiting_items(h: Harness) -> list[int]:
    return harness.waiting_items(h.queue)


async def test_new_requires_are_refused_from_the_first_moment_of_aclose() -> None:
    h = make()
    gate = h.worker.gate(1)
    h.cache.data[9] = "cached"
    accepted = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    closing = asyncio.create_task(h.queue.aclose())
    await eventually(lambda: not h.queue.running)
    for item in (1, 2, 9):  # a join, a new item, a cached item
        with pytest.raises(QueueShutDown, match="shutting down"):
            await bounded(h.queue.require(item))
    assert not closing.done()
    gate.set()
    assert await bounded(accepted) == "r1"
    assert await returned(closing) is None
    assert h.worker.calls == [1]
    assert h.cache.data[1] == "r1"


async def test_a_require_right_after_aclose_began_is_refused() -> None:
    h = make()
    gate = h.worker.gate(1)
    accepted = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    closing = asyncio.create_task(h.queue.aclose())
    await asyncio.sleep(0)  # closing was ready first, so aclose() has now begun
    assert not h.queue.running
    with pytest.raises(QueueShutDown):
        await bounded(h.queue.require(2))
    gate.set()
    assert await bounded(accepted) == "r1"
    assert await returned(closing) is None
    assert h.worker.calls == [1]


async def test_a_require_still_checking_the_cache_when_aclose_ends_does_not_restart_the_queue() -> (
    None
):
    h = make()
    looking = asyncio.Event()
    answer = asyncio.Event()

    async def cache_get(item: int) -> str | None:
        looking.set()
        await answer.wait()
        return None

    queue: WorkerQueue[int, str] = WorkerQueue(h.worker, cache_get, h.cache.set)
    task = asyncio.create_task(queue.require(1))
    await until(looking)
    await bounded(queue.aclose())
    assert not queue.running
    answer.set()
    with pytest.raises(QueueShutDown):
        await bounded(task)
    assert not queue.running
    assert queue._engine.table is None
    assert h.worker.calls == []


async def test_a_require_sharing_a_lookup_when_aclose_ends_does_not_restart_the_queue() -> None:
    h = make()
    looking = asyncio.Event()
    answer = asyncio.Event()

    async def cache_get(item: int) -> str | None:
        looking.set()
        await answer.wait()
        return None

    queue: WorkerQueue[int, str] = WorkerQueue(h.worker, cache_get, h.cache.set)
    first = asyncio.create_task(queue.require(1))
    await until(looking)
    assert queue._engine.table is not None
    lookup = queue._engine.table.lookups.under_way(1)
    assert lookup is not None
    second = asyncio.create_task(queue.require(1))
    await eventually(lambda: lookup.answer is not None)  # the second shares the first's lookup
    await bounded(queue.aclose())
    answer.set()
    # The first is refused; the second, left without an answer, starts over and is refused too.
    for task in (first, second):
        with pytest.raises(QueueShutDown):
            await bounded(task)
    assert not queue.running
    assert queue._engine.table is None
    assert h.worker.calls == []


async def test_queue_shut_down_is_a_runtime_error() -> None:
    assert issubclass(QueueShutDown, RuntimeError)


async def test_running_and_waiting_items_finish_and_are_cached_during_aclose() -> None:
    h = make(maxsize=1)
    gates = {i: h.worker.gate(i) for i in (0, 1)}
    tasks = [asyncio.create_task(h.queue.require(i)) for i in (0, 1)]
    await eventually(lambda: waiting_items(h) == [1])
    closing = asyncio.create_task(h.queue.aclose())
    await eventually(lambda: not h.queue.running)
    gates[0].set()
    await until(h.worker.started(1))  # the waiting item still gets its turn
    gates[1].set()
    assert await gathered(*tasks) == ["r0", "r1"]
    assert await returned(closing) is None
    assert h.cache.data == {0: "r0", 1: "r1"}
    assert h.worker.cancelled == []
    assert not h.queue.running
    assert h.queue._engine.table is None
    assert other_tasks() == set()


async def test_callers_waiting_for_room_get_queue_shut_down() -> None:
    h = make(maxsize=1)
    gates = {i: h.worker.gate(i) for i in (0, 1)}
    accepted = [asyncio.create_task(h.queue.require(i)) for i in (0, 1)]
    await eventually(lambda: waiting_items(h) == [1])
    refused = [asyncio.create_task(h.queue.require(i)) for i in (2, 3)]
    await eventually(lambda: room_waiters(h.queue) == 2)
    closing = asyncio.create_task(h.queue.aclose())
    for task in refused:
        with pytest.raises(QueueShutDown):
            await bounded(task)
    for gate in gates.values():
        gate.set()
    assert await gathered(*accepted) == ["r0", "r1"]
    assert await returned(closing) is None
    assert h.worker.calls == [0, 1]


async def test_items_unfinished_at_finish_timeout_fail_with_shutdown_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make(maxsize=1, finish_timeout=0.05)
    h.worker.gate(0)  # never opened
    h.worker.gate(1)
    tasks = [asyncio.create_task(h.queue.require(i)) for i in (0, 0, 1)]
    await eventually(lambda: waiting_items(h) == [1] and callers(h.queue, 0) == 2)
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await returned(h.queue.aclose()) is None
    got = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    for exc in got:
        assert isinstance(exc, ShutdownTimeout)
        assert isinstance(exc, TimeoutError)
        assert "finish_timeout" in str(exc)
    assert got[0] is got[1]  # one outcome per item
    assert h.worker.calls == [0]  # item 1 never started
    assert h.worker.cancelled == [0]  # item 0's computation was cancelled
    assert any("finish_timeout" in r.getMessage() for r in caplog.records)
    assert not h.queue.running
    assert h.queue._engine.table is None
    assert other_tasks() == set()


async def test_an_item_that_timed_out_at_shutdown_is_not_poisoned() -> None:
    h = make(finish_timeout=0.01)
    gate = h.worker.gate(1)
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    await bounded(h.queue.aclose())
    with pytest.raises(ShutdownTimeout):
        await bounded(task)
    gate.set()
    assert await bounded(h.queue.require(1)) == "r1"  # computes again, no hang
    assert h.worker.calls == [1, 1]
    h.assert_no_bookkeeping()


async def test_finish_timeout_zero_fails_everything_unfinished_at_once() -> None:
    h = make(finish_timeout=0)
    h.worker.gate(1)
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    await bounded(h.queue.aclose())
    with pytest.raises(ShutdownTimeout):
        await bounded(task)
    assert other_tasks() == set()


async def test_aclose_returns_none_and_never_re_raises_errors_delivered_to_callers() -> None:
    h = make()
    h.worker.fail(1, ValueError("before"))
    with pytest.raises(ValueError, match="before"):
        await bounded(h.queue.require(1))
    gate = h.worker.gate(2)
    h.worker.fail(2, ValueError("during"))
    task = asyncio.create_task(h.queue.require(2))
    await until(h.worker.started(2))
    closing = asyncio.create_task(h.queue.aclose())
    await eventually(lambda: not h.queue.running)
    gate.set()
    with pytest.raises(ValueError, match="during"):
        await bounded(task)
    assert await returned(closing) is None


async def test_an_error_during_the_drain_with_no_caller_left_does_not_fail_aclose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    gate = h.worker.gate(1)
    h.worker.fail(1, ValueError("nobody"))
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    task.cancel()
    closing = asyncio.create_task(h.queue.aclose())
    await eventually(lambda: not h.queue.running)
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        gate.set()
        assert await returned(closing) is None
    assert any("no caller" in r.getMessage() for r in caplog.records)


async def test_aclose_is_idempotent() -> None:
    h = make()
    await bounded(h.queue.require(1))
    assert await returned(h.queue.aclose()) is None
    assert await returned(h.queue.aclose()) is None
    assert not h.queue.running


async def test_concurrent_acloses_share_one_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    h = make(finish_timeout=0.05)
    h.worker.gate(1)
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        results = await gathered(*(h.queue.aclose() for _ in range(5)))
    assert results == [None] * 5
    assert h.worker.cancelled == [1]
    warnings = [r for r in caplog.records if "finish_timeout" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(ShutdownTimeout):
        await bounded(task)
    assert other_tasks() == set()


async def test_aclose_on_a_queue_never_started_does_nothing() -> None:
    h = make()
    assert await returned(h.queue.aclose()) is None
    assert not h.queue.running
    assert h.queue._engine.table is None
    assert h.worker.calls == []
    assert await bounded(h.queue.require(1)) == "r1"  # and it still starts later


async def test_cancelling_the_caller_of_aclose_does_not_stop_the_shutdown() -> None:
    h = make()
    gate = h.worker.gate(1)
    task = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    closing = asyncio.create_task(h.queue.aclose())
    await eventually(lambda: not h.queue.running)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(closing)
    assert not h.queue.running  # still shutting down
    gate.set()
    assert await bounded(task) == "r1"
    await eventually(lambda: h.queue._engine.table is None)
    assert h.cache.data == {1: "r1"}


async def test_no_task_is_left_pending_and_nothing_is_reported_after_aclose(
    loop_errors: list[dict[str, Any]],
) -> None:
    h = make(maxsize=2, finish_timeout=0.05)
    h.worker.gate(1)  # times out
    h.worker.fail(2, ValueError("fails"))
    gate3 = h.worker.gate(3)
    tasks = [asyncio.create_task(h.queue.require(i)) for i in (1, 2, 3, 4)]
    await until(h.worker.started(3))
    gate3.set()
    await bounded(h.queue.aclose())
    got = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert isinstance(got[0], ShutdownTimeout)
    assert isinstance(got[1], ValueError)
    assert got[2:] == ["r3", "r4"]
    assert other_tasks() == set()
    del tasks, got
    gc.collect()
    assert loop_errors == []


async def test_a_worker_that_ignores_cancellation_does_not_hang_aclose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def stubborn(item: int) -> str:
        started.set()
        while True:
            try:
                await release.wait()
                return "late"
            except asyncio.CancelledError:
                continue

    async def cache_get(item: int) -> str | None:
        return None

    async def cache_set(item: int, value: str) -> None:
        pass

    queue: WorkerQueue[int, str] = WorkerQueue(stubborn, cache_get, cache_set, finish_timeout=0.05)
    task = asyncio.create_task(queue.require(1))
    await until(started)
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await returned(queue.aclose()) is None
    with pytest.raises(ShutdownTimeout):
        await bounded(task)
    assert any("ignored cancellation" in r.getMessage() for r in caplog.records)
    assert not queue.running
    release.set()  # let it end, so that the test leaves nothing pending
    await eventually(lambda: other_tasks() == set())


async def test_aclose_of_a_queue_that_only_answered_from_the_cache() -> None:
    h = make()
    h.cache.data[1] = "cached"
    assert await bounded(h.queue.require(1)) == "cached"
    assert h.queue.running
    assert await returned(h.queue.aclose()) is None
    assert not h.queue.running
