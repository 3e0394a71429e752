"""No memory kept per name forever: memoized functions made at run time, each with its own
name=, and dropped, leave nothing behind in wq_memo's tables."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
from _queue_harness import MemoryAsyncCache

from wq_memo import _listeners, _naming, worker_queue
from wq_memo.metrics import Listener, add_listener, remove_listener

MANY = 800
"""More than RETIRED_NAMES."""


@pytest.fixture
def listening() -> Iterator[None]:
    """A listener registered, as metrics in use have one."""
    listener = Listener()
    add_listener(listener)
    try:
        yield
    finally:
        remove_listener(listener)


def sizes() -> tuple[int, int]:
    """How many functions are tracked and how many names have counts kept (those gone are
    folded first)."""
    return len(_listeners.tracked()), len(_listeners._retired)


async def make_use_and_drop(count: int, prefix: str, cache: Any = None) -> None:
    for i in range(count):

        @worker_queue(cache={} if cache is None else cache, name=f"{prefix}-{i}")
        async def f(x: int) -> int:
            return x

        await f(1)
        await f(1)
        del f
    gc.collect()


async def test_dropped_functions_leave_nothing_without_a_listener() -> None:
    gc.collect()
    before = sizes()
    await make_use_and_drop(MANY, "made-at-run-time")
    after = sizes()
    assert all(a <= b for a, b in zip(after, before, strict=True)), (before, after)
    assert not any(name.startswith("made-at-run-time") for name in _listeners.totals())


async def test_with_a_listener_the_names_of_dropped_functions_are_bounded(
    listening: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_listeners, "_retired", {})  # the names made here leave with the test

    @worker_queue(cache={}, name="twin-kept")
    async def twin(x: int) -> int:
        return x

    @worker_queue(cache={}, name="twin-kept")
    async def gone_twin(x: int) -> int:
        return x

    await gone_twin(1)
    await gone_twin(1)
    await twin(2)
    assert _listeners.totals()["twin-kept"][:2] == [1, 2]
    del gone_twin
    gc.collect()
    await make_use_and_drop(MANY, "made-while-listening")
    assert MANY > _listeners.RETIRED_NAMES
    assert sizes()[1] <= _listeners.RETIRED_NAMES
    assert len(_listeners._live_names) <= len(_listeners._live)  # per function alive
    totals = _listeners.totals()
    # The names retired last are kept; so is a name a live function still has, whose total
    # must not go down.
    assert totals[f"made-while-listening-{MANY - 1}"][:2] == [1, 1]
    assert "made-while-listening-0" not in totals
    assert totals["twin-kept"][:2] == [1, 2]
    assert twin.cache_info().misses == 1


async def test_names_claimed_on_an_async_cache_are_released() -> None:
    cache = MemoryAsyncCache()
    await make_use_and_drop(500, "claimed", cache)
    _, names = _naming._claims[id(cache)]
    assert names == {}

    @worker_queue(cache=cache, name="claimed-0")
    async def again(x: int) -> int:
        return x

    assert await again(3) == 3
    assert list(names) == ["claimed-0"]


def test_gone_functions_are_forgotten_even_if_collected_in_another_thread() -> None:
    async def make() -> Any:
        @worker_queue(cache={}, name="dropped-elsewhere")
        async def f(x: int) -> int:
            return x

        await f(1)
        return f

    holder = [asyncio.run(make())]
    assert "dropped-elsewhere" in _listeners._live_names

    def drop() -> None:
        holder.clear()
        gc.collect()

    asyncio.run(asyncio.to_thread(drop))
    _listeners.tracked()
    assert "dropped-elsewhere" not in _listeners._live_names
    assert "dropped-elsewhere" not in _listeners.totals()


async def test_bypassed_counts_of_dropped_functions_are_bounded_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OpenTelemetry counts of calls made with caching off are kept as the others are:
    functions made at run time, each called once switched off and dropped, leave at most
    RETIRED_NAMES names, and never crowd a live function's counts out of the SDK's limit."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from wq_memo import disabled
    from wq_memo.metrics import enable_opentelemetry

    monkeypatch.setattr(_listeners, "_retired", {})
    reader = InMemoryMetricReader()
    adapter = enable_opentelemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    try:
        for i in range(2 * MANY):

            @worker_queue(cache={}, name=f"bypassed-at-run-time-{i}")
            async def f(x: int) -> int:
                return x

            with disabled():
                await f(1)
            del f
        gc.collect()

        @worker_queue(cache={}, name="live")
        async def live(x: int) -> int:
            return x

        for _ in range(3):
            await live(1)
        data = reader.get_metrics_data()
        assert data is not None
        points = [
            (dict(point.attributes or {}), getattr(point, "value", None))
            for metric in data.resource_metrics[0].scope_metrics[0].metrics
            if metric.name == "wq_memo.calls"
            for point in metric.data.data_points
        ]
        names = {attributes.get("function") for attributes, _ in points}
        assert len(names) <= _listeners.RETIRED_NAMES + 1, len(names)
        assert not [a for a, _ in points if a.get("otel.metric.overflow")]
        assert ({"function": "live", "outcome": "hit"}, 2) in points
        assert ({"function": "live", "outcome": "miss"}, 1) in points
    finally:
        remove_listener(adapter)
