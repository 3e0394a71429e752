"""Model-based test of WorkerQueue: concurrent requires, held computations, cancellation, close."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from _machinery import CHECK_SLOW_LOOKUPS, FINISH_TIMEOUT, QueueModelMachine, Value, keys
from hypothesis import strategies as st
from hypothesis.stateful import initialize, precondition, rule, run_state_machine_as_test

from wq_memo import WorkerQueue
from wq_memo._flight import FlightTable


class WorkerQueueMachine(QueueModelMachine):
    """Drives a WorkerQueue whose cache is a dict the machine owns and edits itself.

    With ``yielding``, cache_get and cache_set suspend once, as a remote cache would: other
    callers then run between a caller's lookup and its computation, and between a computation's
    end and the storing of its result.
    """

    stored_by_worker = False
    queue: WorkerQueue[str, Value]

    @initialize(maxsize=st.integers(1, 3), yielding=st.booleans())
    def make_queue(self, maxsize: int, yielding: bool) -> None:
        self.maxsize = maxsize
        self.yielding = yielding
        self.store: dict[str, Value] = {}
        self.lookup_delay: dict[asyncio.Task[Any] | None, int] = {}

        async def worker(key: str) -> Value:
            value = await self.work(key)
            assert value is not None
            return value

        async def cache_get(key: str) -> Value | None:
            # The store answers at once; the answer arrives one or more turns of the loop later.
            value = self.store.get(key)
            if yielding:
                for _ in range(1 + self.lookup_delay.get(asyncio.current_task(), 0)):
                    await asyncio.sleep(0)
            if value is not None:
                self.record_hit()
            return value

        async def cache_set(key: str, value: Value) -> None:
            if yielding:
                await asyncio.sleep(0)
            self.store[key] = value
            self.stored(key, value)

        self.queue = WorkerQueue(worker, cache_get, cache_set, maxsize, FINISH_TIMEOUT)

    def call(self, key: str) -> Coroutine[Any, Any, Value]:
        return self.queue.require(key)

    async def aclose(self) -> None:
        await self.queue.aclose()

    def queue_table(self) -> FlightTable[str, Value] | None:
        return self.queue._table

    def counters(self) -> tuple[int, int, int]:
        return self.queue._hits, self.queue._misses, self.queue._joined

    def real_cache(self) -> dict[str, Any]:
        assert not self.storing, f"results returned but never stored: {self.storing}"
        return dict(self.store)

    @precondition(lambda self: CHECK_SLOW_LOOKUPS and self.yielding)
    @rule(batch=st.lists(st.tuples(keys, st.integers(0, 2)), min_size=2, max_size=4))
    def calls_with_slow_lookups(self, batch: list[tuple[str, int]]) -> None:
        """Concurrent calls whose lookups answer after different delays; computations started
        meanwhile finish at once, so a result may be stored while a lookup is on its way."""
        self.instant = True
        callers = self.start_calls([key for key, _ in batch])
        for caller, (_, delay) in zip(callers, batch, strict=True):
            self.lookup_delay[caller.task] = delay
        self.drive()
        self.instant = False

    @rule(key=keys)
    def invalidate(self, key: str) -> None:
        """Remove one cached result: the key's next require computes it again."""
        assert (self.store.pop(key, None) is not None) == self.uncache(key)

    @rule()
    def clear(self) -> None:
        """Empty the cache."""
        self.store.clear()
        for key in list(self.cached):
            self.uncache(key)


def test_worker_queue_machine() -> None:
    run_state_machine_as_test(WorkerQueueMachine)
