"""WorkerQueue across event loops: successive asyncio.run() calls (issue 2: 9).

These tests are plain functions that run event loops of their own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from _queue_harness import WAIT, Harness, make, room_waiters, waiting_items

from wq_memo import QueueShutDown, ShutdownTimeout, WorkerQueue

X = TypeVar("X")


def run(main: Callable[[], Awaitable[X]]) -> X:
    """asyncio.run(main()), bounded."""

    async def bounded() -> X:
        async with asyncio.timeout(WAIT):
            return await main()

    return asyncio.run(bounded())


def test_a_queue_keeps_working_and_keeps_its_cache_in_a_second_asyncio_run() -> None:
    h = make(maxsize=2)

    async def burst() -> list[str]:
        return await asyncio.gather(*(h.queue.require(i % 5) for i in range(30)))

    expected = [f"r{i % 5}" for i in range(30)]
    assert run(burst) == expected
    assert sorted(h.worker.calls) == list(range(5))
    assert run(burst) == expected
    assert sorted(h.worker.calls) == list(range(5))  # all from the cache

    async def fresh() -> str:
        return await h.queue.require(99)

    assert run(fresh) == "r99"
    assert h.queue.running


def test_the_same_queue_under_asyncio_runners() -> None:
    h = make(maxsize=1)

    async def contended(n: int) -> list[str]:
        gate = h.worker.gate(n)
        tasks = [asyncio.create_task(h.queue.require(i)) for i in (n, 10 + n, n, n)]
        await h.worker.started(n).wait()
        gate.set()
        return await asyncio.gather(*tasks)

    for n in range(3):
        with asyncio.Runner() as runner:
            expected = [f"r{n}", f"r{10 + n}", f"r{n}", f"r{n}"]
            assert runner.run(asyncio.wait_for(contended(n), WAIT)) == expected
    assert sorted(h.worker.calls) == [0, 1, 2, 10, 11, 12]


def test_a_loop_that_ended_mid_computation_does_not_poison_the_next_one() -> None:
    h = make()

    async def abandon() -> None:
        h.worker.gate(1)  # never opened in this loop
        task = asyncio.create_task(h.queue.require(1))
        await h.worker.started(1).wait()
        assert not task.done()
        # asyncio.run() cancels the computation and its caller when this returns

    run(abandon)
    assert h.worker.cancelled == [1]

    async def again() -> str:
        h.worker.gate(1).set()
        h.worker.started(1).clear()
        return await h.queue.require(1)

    assert run(again) == "r1"  # no "bound to a different event loop", no hang
    assert h.worker.calls == [1, 1]
    assert_clean(h)


def test_asyncio_run_ending_with_items_running_and_waiting_leaves_no_task_behind() -> None:
    """The end of asyncio.run() cancels the running computation: the waiting one must not start
    then, as a task asyncio.run() would not cancel and would destroy pending."""
    h = make(maxsize=1)
    reported: list[dict[str, Any]] = []

    async def abandon() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, c: reported.append(c))
        h.worker.gate(0)  # never opened in this loop
        h.worker.gate(1)
        callers = [asyncio.create_task(h.queue.require(i)) for i in (0, 1)]
        await h.worker.started(0).wait()
        assert waiting_items(h.queue) == [1]
        assert not any(c.done() for c in callers)

    run(abandon)
    assert h.worker.calls == [0]  # item 1 never started
    assert h.worker.cancelled == [0]

    async def again() -> list[str]:
        for i in (0, 1):
            h.worker.gate(i).set()
        return list(await asyncio.gather(h.queue.require(0), h.queue.require(1)))

    assert run(again) == ["r0", "r1"]
    assert_clean(h)
    gc.collect()  # the first loop's leftovers, if any, are destroyed now
    assert reported == []


def test_a_loop_left_with_a_computation_pending_is_left_behind() -> None:
    """run_until_complete() returning while a computation is pending, loop not closed."""
    h = make()
    first = asyncio.new_event_loop()
    try:
        gate = h.worker.gate(1)

        async def start() -> asyncio.Task[str]:
            task = asyncio.create_task(h.queue.require(1))
            await h.worker.started(1).wait()
            return task

        caller = first.run_until_complete(start())

        async def meanwhile() -> list[str]:
            h.worker.gate(1).set()
            return list(await asyncio.gather(h.queue.require(1), h.queue.require(2)))

        assert run(meanwhile) == ["r1", "r2"]
        assert h.worker.calls == [1, 1, 2]
    finally:
        # Let the first loop finish what it left pending, then close it.
        gate.set()
        pending = asyncio.all_tasks(first)
        first.run_until_complete(asyncio.wait(pending, timeout=WAIT))
        first.close()
    assert all(t.done() for t in pending)
    assert caller.result() == "r1"  # the first loop's caller got its result in the end


def test_a_loop_closed_with_computations_pending_is_forgotten_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio itself reports the tasks destroyed pending; the queue adds no error of its own."""
    h = make(maxsize=1)
    first = asyncio.new_event_loop()
    reported: list[dict[str, Any]] = []
    first.set_exception_handler(lambda _, context: reported.append(context))

    async def start() -> None:
        h.worker.gate(0)  # never opened
        h.worker.gate(1)
        for i in (0, 1, 2):  # running, waiting, waiting for room
            asyncio.create_task(h.queue.require(i))  # noqa: RUF006 - left pending on purpose
        await h.worker.started(0).wait()
        await asyncio.sleep(0)
        assert h.queue._engine.table is not None
        assert room_waiters(h.queue) == 1

    first.run_until_complete(start())
    first.close()

    async def again() -> list[str]:
        for i in (0, 1):
            h.worker.gate(i).set()
        return list(await asyncio.gather(*(h.queue.require(i) for i in (0, 1, 2))))

    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert run(again) == ["r0", "r1", "r2"]
        gc.collect()  # the first loop's tasks are destroyed now
    assert [r.getMessage() for r in caplog.records if r.name == "wq_memo"] == []
    assert {str(c["message"]) for c in reported} == {"Task was destroyed but it is pending!"}
    assert h.worker.calls == [0, 0, 1, 2]  # items 1 and 2 never started on the closed loop


def test_shutdown_timeout_in_one_loop_then_a_fresh_start_in_the_next() -> None:
    h = make(finish_timeout=0.01)

    async def close_with_leftovers() -> Any:
        h.worker.gate(1)
        task = asyncio.create_task(h.queue.require(1))
        await h.worker.started(1).wait()
        await h.queue.aclose()
        return (await asyncio.gather(task, return_exceptions=True))[0]

    assert isinstance(run(close_with_leftovers), ShutdownTimeout)

    async def again() -> str:
        h.worker.gate(1).set()
        return await h.queue.require(1)

    assert run(again) == "r1"


def test_aclose_in_a_later_loop_forgets_a_queue_of_a_closed_loop() -> None:
    h = make()

    async def use() -> str:
        return await h.queue.require(1)

    run(use)
    assert h.queue.running  # started in a loop that is now closed

    async def close() -> None:
        await h.queue.aclose()

    run(close)
    assert not h.queue.running
    assert h.queue._engine.table is None
    assert run(use) == "r1"


def test_aclose_all_in_a_later_loop_closes_a_queue_of_a_closed_loop() -> None:
    h = make()

    async def use() -> str:
        return await h.queue.require(1)

    run(use)

    async def close_all() -> None:
        await WorkerQueue.aclose_all()

    run(close_all)
    assert not h.queue.running


def test_a_closing_queue_refuses_requires_but_a_new_loop_starts_it_again() -> None:
    h = make()

    async def close_while_requiring() -> None:
        gate = h.worker.gate(1)
        task = asyncio.create_task(h.queue.require(1))
        await h.worker.started(1).wait()
        closing = asyncio.create_task(h.queue.aclose())
        await asyncio.sleep(0)
        with pytest.raises(QueueShutDown):
            await h.queue.require(2)
        gate.set()
        assert await task == "r1"
        await closing

    run(close_while_requiring)

    async def use() -> str:
        return await h.queue.require(2)

    assert run(use) == "r2"


def assert_clean(h: Harness) -> None:
    h.assert_no_bookkeeping()


# -- the eager task factory (Python 3.12+) ---------------------------------------------------------

eager_only = pytest.mark.skipif(
    not hasattr(asyncio, "eager_task_factory"), reason="asyncio.eager_task_factory is 3.12+"
)


def run_eager(main: Callable[[], Awaitable[X]]) -> X:
    async def eager() -> X:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        return await main()

    return run(eager)


@eager_only
def test_the_queue_works_when_tasks_start_eagerly() -> None:
    """Computations may then run, even finish, inside require() before it awaits anything."""
    h = make(maxsize=2)
    h.worker.fail(9, ValueError("nine"))

    async def mixed() -> list[object]:
        gate = h.worker.gate(5)
        tasks = [asyncio.create_task(h.queue.require(i % 6)) for i in range(30)]
        tasks.append(asyncio.create_task(h.queue.require(9)))
        await h.worker.started(5).wait()
        gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    got = run_eager(mixed)
    assert got[:30] == [f"r{i % 6}" for i in range(30)]
    assert isinstance(got[30], ValueError)
    assert sorted(h.worker.calls) == [0, 1, 2, 3, 4, 5, 9]
    assert h.worker.max_active <= 2
    assert_clean(h)


@eager_only
def test_an_error_delivered_at_once_is_not_logged_as_lost_when_tasks_start_eagerly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    h.worker.fail(1, ValueError("one"))

    async def fail() -> object:
        return (await asyncio.gather(h.queue.require(1), return_exceptions=True))[0]

    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert isinstance(run_eager(fail), ValueError)
    assert not [r for r in caplog.records if "no caller" in r.getMessage()]


@eager_only
def test_aclose_closes_the_queue_every_time_when_tasks_start_eagerly() -> None:
    """The shutdown task may then finish before aclose() even stores it."""
    h = make()

    async def cycles() -> None:
        for i in range(3):
            assert await h.queue.require(i) == f"r{i}"
            assert h.queue.running
            await h.queue.aclose()
            assert not h.queue.running
            assert h.queue._engine._closing is None
        await h.queue.require(9)
        await WorkerQueue.aclose_all()
        assert not h.queue.running

    run_eager(cycles)
