"""Model-based test of WorkerQueue: concurrent requires, held computations, cancellation, close."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from _machinery import FINISH_TIMEOUT, QueueModelMachine, Value, keys
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

from wq_memo import WorkerQueue
from wq_memo._flight import FlightTable


class WorkerQueueMachine(QueueModelMachine):
    """Drives a WorkerQueue whose cache is a dict the machine owns and edits itself."""

    queue: WorkerQueue[str, Value]

    @initialize(maxsize=st.integers(1, 3))
    def make_queue(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.store: dict[str, Value] = {}

        async def worker(key: str) -> Value:
            value = await self.work(key)
            assert value is not None
            return value

        async def cache_get(key: str) -> Value | None:
            value = self.store.get(key)
            if value is not None:
                self.record_hit()
            return value

        async def cache_set(key: str, value: Value) -> None:
            self.store[key] = value

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
        return dict(self.store)

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
