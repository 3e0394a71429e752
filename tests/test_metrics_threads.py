"""Metrics collection in another thread (an OpenTelemetry SDK's periodic reader) never calls
into a cache: it reads the counts the event loop keeps."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any

import cachetools
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)

from wq_memo import worker_queue
from wq_memo.metrics import enable_opentelemetry, remove_listener

WAIT = 5.0


class Clock:
    """A TTLCache's timer, moved by hand, that notes every thread reading it: a cachetools
    TTLCache reads its timer in each of its operations (and then deletes expired entries)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.readers: set[int] = set()

    def __call__(self) -> float:
        self.readers.add(threading.get_ident())
        return self.now


class Exporter(MetricExporter):
    """Keeps what the reader exports, and in which thread, and says when an export has the
    calls of the function it watches (the reader may export before wq_memo reports)."""

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function
        self.exports: list[tuple[int, MetricsData]] = []
        self.exported = threading.Event()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if misses(metrics_data, self.function):
            self.exports.append((threading.get_ident(), metrics_data))
            self.exported.set()
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def misses(data: MetricsData, function: str) -> Sequence[float]:
    return [
        point.value  # type: ignore[union-attr]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "wq_memo.calls"
        for point in metric.data.data_points
        if dict(point.attributes or {}) == {"function": function, "outcome": "miss"}
    ]


async def test_a_periodic_reader_in_its_own_thread_never_touches_a_ttl_cache() -> None:
    clock = Clock()
    cache: cachetools.TTLCache[Any, int] = cachetools.TTLCache(maxsize=1000, ttl=10, timer=clock)

    @worker_queue(cache=cache, name="ttl-read-by-a-thread")
    async def f(x: int) -> int:
        return x

    for i in range(500):
        assert await f(i) == i
    clock.now = 20.0  # every entry has expired, and is still in the cache
    clock.readers.clear()
    exporter = Exporter("ttl-read-by-a-thread")
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=10)
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    try:
        async with asyncio.timeout(WAIT):
            assert await asyncio.to_thread(exporter.exported.wait, WAIT)
    finally:
        remove_listener(adapter)
        provider.shutdown()
    thread, data = exporter.exports[0]
    assert thread != threading.get_ident()  # collected in the reader's own thread
    assert misses(data, "ttl-read-by-a-thread") == [500]
    assert clock.readers == set()  # the cache was never asked anything meanwhile
    assert cachetools.Cache.__len__(cache) == 500  # nothing deleted (this reads no clock)
    assert f.cache_info().currsize == 0  # on the loop: now the expired entries go


async def test_collections_while_the_loop_stores_and_expires_fail_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    cache: cachetools.TTLCache[Any, int] = cachetools.TTLCache(maxsize=100, ttl=1, timer=clock)

    @worker_queue(cache=cache, name="ttl-busy")
    async def f(x: int) -> int:
        return x

    exporter = Exporter("ttl-busy")
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=1)
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    calls = 0
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the GIL changes hands often: races show sooner
    try:
        with caplog.at_level(logging.WARNING):
            # Entries expire all the time, so that a collection reading the cache's size would
            # delete them from under the loop's stores. The race runs for 200 collections, or
            # for WAIT seconds if the reader's thread collects more slowly than that (a loaded
            # machine, a large heap left by earlier tests), and until one collection at least:
            # a length of run, not a deadline.
            loop = asyncio.get_running_loop()
            until = loop.time() + WAIT
            async with asyncio.timeout(WAIT * 4):  # a call that hangs fails the test
                while (len(exporter.exports) < 200 and loop.time() < until) or not exporter.exports:
                    for i in range(200):
                        assert await f(i) == i
                        clock.now += 0.01
                        calls += 1
                    await asyncio.sleep(0)
    finally:
        sys.setswitchinterval(switch_interval)
        remove_listener(adapter)
        provider.shutdown()
    # What failed: a store on the loop (wq_memo logs it) or a collection (the SDK logs
    # "Callback failed for instrument ..."). The SDK also warns when its reader's thread
    # collects before the provider has registered it, which says nothing of wq_memo.
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("wq_memo") or "Callback failed" in r.getMessage()
    ]
    assert failures == []
    # The race ran while the reader collected at least once (the loop goes on until it has, or
    # the timeout fails the test); its thread, starved of the GIL by the busy loop, managed a
    # single collection in WAIT seconds in one CI run, and 4 on a loaded machine.
    assert exporter.exports, "the reader never collected"
    info = f.cache_info()
    assert info.hits + info.misses == calls


def test_a_read_from_another_thread_during_a_clear_counts_nothing_twice() -> None:
    """A clear moves the counts into the lifetime totals, and the hit path's own hits with them,
    in several steps: a reader in another thread that comes meanwhile reads again once it ends,
    so that it sees every call once (a total read twice would then go down)."""
    from wq_memo import _listeners
    from wq_memo._counts import Counts

    counts = Counts()
    counts.hits, counts.misses = 5, 2
    own = [3]  # hits the hit path counts itself
    tracked = _listeners._Tracked("t", counts, lambda: own[0])
    read: list[list[int]] = []
    readers: list[threading.Thread] = []

    def meanwhile() -> None:
        # Halfway: the counts have moved, the hit path's own hits are not yet zero.
        reader = threading.Thread(target=lambda: read.append(tracked.counted()))
        reader.start()
        reader.join(0.1)
        assert reader.is_alive(), "the reader did not wait for the clear to end"
        readers.append(reader)
        own[0] = 0

    counts.clear(own[0], meanwhile)
    readers[0].join(5)
    assert read == [[8, 2, 0, 0, 0]]
    assert tracked.counted() == [8, 2, 0, 0, 0]
