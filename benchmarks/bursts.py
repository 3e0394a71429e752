"""Scenarios 2 and 3: many concurrent calls at once, on one cold key or on many.

Stampede: ``callers`` concurrent calls of one cold key whose computation awaits 1 ms. A
contender that deduplicates computes once; one that does not computes once per caller, and the
table says so. Miss throughput: ``keys`` distinct cold keys requested at once, wq_memo bounded
to 8 computations at a time, each computation awaiting ``asyncio.sleep(0)``. Both are timed
from the first call to the last result, and reported per caller (per key) against async-lru.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from ._harness import (
    Config,
    Figure,
    Table,
    Target,
    clock,
    gc_paused,
    interleave,
    median,
    paired_ratio,
    ratio,
    us,
)
from .contenders import ASYNC_LRU, PEERS, WQ_MEMO, AsyncFn, Contender, Setup

STAMPEDE_DELAY = 0.001
MISS_MAXSIZE = 8
STAMPEDE_TARGET = 0.8
MISS_TARGET, MISS_STRETCH = 0.7, 0.65
"""Targets: wq_memo's time per caller (per key) as a ratio to async-lru's."""


@dataclass
class Service:
    """The function being memoized: counts its computations and how many ran at once."""

    delay: float
    computations: int = 0
    active: int = 0
    peak: int = 0

    async def call(self, x: int) -> int:
        self.computations += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        return x


async def burst(f: AsyncFn, args: Sequence[int]) -> float:
    """Call f once per arg, all at once; seconds from the first call to the last result."""
    with gc_paused():
        start = clock()
        results = await asyncio.gather(*[f(a) for a in args])
        elapsed = clock() - start
    if results != list(args):
        raise AssertionError("a contender returned a wrong result")
    return elapsed


@dataclass
class BurstResult:
    """What one contender did over every round."""

    computations: list[int]
    peaks: list[int]


async def run_bursts(
    contenders: Sequence[Contender],
    setup: Setup,
    args: Sequence[int],
    delay: float,
    rounds: int,
) -> tuple[dict[str, list[float]], dict[str, BurstResult], dict[str, str]]:
    """Interleaved bursts; per contender: seconds per call, computations and peaks, or why not."""
    missing = {c.name: s for c in contenders if (s := c.status()) is not None}
    done: dict[str, BurstResult] = {}
    trials = []
    for contender in contenders:
        if contender.name in missing:
            continue
        result = done[contender.name] = BurstResult([], [])

        async def trial(c: Contender = contender, r: BurstResult = result) -> float:
            service = Service(delay)
            f = c.wrap(service.call, setup)  # fresh and cold each round
            elapsed = await burst(f, args)
            r.computations.append(service.computations)
            r.peaks.append(service.peak)
            return elapsed / len(args)

        trials.append((contender.name, trial))
    samples = await interleave(trials, rounds)
    return samples, done, missing


def contenders() -> list[Contender]:
    return [WQ_MEMO, *PEERS]


def _describe(computations: Sequence[int]) -> str:
    low, high = min(computations), max(computations)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


async def stampede(config: Config, callers: int | None = None) -> Table:
    n = callers or config.callers
    table = Table(
        "stampede",
        f"Stampede: {n:,} concurrent callers of one cold key (computation awaits 1 ms)",
        ["contender", "computations", "us/caller", "x async-lru"],
    )
    samples, done, missing = await run_bursts(
        contenders(), Setup(cache="dict"), [0] * n, STAMPEDE_DELAY, config.rounds
    )
    for c in contenders():
        if c.name in missing:
            table.add(c.name, missing[c.name], "-", "-")
            continue
        vs = (
            ratio(paired_ratio(samples, c.name, ASYNC_LRU.name))
            if ASYNC_LRU.name in samples
            else "-"
        )
        table.add(c.name, _describe(done[c.name].computations), us(median(samples[c.name])), vs)
    table.data = {
        "callers": n,
        "median_seconds_per_caller": {k: median(v) for k, v in samples.items()},
        "computations": {k: r.computations for k, r in done.items()},
    }
    _figures(table, "stampede", samples, "us/caller")
    if ASYNC_LRU.name in samples:
        table.targets.append(
            Target("stampede, wq_memo x async-lru", _vs(samples, ASYNC_LRU), STAMPEDE_TARGET)
        )
    table.notes.append("computations must be 1: more means the peer ran the function per caller")
    return table


async def miss_throughput(config: Config) -> Table:
    n = config.keys
    table = Table(
        "miss_throughput",
        f"Miss throughput: {n:,} distinct cold keys at once (computation awaits sleep(0))",
        ["contender", "computations", "most at once", "us/key", "x async-lru"],
    )
    samples, done, missing = await run_bursts(
        contenders(),
        Setup(cache="dict", maxsize=MISS_MAXSIZE),
        range(n),
        0.0,
        config.rounds,
    )
    for c in contenders():
        if c.name in missing:
            table.add(c.name, missing[c.name], "-", "-", "-")
            continue
        vs = (
            ratio(paired_ratio(samples, c.name, ASYNC_LRU.name))
            if ASYNC_LRU.name in samples
            else "-"
        )
        r = done[c.name]
        table.add(
            c.name, _describe(r.computations), f"{max(r.peaks):,}", us(median(samples[c.name])), vs
        )
    table.data = {
        "keys": n,
        "median_seconds_per_key": {k: median(v) for k, v in samples.items()},
        "computations": {k: r.computations for k, r in done.items()},
        "peak_concurrency": {k: max(r.peaks) for k, r in done.items()},
    }
    _figures(table, "miss throughput", samples, "us/key")
    if ASYNC_LRU.name in samples:
        table.targets.append(
            Target(
                "miss throughput, wq_memo x async-lru",
                _vs(samples, ASYNC_LRU),
                MISS_TARGET,
                stretch=MISS_STRETCH,
            )
        )
    table.notes.append(
        f"wq_memo runs with maxsize={MISS_MAXSIZE}: at most {MISS_MAXSIZE} computations at once "
        f"and {MISS_MAXSIZE} waiting, the other callers wait for room; no peer bounds its "
        "computations, so each runs all of them at once ('most at once')"
    )
    return table


def _figures(table: Table, what: str, samples: dict[str, list[float]], per: str) -> None:
    """wq_memo's and async-lru's time per call; every peer's as a ratio to async-lru's."""
    for name in (WQ_MEMO.name, ASYNC_LRU.name):
        if name in samples:
            table.figures.append(
                Figure(f"{what}, {name}: {per}", median(samples[name]) * 1e6, "us", name)
            )
    if ASYNC_LRU.name not in samples:
        return
    for peer in PEERS:
        if peer is not ASYNC_LRU and peer.name in samples:
            vs = paired_ratio(samples, peer.name, ASYNC_LRU.name)
            table.figures.append(Figure(f"{what}, {peer.name} x async-lru", vs, "x", peer.name))


def _vs(samples: dict[str, list[float]], reference: Contender) -> float:
    return paired_ratio(samples, WQ_MEMO.name, reference.name)
