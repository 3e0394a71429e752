"""Scenario 5, memory: bytes per cached entry and per call in flight (tracemalloc).

Per entry: the memoized function is called once for each of n distinct arguments, and the
memory still held afterwards (collected) is divided by n. The reference is the same kind of
cache filled by hand with the same keys and values. Per call in flight: n calls are held inside
their computations (or waiting for a slot) at once, and the memory they hold, divided by n, is
set against n bare calls of the function held the same way.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field

from cachetools.keys import hashkey

from ._harness import Config, Figure, Table, Target, ratio
from .contenders import (
    CACHE_NAMES,
    PEERS,
    WQ_MEMO,
    AsyncFn,
    Contender,
    Setup,
    label,
    make_cache,
)

IN_FLIGHT_TARGET = 2.5
"""Target: what a call in flight holds through wq_memo, as a ratio to a bare call."""
PER_ENTRY_TARGET = 1.1
"""Target: what a cached entry holds, as a ratio to the same cache filled by hand."""

BASE = 1_000_000
"""Arguments start here, so that no argument is one of Python's preallocated small ints."""


@dataclass
class Values:
    """The function being memoized: returns values built before any measurement."""

    values: dict[int, object]
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0

    async def call(self, x: int) -> object:
        return self.values[x]

    async def held(self, x: int) -> object:
        self.active += 1
        await self.gate.wait()
        self.active -= 1
        return self.values[x]


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def per_entry(f: AsyncFn, args: Sequence[int]) -> float:
    tracemalloc.start()
    try:
        before = traced()
        for a in args:
            await f(a)
        return (traced() - before) / len(args)
    finally:
        tracemalloc.stop()


def by_hand(setup: Setup, values: Values, args: Sequence[int], hashkeys: bool) -> float:
    """Bytes per entry of the cache filled directly: keys ``(a,)``, or ``hashkey(a)``."""
    cache = make_cache(setup)
    tracemalloc.start()
    try:
        before = traced()
        if hashkeys:
            for a in args:
                cache[hashkey(a)] = values.values[a]
        else:
            for a in args:
                cache[(a,)] = values.values[a]
        return (traced() - before) / len(args)
    finally:
        tracemalloc.stop()


async def per_call_in_flight(f: AsyncFn, values: Values, args: Sequence[int]) -> float:
    tracemalloc.start()
    try:
        before = traced()
        calls = asyncio.gather(*[f(a) for a in args])
        for _ in range(3):  # every call runs until it blocks: on the gate, or waiting for room
            await asyncio.sleep(0)
        held = traced() - before
        values.gate.set()
        await calls
        return held / len(args)
    finally:
        tracemalloc.stop()


async def memory(config: Config) -> Table:
    n = config.memory_entries
    args = list(range(BASE, BASE + n))
    table = Table(
        "memory",
        f"Memory: bytes per cached entry and per call in flight ({n:,} of each)",
        ["contender", "bytes", "reference", "x reference"],
    )
    values = Values({a: object() for a in [*args, 0]})
    data: dict[str, float] = {}

    # Per cached entry. wq_memo stores the arguments' tuple as the key (equal to hashkey's),
    # so its reference is the same cache filled with those tuples; the hashkey-filled cache
    # is the reference of the peers that store hashkey keys.
    def reference(s: Setup, hashkeys: bool) -> str:
        keys = "hashkey keys" if hashkeys else "tuple keys"
        name = f"filled by hand, {keys} ({CACHE_NAMES[s.cache]})"
        data[name] = bytes_ = by_hand(s, values, args, hashkeys)
        table.add(f"per entry: {name}", f"{bytes_:,.0f}", "-", "-")
        return name

    refs: dict[tuple[str, bool], str] = {}
    for s in (Setup(cache="dict"), Setup(cache="lru", size=n)):
        refs[s.cache, False] = ref = reference(s, hashkeys=False)
        refs[s.cache, True] = reference(s, hashkeys=True)
        name = f"per entry: {label(WQ_MEMO, s)}"
        got = data[name] = await per_entry(WQ_MEMO.wrap(values.call, s), args)
        table.add(name, f"{got:,.0f}", ref, ratio(got / data[ref]))
        table.figures.append(Figure(f"memory {name}: bytes", got, "B"))
        table.targets.append(Target(f"memory {name} x {ref}", got / data[ref], PER_ENTRY_TARGET))
    for peer in PEERS:
        cachetools_based = peer.module in ("asyncache", "cachetools_async")
        s = Setup(cache="lru", size=n) if cachetools_based else Setup(cache="dict")
        name = f"per entry: {label(peer, s)}"
        if (status := peer.status()) is not None:
            table.add(name, status, "-", "-")
            continue
        got = data[name] = await per_entry(peer.wrap(values.call, s), args)
        ref = refs[s.cache, cachetools_based]
        table.add(name, f"{got:,.0f}", ref, ratio(got / data[ref]))

    # Per call in flight.
    v = _fresh_gate(values)
    bare = data["in flight: bare call"] = await per_call_in_flight(v.held, v, args)
    table.add("in flight: bare call, no memoizer", f"{bare:,.0f}", "-", "-")
    table.figures.append(Figure("memory in flight: bare call: bytes", bare, "B", "bare call"))
    rows: list[tuple[str, Contender, Setup]] = [
        (f"in flight: wq_memo (maxsize={n:,}, all running)", WQ_MEMO, Setup(maxsize=n)),
        ("in flight: wq_memo (maxsize=3, the rest waiting)", WQ_MEMO, Setup(maxsize=3)),
        *[(f"in flight: {p.name}", p, Setup()) for p in PEERS],
    ]
    for name, contender, s in rows:
        if (status := contender.status()) is not None:
            table.add(name, status, "-", "-")
            continue
        v = _fresh_gate(values)
        got = data[name] = await per_call_in_flight(contender.wrap(v.held, s), v, args)
        table.add(name, f"{got:,.0f}", "bare call", ratio(got / bare))
        what = f"memory {name} x bare call"
        if contender is WQ_MEMO:
            table.figures.append(Figure(f"memory {name}: bytes", got, "B"))
            table.targets.append(Target(what, got / bare, IN_FLIGHT_TARGET))
        else:
            table.figures.append(Figure(what, got / bare, "x", contender.name))
    joined = data["in flight: wq_memo, joined callers"] = await per_call_in_flight(
        WQ_MEMO.wrap((v := _fresh_gate(values)).held, Setup()), v, [0] * n
    )
    table.add(
        "in flight: wq_memo, callers joined on one key",
        f"{joined:,.0f}",
        "bare call",
        ratio(joined / bare),
    )
    table.data = {"bytes": data, "entries": n}
    table.notes.append(
        "in flight: each call is a task (as under asyncio.gather) held inside the computation; "
        "the bare call is that task and the computation's coroutine alone, so 'x reference' is "
        "what the memoizer adds to a call while it runs"
    )
    return table


def _fresh_gate(values: Values) -> Values:
    return Values(values.values)
