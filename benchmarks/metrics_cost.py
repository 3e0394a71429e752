"""What metrics add to a hit: ``python -m benchmarks.metrics_cost [--quick]``.

wq_memo's hit over a dict and over an LRUCache, timed in interleaved rounds in three states:
nothing registered; OpenTelemetry enabled (the SDK's in-memory reader, never collected during
the run); and a listener that overrides ``on_hit`` (doing nothing in it). Each figure is the
median over rounds; each ratio, the median of the per-round ratios to "nothing registered".
"""

from __future__ import annotations

import argparse
import asyncio
import platform
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import cachetools

from wq_memo import worker_queue
from wq_memo.metrics import Listener, add_listener, enable_opentelemetry, remove_listener

from ._harness import cpu_model, load_average, median
from .hit_path import compute, time_hits


class _HitListener(Listener):
    def on_hit(self, name: str) -> None:
        pass


def _versions() -> str:
    found = []
    for package in ("wq_memo", "cachetools", "opentelemetry-api", "opentelemetry-sdk"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def _make(kind: str) -> Callable[[int], Awaitable[int]]:
    cache: Any = {} if kind == "dict" else cachetools.LRUCache(maxsize=128)
    return worker_queue(cache=cache)(compute)


async def _state_samples(calls: int, rounds: int) -> dict[tuple[str, str], list[float]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    functions = {kind: _make(kind) for kind in ("dict", "LRUCache")}
    for f in functions.values():
        await f(1)
    samples: dict[tuple[str, str], list[float]] = {}
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    for _ in range(rounds):
        for state in ("nothing registered", "OpenTelemetry enabled", "a listener with on_hit"):
            listener: Listener | None = None
            if state == "OpenTelemetry enabled":
                listener = enable_opentelemetry(meter_provider=provider)
            elif state == "a listener with on_hit":
                listener = _HitListener()
                add_listener(listener)
            try:
                for kind, f in functions.items():
                    seconds = await time_hits(f, calls)
                    samples.setdefault((kind, state), []).append(seconds)
            finally:
                if listener is not None:
                    remove_listener(listener)
    provider.shutdown()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a second or two")
    options = parser.parse_args()
    calls, rounds = (20_000, 3) if options.quick else (200_000, 9)
    print(f"Machine: {cpu_model()}, {platform.platform()}; CPython {platform.python_version()}")
    print(f"Versions: {_versions()}; load average {load_average()}")
    samples = asyncio.run(_state_samples(calls, rounds))
    print()
    print("| cache | state | ns/hit | x nothing registered |")
    print("|---|---|--:|--:|")
    for (kind, state), values in samples.items():
        base = samples[kind, "nothing registered"]
        vs = median([v / b for v, b in zip(values, base, strict=True)])
        print(f"| {kind} | {state} | {median(values) * 1e9:,.0f} | {vs:.2f}x |")


if __name__ == "__main__":
    main()
