"""Refresh-ahead under steady load: hot keys whose entries expire every second.

Callers arrive at 1,000 per second on a fixed schedule: call i is planned i ms after the start
and issued, in a task of its own, as soon as its planned time has come, however late the calls
before it were; a slow moment of the machine delays calls without thinning them. Each call asks
for one of 100 hot keys picked uniformly at random (a seeded sequence per round, the same for
every contender), so each key gets about 10 calls per second at random moments. The memoized
function awaits 50 ms; entries live 1 s. The first second of each run is warm-up, left out of
every figure.

A call *waited* when the value it got was computed after the call started. The function returns
a serial number, how many of its computations had finished when it returned, and each call
compares it with that count at its own start: the same test for every contender, without
looking inside any of them. A wait "on a live entry" is one where the key's latest computation
had finished less than the ttl before the call started, so its entry had not expired. Latency
runs from just before the call to just after it, in the caller's task; how late the scheduler
got to each call is reported apart ("late").

Contenders: wq_memo with a TTLCache alone, and with ``refresh_after``; cashews' ``early``
(recomputed in the background once an entry is ``early_ttl`` old), in memory; async-lru with
``ttl``; and, as the measure of a hit under the same load, wq_memo over a TTLCache whose entries
never expire during the run. The runs are interleaved: ``refresh_rounds`` rounds, each running
every contender once, in an order that rotates from round to round; the figures pool the rounds.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cachetools

from wq_memo import worker_queue

from ._harness import Config, Figure, Table, Target, clock, gc_paused
from .contenders import ASYNC_LRU, PEERS, AsyncFn, Contender

RATE = 1_000
"""Calls per second, planned one every 1 / RATE s."""
KEYS = 100
"""Hot keys, each call picking one uniformly at random."""
TTL = 1.0
REFRESH_AFTER = 0.8
"""wq_memo's refresh_after and cashews' early_ttl."""
WORK = 0.050
"""How long each computation awaits."""
MAXSIZE = KEYS
"""wq_memo's bound on computations at once: one slot per hot key, so that it never binds here
(the peers have no bound)."""
NEVER_EXPIRES = 3600.0
"""The ttl of the every-call-a-hit run."""
MARGIN = 0.001
"""A wait counts as on a live entry when the entry had at least this long left to live."""
SEED = 12
P99_TARGET = 2.0
"""Target: refresh-ahead's p99 latency as a ratio to the p99 of the run where every call hits."""
DRAIN_SECONDS = 5.0
"""How long a run may take to finish its last calls and its background computations."""

CASHEWS = next(p for p in PEERS if p.name == "cashews")


@dataclass
class Source:
    """The memoized function: awaits WORK, returns how many computations have finished."""

    finished: int = 0
    starts: list[float] = field(default_factory=list)
    duplicates: list[float] = field(default_factory=list)
    """When computations started while another of the same key was under way."""
    running: dict[int, int] = field(default_factory=dict)
    written: dict[int, float] = field(default_factory=dict)
    """When each key's latest computation finished (its entry lives ttl from about then)."""
    active: int = 0
    peak: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while no computation is under way."""

    def __post_init__(self) -> None:
        self.idle.set()

    async def fetch(self, key: int) -> int:
        now = clock()
        self.starts.append(now)
        same = self.running.get(key, 0)
        if same:
            self.duplicates.append(now)
        self.running[key] = same + 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.idle.clear()
        try:
            await asyncio.sleep(WORK)
        finally:
            self.running[key] -= 1
            self.active -= 1
            if not self.active:
                self.idle.set()
        self.finished += 1
        self.written[key] = clock()
        return self.finished


@dataclass
class Memo:
    """One contender's memoized function for one run, and how to shut it down after."""

    fn: AsyncFn
    close: Callable[[], Awaitable[None]]
    info: Callable[[], dict[str, int]] = dict
    """Counts the memoizer keeps itself (wq_memo's cache_info), summed over runs."""


@dataclass(frozen=True)
class Variant:
    """One row of the table."""

    name: str
    build: Callable[[Source], Memo]
    ttl: float = TTL
    needs: Contender | None = None
    """The peer that must import (None: wq_memo)."""


def wq_memo_over(ttl: float, **options: Any) -> Callable[[Source], Memo]:
    def build(source: Source) -> Memo:
        cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(maxsize=4 * KEYS, ttl=ttl)
        f: Any = worker_queue(maxsize=MAXSIZE, cache=cache, **options)(source.fetch)

        def info() -> dict[str, int]:
            i = f.cache_info()
            return {
                "misses": i.misses,
                "joined": i.joined,
                "refreshes": i.refreshes,
                "refresh_failures": i.refresh_failures,
            }

        return Memo(f, f.queue.aclose, info)

    return build


def _cashews_early(source: Source) -> Memo:
    cashews: Any = CASHEWS.load()
    cache = cashews.Cache()
    cache.setup("mem://", size=4 * KEYS, check_interval=0)  # no background expiry task
    f: AsyncFn = cache.early(ttl=TTL, early_ttl=REFRESH_AFTER)(source.fetch)
    return Memo(f, cache.close)


def _async_lru_ttl(source: Source) -> Memo:
    f: Any = ASYNC_LRU.load().alru_cache(maxsize=4 * KEYS, ttl=TTL)(source.fetch)

    async def close() -> None:
        await f.cache_close()
        f.cache_clear()  # cancels the timers that would expire its entries later

    return Memo(f, close)


HIT = "wq_memo, TTLCache(ttl=1 h): every call a hit"
TTL_ALONE = "wq_memo, TTLCache(ttl=1)"
REFRESH = f"wq_memo, TTLCache(ttl=1), refresh_after={REFRESH_AFTER:g}"
EARLY = f"cashews early(ttl=1, early_ttl={REFRESH_AFTER:g})"

VARIANTS: tuple[Variant, ...] = (
    Variant(HIT, wq_memo_over(NEVER_EXPIRES), NEVER_EXPIRES),
    Variant(TTL_ALONE, wq_memo_over(TTL)),
    Variant(REFRESH, wq_memo_over(TTL, refresh_after=REFRESH_AFTER)),
    Variant(EARLY, _cashews_early, needs=CASHEWS),
    Variant("async-lru (ttl=1)", _async_lru_ttl, needs=ASYNC_LRU),
)


@dataclass
class Result:
    """What one contender's calls after warm-up did, pooled over its runs."""

    latencies: list[float] = field(default_factory=list)
    at_once: list[float] = field(default_factory=list)
    """The latencies of the calls that did not wait."""
    late: list[float] = field(default_factory=list)
    waited: int = 0
    waited_live: int = 0
    """Calls that waited although their key's entry had not expired."""
    calls: int = 0
    issue_seconds: float = 0.0
    """From the first measured call's start to the last one's, summed over runs."""
    computations: int = 0
    duplicates: int = 0
    """Computations started while another of the same key was under way."""
    peak: int = 0
    """The most computations under way at once after warm-up."""
    info: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Calls started per second (planned: RATE)."""
        return (self.calls - 1) / self.issue_seconds if self.issue_seconds > 0 else 0.0


async def run_once(variant: Variant, keys: Sequence[int], warm_up: float, result: Result) -> None:
    """One run on a fresh function: call i with keys[i] at its planned time; adds to result."""
    source = Source()
    memo = variant.build(source)
    f = memo.fn
    n = len(keys)
    first = min(n, math.ceil(warm_up * RATE))  # the first call after warm-up
    ttl = variant.ttl - MARGIN
    planned = [0.0] * n
    starts = [0.0] * n
    latencies = [0.0] * n
    waited = bytearray(n)  # 0: served at once; 1: waited, no live entry; 2: waited on a live one

    async def call(i: int) -> None:
        key = keys[i]
        before = source.finished
        written = source.written.get(key, -math.inf)
        t0 = clock()
        value = await f(key)
        latencies[i] = clock() - t0
        starts[i] = t0
        if value > before:
            waited[i] = 2 if t0 - written < ttl else 1

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    with gc_paused():
        begin = clock()
        i = 0
        while i < n:
            due = min(n, int((clock() - begin) * RATE) + 1)
            if i <= first < due:
                source.peak = source.active
            while i < due:
                planned[i] = begin + i / RATE
                tasks.append(loop.create_task(call(i)))
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, begin + i / RATE - clock()))
        async with asyncio.timeout(DRAIN_SECONDS):
            await asyncio.gather(*tasks)
            await source.idle.wait()  # background computations still under way
    result.info = {k: result.info.get(k, 0) + v for k, v in memo.info().items()}
    await memo.close()
    measured = range(first, n)
    result.latencies += [latencies[i] for i in measured]
    result.at_once += [latencies[i] for i in measured if not waited[i]]
    result.late += [starts[i] - planned[i] for i in measured]
    result.waited += sum(1 for i in measured if waited[i])
    result.waited_live += sum(1 for i in measured if waited[i] == 2)
    result.calls += len(measured)
    if len(measured) > 1:
        result.issue_seconds += starts[n - 1] - starts[first]
    measured_from = begin + first / RATE
    result.computations += sum(1 for t in source.starts if t >= measured_from)
    result.duplicates += sum(1 for t in source.duplicates if t >= measured_from)
    if first < n:
        result.peak = max(result.peak, source.peak)


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile of values (p from 0.1 to 99.9), interpolated between neighbours."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(p * 10) - 1]


def ms(seconds: float) -> str:
    """Milliseconds, to the microsecond."""
    return f"{seconds * 1e3:,.3f}"


def share(part: int, whole: int) -> str:
    return f"{part:,} ({part / whole:.2%})" if whole else "-"


async def refresh_ahead(config: Config) -> Table:
    seconds, warm_up = config.refresh_seconds, config.refresh_warm_up
    rounds = config.refresh_rounds
    table = Table(
        "refresh_ahead",
        f"Refresh-ahead: {RATE:,} calls/s on {KEYS} hot keys (uniform), ttl {TTL:g} s, "
        f"computation {WORK * 1e3:g} ms; {rounds} x {seconds:g} s per contender, "
        f"the first {warm_up:g} s of each left out",
        [
            "contender",
            "calls",
            "waited",
            "waited, entry live",
            "p50 (ms)",
            "p99 (ms)",
            "max (ms)",
            "p99 at once (ms)",
            "computations",
            "duplicates",
            "most at once",
            "calls/s",
            "late p99 (ms)",
        ],
    )
    missing = {
        v.name: status
        for v in VARIANTS
        if v.needs is not None and (status := v.needs.status()) is not None
    }
    active = [v for v in VARIANTS if v.name not in missing]
    results = {v.name: Result() for v in active}
    for r in range(rounds):
        rng = random.Random(SEED + r)  # a sequence per round, the same for every contender
        keys = [rng.randrange(KEYS) for _ in range(round(seconds * RATE))]
        shift = r % len(active)
        for v in [*active[shift:], *active[:shift]]:
            await run_once(v, keys, warm_up, results[v.name])

    summary: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        if v.name in missing:
            table.add(v.name, missing[v.name], *["-"] * (len(table.columns) - 2))
            continue
        res = results[v.name]
        lat = res.latencies
        p50, p99 = (percentile(lat, 50), percentile(lat, 99)) if lat else (math.nan, math.nan)
        late = percentile(res.late, 99) if res.late else math.nan
        at_once = percentile(res.at_once, 99) if res.at_once else math.nan
        table.add(
            v.name,
            f"{res.calls:,}",
            share(res.waited, res.calls),
            share(res.waited_live, res.calls),
            ms(p50),
            ms(p99),
            ms(max(lat, default=math.nan)),
            ms(at_once),
            f"{res.computations:,}",
            f"{res.duplicates:,}",
            f"{res.peak:,}",
            f"{res.rate:,.0f}",
            ms(late),
        )
        summary[v.name] = {
            "calls": res.calls,
            "waited": res.waited,
            "waited_on_live_entry": res.waited_live,
            "p50_seconds": p50,
            "p99_seconds": p99,
            "max_seconds": max(lat, default=math.nan),
            "p99_served_at_once_seconds": at_once,
            "computations": res.computations,
            "duplicate_computations": res.duplicates,
            "most_at_once": res.peak,
            "calls_per_second": res.rate,
            "late_p99_seconds": late,
            "cache_info": res.info,
        }
    table.data = {
        "rate": RATE,
        "keys": KEYS,
        "ttl": TTL,
        "refresh_after": REFRESH_AFTER,
        "work_seconds": WORK,
        "seconds_per_run": seconds,
        "warm_up_seconds": warm_up,
        "rounds": rounds,
        "seed": SEED,
        "wq_memo_maxsize": MAXSIZE,
        "contenders": summary,
    }
    _targets_and_figures(table, results)
    table.notes.append(
        "waited: the value the call got was computed after the call started (the function "
        "returns a serial number of its computations); entry live: the key's latest "
        "computation had finished less than the ttl before the call started"
    )
    table.notes.append(
        "latency: from just before the call to just after, in the caller's task; late: how "
        "long after its planned time the call started; at once: the calls that did not wait; "
        "calls/s: calls started per second"
    )
    table.notes.append(
        f"each key gets about {RATE // KEYS} calls per second at random moments: an entry "
        f"whose {TTL - REFRESH_AFTER:g} s between refresh_after and the ttl sees no call "
        "expires unrefreshed, and its next caller waits for the computation"
    )
    table.notes.append(
        f"wq_memo runs with maxsize={MAXSIZE}, one slot per hot key (the peers have no bound); "
        "computations, duplicates (computations started while another of the same key was "
        "under way) and most at once (computations under way): after warm-up; with the default "
        f"maxsize=3, at most {3 / WORK:.0f} computations of {WORK * 1e3:g} ms end per second, "
        "fewer than this load needs, and refreshes and misses would queue for slots"
    )
    if EARLY not in missing:
        table.notes.append(
            "cashews runs every call in a task of its own (its protected=True default), "
            "so each of its hits takes a turn of the event loop; a caller that finds the entry "
            "expired while its early recomputation is under way computes the key again, and "
            "the calls that join that caller wait even once the recomputation has stored a "
            "fresh entry (its duplicates, and its waits with the entry live)"
        )
    return table


def _targets_and_figures(table: Table, results: dict[str, Result]) -> None:
    refresh, hit = results[REFRESH], results[HIT]
    if not refresh.latencies:
        return
    table.targets.append(
        Target("refresh-ahead: calls that waited after warm-up", refresh.waited, 0, "")
    )
    table.targets.append(
        Target("refresh-ahead: calls that waited on a live entry", refresh.waited_live, 0, "")
    )
    p99 = percentile(refresh.latencies, 99)
    if hit.latencies:
        table.targets.append(
            Target(
                "refresh-ahead: p99 latency x every call a hit (same load)",
                p99 / percentile(hit.latencies, 99),
                P99_TARGET,
            )
        )
    for name, res in ((REFRESH, refresh), (TTL_ALONE, results[TTL_ALONE])):
        if res.latencies:
            p99 = percentile(res.latencies, 99)
            table.figures.append(Figure(f"refresh-ahead, {name}: p99 latency", p99 * 1e6, "us"))
    if refresh.at_once and hit.latencies:
        table.figures.append(
            Figure(
                f"refresh-ahead, {REFRESH}: p99 of calls served at once x every call a hit",
                percentile(refresh.at_once, 99) / percentile(hit.latencies, 99),
                "x",
            )
        )
