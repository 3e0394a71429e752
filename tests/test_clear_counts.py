"""Counting: cache_clear() and acache_clear() reset cache_info()'s counts, as functools does;
the metrics (OpenTelemetry counters, listeners' totals) never go down."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator
from typing import Any

import pytest
from _queue_harness import MemoryAsyncCache, bounded, eventually, until
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from wq_memo import worker_queue
from wq_memo.metrics import enable_opentelemetry, remove_listener


class Calls:
    """The counter wq_memo.calls, read through an in-memory OpenTelemetry reader."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.reader = reader

    def of(self, function: str) -> dict[str, int]:
        """{outcome: count} of function, as collected now."""
        data = self.reader.get_metrics_data()
        assert data is not None
        found: dict[str, int] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != "wq_memo.calls":
                        continue
                    for point in metric.data.data_points:
                        attributes = point.attributes or {}
                        if attributes.get("function") == function:
                            assert isinstance(point, NumberDataPoint)
                            found[str(attributes["outcome"])] = int(point.value)
        return found


@pytest.fixture
def otel_calls() -> Iterator[Calls]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    try:
        yield Calls(reader)
    finally:
        remove_listener(adapter)
        provider.shutdown()


def never_lower(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The outcomes whose count is lower in after than in before."""
    return [k for k, n in before.items() if after.get(k, 0) < n]


class HeldLookups(MemoryAsyncCache):
    """A MemoryAsyncCache whose lookups, once ``hold`` is set to an event, read the entry at
    once and answer only when the event is set (``holding`` is set meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def get(self, key: Hashable) -> Any:
        value = await super().get(key)
        hold = self.hold
        if hold is not None:
            self.holding.set()
            await hold.wait()
        return value


async def test_an_item_found_when_looked_up_again_is_counted_once_as_a_hit(
    otel_calls: Calls,
) -> None:
    """An item that waited in line and finds its value when its turn comes counts its caller
    as a hit, and never counted it as a miss first: no count goes down meanwhile."""
    cache = HeldLookups()
    gate = asyncio.Event()

    @worker_queue(maxsize=1, cache=cache, name="looked-again")
    async def f(x: int) -> str:
        if x == 1:
            await gate.wait()
        return f"computed {x}"

    first = asyncio.create_task(f(1))
    await eventually(lambda: f.queue.computing == 1)
    second = asyncio.create_task(f(2))
    await eventually(lambda: f.queue.waiting == 1)
    await bounded(f.acache_prime("primed", 2))  # stored while item 2 waits in line
    cache.hold = asyncio.Event()
    gate.set()  # item 1 ends; item 2 starts and looks its key up again, held there
    await until(cache.holding)
    during, metrics_during = f.cache_info(), otel_calls.of("looked-again")
    cache.hold.set()
    assert await bounded(second) == "primed"
    assert await bounded(first) == "computed 1"
    after, metrics_after = f.cache_info(), otel_calls.of("looked-again")
    assert after.misses >= during.misses, (during, after)
    assert not never_lower(metrics_during, metrics_after), (metrics_during, metrics_after)
    assert (after.hits, after.misses, after.joined) == (1, 1, 0)
    assert (metrics_after["hit"], metrics_after["miss"]) == (1, 1)
