"""Metrics of memoized functions: listeners for any metrics system, and OpenTelemetry.

``add_listener(listener)`` tells a ``Listener`` of every call (hit, miss, joined, bypassed,
refresh) and every computation (its duration and error) of every memoized function, by name.
``enable_opentelemetry()`` reports them through OpenTelemetry (``pip install 'wq_memo[otel]'``).
With nothing registered, none of this costs a call anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._listeners import Listener, add_listener, remove_listener

if TYPE_CHECKING:
    from ._otel import OpenTelemetryMetrics

__all__ = ("Listener", "add_listener", "enable_opentelemetry", "remove_listener")


def enable_opentelemetry(meter_provider: Any = None) -> OpenTelemetryMetrics:
    """Report every memoized function's metrics through OpenTelemetry, from now on.

    ``meter_provider``: an ``opentelemetry.metrics.MeterProvider`` (default: the global one,
    as ``opentelemetry.metrics.get_meter`` finds it). Returns the adapter, a Listener:
    ``remove_listener()`` on it stops its reports. Call it once per meter provider.

    Raises ImportError, saying what to install, without the opentelemetry-api package.
    """
    try:
        from ._otel import OpenTelemetryMetrics
    except ImportError as exc:
        raise ImportError(
            "wq_memo.metrics.enable_opentelemetry() needs the opentelemetry-api package: "
            "pip install 'wq_memo[otel]' (and an OpenTelemetry SDK to export the metrics)"
        ) from exc
    adapter = OpenTelemetryMetrics(meter_provider)
    add_listener(adapter)
    return adapter
