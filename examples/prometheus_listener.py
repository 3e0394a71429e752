"""Metrics of memoized functions in Prometheus, through a wq_memo.metrics.Listener.

    pip install prometheus-client && python examples/prometheus_listener.py

prints what a Prometheus server would scrape after a few calls. In a service, register the
listener once at start-up and serve ``registry`` with ``prometheus_client.start_http_server``.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from wq_memo import worker_queue
from wq_memo.metrics import Listener, add_listener, remove_listener


class PrometheusListener(Listener):
    """Counts calls by outcome and times computations, labelled by function."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "wq_memo_calls", "Calls by outcome", ["function", "outcome"], registry=registry
        )
        self.seconds = Histogram(
            "wq_memo_computation_seconds",
            "Computation durations",
            ["function", "error"],
            registry=registry,
        )

    def on_hit(self, name: str) -> None:
        self.calls.labels(name, "hit").inc()

    def on_miss(self, name: str) -> None:
        self.calls.labels(name, "miss").inc()

    def on_joined(self, name: str) -> None:
        self.calls.labels(name, "joined").inc()

    def on_bypassed(self, name: str) -> None:
        self.calls.labels(name, "bypassed").inc()

    def on_refresh(self, name: str) -> None:
        self.calls.labels(name, "refresh").inc()

    def on_computed(self, name: str, seconds: float, error: type[BaseException] | None) -> None:
        self.seconds.labels(name, "" if error is None else error.__qualname__).observe(seconds)


@worker_queue(name="square")
async def square(x: int) -> int:
    await asyncio.sleep(0.01)
    return x * x


async def main() -> bytes:
    registry = CollectorRegistry()
    listener = PrometheusListener(registry)
    add_listener(listener)
    try:
        await asyncio.gather(*(square(i % 3) for i in range(10)))  # 3 misses, 7 joined
        await square(1)  # a hit
    finally:
        remove_listener(listener)
        await square.queue.aclose()
    return generate_latest(registry)


if __name__ == "__main__":
    print(asyncio.run(main()).decode())
