"""WorkerQueue: a cache that fails never fails the call, and is logged (issue 2: 5)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from _queue_harness import bounded, callers, eventually, gathered, make, room_waiters


def wq_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "wq_memo" and r.levelno >= logging.ERROR]


async def test_cache_get_raising_counts_as_a_miss_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    error = ConnectionError("cache down")
    h.cache.get_error = error
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert await bounded(h.queue.require(1)) == "r1"
    assert h.worker.calls == [1]
    records = wq_errors(caplog)
    assert len(records) == 1
    assert "cache_get" in records[0].getMessage()
    assert "1" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is error
    assert h.cache.data == {1: "r1"}  # cache_set still stores it


async def test_cache_set_raising_still_returns_the_result_to_every_caller_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make()
    error = ConnectionError("cache full")
    h.cache.set_error = error
    gate = h.worker.gate(1)
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        tasks = [asyncio.create_task(h.queue.require(1)) for _ in range(3)]
        await eventually(lambda: callers(h.queue, 1) == 3)
        gate.set()
        assert await gathered(*tasks) == ["r1"] * 3
    records = wq_errors(caplog)
    assert len(records) == 1
    assert "cache_set" in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[1] is error
    h.assert_no_bookkeeping()
    # Nothing was stored, so the next require computes again, and the queue still works.
    h.cache.set_error = None
    assert await bounded(h.queue.require(1)) == "r1"
    assert h.worker.calls == [1, 1]
    assert h.cache.data == {1: "r1"}


async def test_a_cache_get_failing_after_a_wait_for_room_is_a_miss_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = make(maxsize=1)
    gate0 = h.worker.gate(0)
    t0 = asyncio.create_task(h.queue.require(0))
    t1 = asyncio.create_task(h.queue.require(1))
    t2 = asyncio.create_task(h.queue.require(2))
    await eventually(lambda: room_waiters(h.queue) == 1)
    h.cache.get_error = OSError("flaky")  # the waiter's second look fails
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        gate0.set()
        assert await gathered(t0, t1, t2) == ["r0", "r1", "r2"]
    assert any("cache_get" in r.getMessage() for r in wq_errors(caplog))
    h.assert_no_bookkeeping()
