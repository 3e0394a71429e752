"""OpenTelemetry reports RedisCache.stats() of the caches memoized functions use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from wq_memo import worker_queue
from wq_memo.backends.redis import RedisCache
from wq_memo.metrics import enable_opentelemetry, remove_listener

pytest_plugins = ("redis_fixtures",)


async def test_redis_stats_are_reported_by_event_and_namespace(
    make_redis_cache: Callable[..., RedisCache], redis_namespace: str
) -> None:
    cache = make_redis_cache()

    @worker_queue(cache=cache, name="metrics-square")
    async def square(x: int) -> int:
        return x * x

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    try:
        assert await square(3) == 9
        square.queue._engine.forget_all()
        assert await square(3) == 9  # from Redis
        data = reader.get_metrics_data()
    finally:
        remove_listener(adapter)
        provider.shutdown()
    assert data is not None
    points: list[Any] = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "wq_memo.redis.events"
        for point in metric.data.data_points
    ]
    events = {
        p.attributes["event"]: p.value
        for p in points
        if p.attributes["namespace"] == redis_namespace
    }
    stats = cache.stats()
    assert events["computed"] == stats.computed == 1
    assert events["hits"] == stats.hits >= 1
    assert set(events) == set(stats.__dataclass_fields__)
