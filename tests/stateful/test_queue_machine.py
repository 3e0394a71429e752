"""Model-based test of WorkerQueue: concurrent requires, held computations, cancellation, close."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule, run_state_machine_as_test

from wq_memo import WorkerQueue
from wq_memo._flight import FlightTable

from ._machinery import FINISH_TIMEOUT, QueueModelMachine, Value, keys


class WorkerQueueMachine(QueueModelMachine):
    """Drives a WorkerQueue whose cache is a dict the machine owns and edits itself.

    With ``yielding``, cache_get and cache_set suspend once, as a remote cache would: other
    callers then run between a caller's lookup and its computation, and between a computation's
    end and the storing of its result. The machine's gates can hold lookups and stores longer.
    """

    stored_by_worker = False
    stores_suspend = True
    invalidation_forgets_lookups = False
    queue: WorkerQueue[str, Value]

    @initialize(maxsize=st.integers(1, 3), yielding=st.booleans())
    def make_queue(self, maxsize: int, yielding: bool) -> None:
        self.maxsize = maxsize
        self.yielding = yielding
        self.store: dict[str, Value] = {}

        async def worker(key: str) -> Value:
            value = await self.work(key)
            assert value is not None
            return value

        async def cache_get(key: str) -> Value | None:
            # The store answers at once; the answer arrives one or more turns of the loop later.
            value = self.store.get(key)
            if yielding:
                await self.answer_late()
            if value is not None:
                self.record_hit()
            else:
                self.about_to_call(key)
            return value

        async def cache_set(key: str, value: Value) -> None:
            await self.store_late()
            self.store[key] = value
            self.stored(key, value)

        self.queue = WorkerQueue(worker, cache_get, cache_set, maxsize, FINISH_TIMEOUT)

    def call(self, key: str) -> Coroutine[Any, Any, Value]:
        return self.queue.require(key)

    async def aclose(self) -> None:
        await self.queue.aclose()

    def queue_table(self) -> FlightTable[str, Value] | None:
        return self.queue._engine.table

    def counters(self) -> tuple[int, int, int]:
        c = self.queue._engine.counts
        return c.hits, c.misses, c.joined

    def flight_key(self, key: str) -> str:
        return key

    def real_cache(self) -> dict[str, Any]:
        assert not self.storing, f"results returned but never stored: {self.storing}"
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

    def start_invalidation(self, key: str | None) -> None:
        if key is None:
            self.clear()
        else:
            self.invalidate(key)


def test_worker_queue_machine() -> None:
    run_state_machine_as_test(WorkerQueueMachine)
