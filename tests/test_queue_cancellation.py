"""WorkerQueue: a cancelled caller never cancels the computation or other callers (issue 2: 6)."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from typing import Any

import pytest
from _queue_harness import bounded, callers, eventually, gathered, make, until


async def test_cancelling_one_caller_leaves_the_computation_and_the_others_alone() -> None:
    h = make()
    gate = h.worker.gate(1)
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(3)]
    await eventually(lambda: callers(h.queue, 1) == 3)
    tasks[0].cancel()  # the caller that started the computation
    await eventually(lambda: callers(h.queue, 1) == 2)
    assert h.worker.cancelled == []
    gate.set()
    assert await gathered(tasks[1], tasks[2]) == ["r1", "r1"]
    assert tasks[0].cancelled()
    assert h.worker.calls == [1]
    assert h.worker.cancelled == []
    h.assert_no_bookkeeping()


async def test_a_computation_whose_callers_were_all_cancelled_finishes_and_is_cached() -> None:
    h = make()
    gate = h.worker.gate(1)
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(3)]
    await eventually(lambda: callers(h.queue, 1) == 3)
    for task in tasks:
        task.cancel()
    await eventually(lambda: callers(h.queue, 1) == 0)
    assert 1 in h.flights()  # still computing
    gate.set()
    await eventually(lambda: not h.flights())
    assert h.cache.data == {1: "r1"}
    assert h.worker.cancelled == []
    assert await bounded(h.queue.require(1)) == "r1"  # a retry gets the cached result
    assert h.worker.calls == [1]
    h.assert_no_bookkeeping()


async def test_a_retry_while_the_abandoned_computation_runs_joins_it() -> None:
    h = make()
    gate = h.worker.gate(1)
    first = asyncio.create_task(h.queue.require(1))
    await until(h.worker.started(1))
    first.cancel()
    await eventually(lambda: callers(h.queue, 1) == 0)
    retry = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: callers(h.queue, 1) == 1)
    gate.set()
    assert await bounded(retry) == "r1"
    assert h.worker.calls == [1]


async def test_an_error_nobody_is_left_to_receive_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    gate = h.worker.gate(1)
    h.worker.fail(1, ValueError("lost"))
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(2)]
    await eventually(lambda: callers(h.queue, 1) == 2)
    for task in tasks:
        task.cancel()
    await eventually(lambda: callers(h.queue, 1) == 0)
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        gate.set()
        await eventually(lambda: not h.flights())
    records = [r for r in caplog.records if r.name == "wq_memo"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert "no caller" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], ValueError)
    # Not cached: a retry computes again.
    h.worker.succeed(1)
    assert await bounded(h.queue.require(1)) == "r1"
    assert h.worker.calls == [1, 1]


async def test_an_error_nobody_is_left_to_receive_is_never_reported_as_unretrieved(
    monkeypatch: pytest.MonkeyPatch, loop_errors: list[dict[str, Any]]
) -> None:
    # Log records hold the error, hence the failed future: keep them out of pytest's capture
    # so that the future can be destroyed, which is when asyncio would complain.
    monkeypatch.setattr(logging.getLogger("wq_memo"), "propagate", False)
    h = make()
    gate = h.worker.gate(1)
    h.worker.fail(1, ValueError("lost"))
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(2)]
    await eventually(lambda: callers(h.queue, 1) == 2)
    future = weakref.ref(h.flights()[1].waiter)  # the first caller's
    for task in tasks:
        task.cancel()
    await eventually(lambda: callers(h.queue, 1) == 0)
    gate.set()
    await eventually(lambda: not h.flights())
    del tasks, task  # their CancelledError tracebacks reach the future
    h.worker.succeed(1)
    gc.collect()
    assert future() is None  # destroyed, so asyncio had its chance to complain
    assert loop_errors == []


async def test_an_error_delivered_to_callers_is_not_logged_as_lost(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    h = make()
    h.worker.fail(1, ValueError("delivered"))
    with (
        caplog.at_level(logging.DEBUG, logger="wq_memo"),
        pytest.raises(ValueError, match="delivered"),
    ):
        await bounded(h.queue.require(1))
    assert not [r for r in caplog.records if "no caller" in r.getMessage()]
    gc.collect()
    assert loop_errors == []


async def test_a_caller_cancelled_while_checking_the_cache_leaves_nothing_behind() -> None:
    h = make(yields=True)
    task = asyncio.create_task(h.queue.require(1))
    await eventually(lambda: h.cache.gets == [1])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    assert h.worker.calls == []
    h.assert_no_bookkeeping()


async def test_cancelling_callers_of_a_failing_item_leaves_the_rest_with_the_error() -> None:
    h = make()
    gate = h.worker.gate(1)
    error = KeyError("k")
    h.worker.fail(1, error)
    tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(4)]
    await eventually(lambda: callers(h.queue, 1) == 4)
    tasks[1].cancel()
    tasks[3].cancel()
    await eventually(lambda: callers(h.queue, 1) == 2)
    gate.set()
    got = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    assert got[0] is error
    assert got[2] is error
    assert isinstance(got[1], asyncio.CancelledError)
    assert isinstance(got[3], asyncio.CancelledError)
    h.assert_no_bookkeeping()


async def test_a_caller_timing_out_leaves_the_computation_running_for_a_later_call() -> None:
    h = make()
    gate = h.worker.gate(1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await h.queue.require(1)
    await until(h.worker.started(1))
    gate.set()
    await eventually(lambda: not h.flights())
    assert await bounded(h.queue.require(1)) == "r1"
    assert h.worker.calls == [1]


async def test_a_worker_raising_cancelled_error_itself_cancels_its_callers_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    h.worker.fail(1, asyncio.CancelledError())
    gate = h.worker.gate(1)  # both callers join before it raises
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        both = asyncio.gather(h.queue.require(1), h.queue.require(1), return_exceptions=True)
        await eventually(lambda: callers(h.queue, 1) == 2)
        gate.set()
        outcomes = await bounded(both)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert "without being cancelled" in caplog.text
    h.worker.succeed(1)
    assert await bounded(h.queue.require(1)) == "r1"  # nothing was cached or left behind
    assert h.worker.calls == [1, 1]
