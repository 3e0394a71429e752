"""Scenario 6, growth: the hit path as the cache grows, the stampede as the callers multiply.

Hit path: an LRUCache of each size is filled by hand, then wq_memo and the hand-written
reference, both over that same cache, are called with arguments drawn at random from the
cached ones; async-lru (filled through calls, so only up to 100,000 entries) runs alongside.
Stampede: wq_memo and async-lru with more and more callers of one cold key. Both should stay
flat: the cost of a call must not depend on how much is cached or how many wait with it.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any

import cachetools
from cachetools.keys import hashkey

from wq_memo import worker_queue

from ._harness import Config, Table, clock, gc_paused, interleave, median, ns, us
from .bursts import STAMPEDE_DELAY, run_bursts
from .contenders import ASYNC_LRU, WQ_MEMO, AsyncFn, Setup, reference_over

ASYNC_LRU_LARGEST = 100_000
"""async-lru can only be filled through calls; beyond this it takes too long to be worth it."""


async def compute(x: int) -> int:
    return x


async def time_calls(f: AsyncFn, args: list[int]) -> float:
    with gc_paused():
        start = clock()
        for a in args:
            await f(a)
        return (clock() - start) / len(args)


async def hit_growth(config: Config) -> Table:
    table = Table(
        "hit_growth",
        "Growth of the hit path: ns per call by cache size (LRUCache; keys drawn at random)",
        [
            "cache size",
            "hand-written",
            "wq_memo",
            "async-lru",
            "wq_memo x hand-written",
            "wq_memo, one warm key",
        ],
    )
    rng = random.Random(5)
    calls = 20_000 if config.quick else 200_000
    series: dict[str, dict[int, float]] = {
        "hand-written": {},
        "wq_memo": {},
        "async-lru": {},
        "wq_memo, one warm key": {},
    }
    alru_ok = ASYNC_LRU.status() is None
    for size in config.growth_sizes:
        cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(maxsize=size)
        for i in range(size):
            cache[hashkey(i)] = i
        args = [rng.randrange(size) for _ in range(calls)]
        trials: list[tuple[str, AsyncFn]] = [
            ("hand-written", reference_over(cache, compute)),
            ("wq_memo", worker_queue(cache=cache)(compute)),
        ]
        if alru_ok and size <= ASYNC_LRU_LARGEST:
            alru = ASYNC_LRU.wrap(compute, Setup(cache="lru", size=size))
            for i in range(size):
                await alru(i)
            trials.append(("async-lru", alru))

        def timed(f: AsyncFn, args: list[int] = args) -> Any:
            return lambda: time_calls(f, args)

        timings = [(n, timed(f)) for n, f in trials]
        one_key = [args[0]] * len(args)
        timings.append(("wq_memo, one warm key", timed(trials[1][1], one_key)))
        samples = await interleave(timings, config.growth_rounds)
        for name, values in samples.items():
            series[name][size] = median(values)
        del trials, cache
        ref, wq = series["hand-written"][size], series["wq_memo"][size]
        alru_cell = ns(series["async-lru"][size]) if size in series["async-lru"] else "-"
        warm = ns(series["wq_memo, one warm key"][size])
        table.add(f"{size:,}", ns(ref), ns(wq), alru_cell, f"{wq / ref:.2f}x", warm)
    table.data = {"median_seconds_per_call": series}
    if not alru_ok:
        table.notes.append(f"async-lru: {ASYNC_LRU.status()}")
    table.notes.append(
        "random keys over a large cache miss the CPU's caches, whoever looks them up: compare "
        "wq_memo with the hand-written reference over the same cache, and with one warm key"
    )
    table.notes.append(
        f"async-lru is measured up to {ASYNC_LRU_LARGEST:,} entries: it can only be filled "
        "through calls, each of which keeps a finished task"
    )
    return table


async def stampede_growth(config: Config) -> Table:
    table = Table(
        "stampede_growth",
        "Growth of the stampede: us per caller by number of callers (one cold key, 1 ms)",
        ["callers", "wq_memo", "async-lru", "wq_memo computations"],
    )
    series: dict[str, dict[int, float]] = {WQ_MEMO.name: {}, ASYNC_LRU.name: {}}
    contenders = [WQ_MEMO] + ([ASYNC_LRU] if ASYNC_LRU.status() is None else [])
    for n in config.growth_callers:
        samples, done, _ = await run_bursts(
            contenders, Setup(cache="dict"), [0] * n, STAMPEDE_DELAY, config.growth_rounds
        )
        for name, values in samples.items():
            series[name][n] = median(values)
        alru = us(series[ASYNC_LRU.name][n]) if n in series[ASYNC_LRU.name] else "-"
        computations = sorted(set(done[WQ_MEMO.name].computations))
        table.add(
            f"{n:,}",
            us(series[WQ_MEMO.name][n]),
            alru,
            ", ".join(str(c) for c in computations),
        )
    table.data = {"median_seconds_per_caller": series}
    return table


def write_chart(hits: Table, stampedes: Table, path: Path) -> str:
    """Draw both growth tables into one PNG; return a line saying what happened."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return "chart: matplotlib is not installed; no chart written"
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in hits.data["median_seconds_per_call"].items():
        if points:
            xs = sorted(points)
            left.plot(xs, [points[x] * 1e9 for x in xs], marker="o", label=name)
    left.set(
        xscale="log",
        xlabel="entries in the cache",
        ylabel="ns per call",
        title="Hit path by cache size",
        ylim=(0, None),
    )
    for name, points in stampedes.data["median_seconds_per_caller"].items():
        if points:
            xs = sorted(points)
            right.plot(xs, [points[x] * 1e6 for x in xs], marker="o", label=name)
    right.set(
        xscale="log",
        xlabel="concurrent callers of one cold key",
        ylabel="us per caller",
        title="Stampede by number of callers",
        ylim=(0, None),
    )
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"
