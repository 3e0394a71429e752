"""OpenTelemetry: what enable_opentelemetry() reports, read through the SDK's in-memory reader."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from wq_memo import disabled, worker_queue
from wq_memo.metrics import enable_opentelemetry, remove_listener

WAIT = 5.0


class Metrics:
    """The provider's metrics, collected on demand: {(name, attributes): point}."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.reader = reader

    def collect(self) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
        found: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "wq_memo"
                for metric in scope.metrics:
                    points = found.setdefault(metric.name, {})
                    for point in metric.data.data_points:
                        points[frozenset((point.attributes or {}).items())] = point
        return found


@pytest.fixture
def otel() -> Iterator[Metrics]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    try:
        yield Metrics(reader)
    finally:
        remove_listener(adapter)
        provider.shutdown()


def calls(found: dict[str, Any], function: str) -> dict[str, int]:
    return {
        dict(attrs)["outcome"]: point.value
        for attrs, point in found["wq_memo.calls"].items()
        if dict(attrs)["function"] == function
    }


async def test_calls_by_outcome_durations_and_failures_by_type(otel: Metrics) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()

    @worker_queue(name="fetch")
    async def fetch(x: int) -> int:
        entered.set()
        await gate.wait()
        if x < 0:
            raise ValueError(x)
        return x

    async with asyncio.timeout(WAIT):
        first = [asyncio.create_task(fetch(1)) for _ in range(3)]
        await entered.wait()
        await asyncio.sleep(0)  # the other two join
        found = otel.collect()
        running = found["wq_memo.computations.running"]
        assert running[frozenset({("function", "fetch")})].value == 1
        gate.set()
        assert await asyncio.gather(*first) == [1, 1, 1]
        assert await fetch(1) == 1
        with pytest.raises(ValueError, match="-1"):
            await fetch(-1)

    found = otel.collect()
    assert calls(found, "fetch") == {"hit": 1, "miss": 2, "joined": 2, "refresh": 0}
    durations = found["wq_memo.computation.duration"]
    ok = durations[frozenset({("function", "fetch")})]
    failed = durations[frozenset({("function", "fetch"), ("error.type", "ValueError")})]
    assert (ok.count, failed.count) == (1, 1)
    assert ok.sum >= 0
    failures = found["wq_memo.computation.failures"]
    assert failures[frozenset({("function", "fetch"), ("error.type", "ValueError")})].value == 1
    assert found["wq_memo.computations.running"][frozenset({("function", "fetch")})].value == 0
    assert found["wq_memo.computations.waiting"][frozenset({("function", "fetch")})].value == 0


async def test_bypassed_calls_are_counted(otel: Metrics) -> None:
    @worker_queue(cache={}, name="direct")
    async def f(x: int) -> int:
        return x

    with disabled():
        await f(1)
        await f(1)
    assert calls(otel.collect(), "direct") == {
        "hit": 0,
        "miss": 0,
        "joined": 0,
        "refresh": 0,
        "bypassed": 2,
    }


async def test_functions_of_one_name_add_up_and_counts_never_go_down(otel: Metrics) -> None:
    def make() -> Any:
        @worker_queue(name="twin")
        async def f(x: int) -> int:
            return x

        return f

    a, b = make(), make()
    await a(1)
    await b(1)
    await b(1)
    assert calls(otel.collect(), "twin") == {"hit": 1, "miss": 2, "joined": 0, "refresh": 0}
    del a
    gc.collect()
    assert calls(otel.collect(), "twin")["miss"] == 2


async def test_nothing_is_reported_once_removed() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    remove_listener(adapter)
    try:

        @worker_queue(name="unwatched")
        async def f(x: int) -> int:
            return x

        await f(1)
        data = reader.get_metrics_data()
        names = (
            {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
            if data is not None
            else set()
        )
        assert "wq_memo.calls" not in names
        assert "wq_memo.computation.duration" not in names
    finally:
        provider.shutdown()
