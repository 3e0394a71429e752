"""The OpenTelemetry adapter: a Listener for computations, and counts read at collection time."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Final, final

from opentelemetry import metrics

from . import _listeners
from ._listeners import Listener

__all__ = ("OpenTelemetryMetrics",)

_OUTCOMES: Final = dict(
    zip(_listeners.COUNTED, ("hit", "miss", "joined", "refresh", "bypassed"), strict=True)
)

_DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Seconds: the SDK's default buckets are meant for milliseconds."""


@final
class OpenTelemetryMetrics(Listener):
    """Reports every memoized function's calls and computations to an OpenTelemetry meter.

    Calls by outcome, computations running and waiting, and RedisCache's counters are read
    when the meter collects, so a hit costs nothing more; durations and failures are recorded
    as each computation ends. Every point carries the function's name as ``function``.
    """

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        from . import __version__

        meter = metrics.get_meter("wq_memo", __version__, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "wq_memo.computation.duration",
            unit="s",
            description="How long each computation of a memoized function took",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._failures = meter.create_counter(
            "wq_memo.computation.failures",
            unit="{computation}",
            description="Computations that raised, by exception type (error.type)",
        )
        meter.create_observable_counter(
            "wq_memo.calls",
            [self._calls],
            unit="{call}",
            description="Calls of memoized functions by outcome: hit, miss, joined, bypassed, "
            "refresh (a background refresh, no caller)",
        )
        meter.create_observable_up_down_counter(
            "wq_memo.computations.running",
            [self._running],
            unit="{computation}",
            description="Computations running now",
        )
        meter.create_observable_up_down_counter(
            "wq_memo.computations.waiting",
            [self._waiting],
            unit="{computation}",
            description="Computations waiting in line for a slot",
        )
        meter.create_observable_counter(
            "wq_memo.redis.events",
            [self._redis],
            unit="{event}",
            description="RedisCache.stats() counters of the caches memoized functions use, "
            "by event and namespace",
        )

    def __repr__(self) -> str:
        return "<wq_memo OpenTelemetryMetrics>"

    # -- told as things happen ----------------------------------------------------------------

    def on_computed(self, name: str, seconds: float, error: type[BaseException] | None) -> None:
        if error is None:
            self._duration.record(seconds, {"function": name})
            return
        attributes = {"function": name, "error.type": error.__qualname__}
        self._duration.record(seconds, attributes)
        self._failures.add(1, attributes)

    # -- read at collection time --------------------------------------------------------------

    def _reporting(self) -> bool:
        return self in _listeners.listeners

    def _calls(self, _: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if not self._reporting():
            return []
        # Read from the tracked functions' own counts, so that names gone are forgotten as
        # _listeners forgets them; "bypassed" only once caching was switched off for a call.
        return [
            metrics.Observation(count, {"function": name, "outcome": outcome})
            for name, counts in _listeners.totals().items()
            for outcome, count in zip(_OUTCOMES.values(), counts, strict=True)
            if count or outcome != "bypassed"
        ]

    def _gauge(self, what: str) -> list[metrics.Observation]:
        if not self._reporting():
            return []
        sums: dict[str, int] = {}
        for name, memoized in _listeners.tracked():
            sums[name] = sums.get(name, 0) + getattr(memoized.queue, what)
        return [metrics.Observation(n, {"function": name}) for name, n in sums.items()]

    def _running(self, _: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return self._gauge("computing")

    def _waiting(self, _: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return self._gauge("waiting")

    def _redis(self, _: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        module = sys.modules.get("wq_memo.backends.redis")
        if module is None or not self._reporting():
            return []  # never imported: no RedisCache exists
        caches: dict[int, Any] = {}
        for _name, memoized in _listeners.tracked():
            if isinstance(memoized.cache, module.RedisCache):
                caches[id(memoized.cache)] = memoized.cache
        points = []
        for cache in caches.values():
            stats = cache.stats()
            for event in stats.__dataclass_fields__:
                attributes = {"event": event, "namespace": cache.namespace}
                points.append(metrics.Observation(getattr(stats, event), attributes))
        return points
