"""A TTLCache lookup: ``cache[k]`` against wq_memo's fast_lookup, ns per lookup.

No event loop and no memoizer: one key in a TTLCache, looked up again and again, by
``cache[k]`` (a miss caught as KeyError) and by the function that ``fast_lookup(cache)`` returns
(a miss returned as MISSING). The cachetools version is part of every figure's name, since
the lookup reads its internals: run it under each version to compare.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from typing import Any

import cachetools

from wq_memo._ttl_lookup import fast_lookup

from ._harness import Config, Figure, Table, clock, gc_paused, interleave, median, ns, paired_ratio

Lookup = Callable[[Hashable], Any]


def time_subscript(cache: cachetools.TTLCache[Any, Any], key: Hashable, n: int) -> float:
    """Seconds per ``cache[key]`` over n of them, inline as in the decorator's hit path."""
    with gc_paused():
        start = clock()
        for _ in itertools.repeat(None, n):
            try:
                value = cache[key]
            except KeyError:
                value = None
        del value
        return (clock() - start) / n


def time_lookups(lookup: Lookup, key: Hashable, n: int) -> float:
    """Seconds per ``lookup(key)`` over n of them."""
    with gc_paused():
        start = clock()
        for _ in itertools.repeat(None, n):
            lookup(key)
        return (clock() - start) / n


async def ttl_lookup(config: Config) -> Table:
    version = cachetools.__version__
    table = Table(
        "ttl_lookup",
        f"TTLCache lookups: ns per lookup, cachetools {version} (no event loop, no memoizer)",
        ["lookup", "hit ns", "x cache[k]", "miss ns", "x cache[k] (miss)"],
    )
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(maxsize=1024, ttl=3600)
    for i in range(512):
        cache[(i,)] = i
    hit, miss = (1,), (-1,)
    fast = fast_lookup(cache)
    names = ["cache[k]"]
    if fast is not None:
        names.append("fast_lookup")
    else:
        table.notes.append(f"fast_lookup does not recognise cachetools {version}'s TTLCache")
    n = 20_000 if config.quick else 200_000
    trials = []
    for kind, key in (("hit", hit), ("miss", miss)):

        async def subscript(key: Hashable = key) -> float:
            return time_subscript(cache, key, n)

        trials.append((f"cache[k] {kind}", subscript))
        if fast is not None:

            async def call(key: Hashable = key, lookup: Lookup = fast) -> float:
                return time_lookups(lookup, key, n)

            trials.append((f"fast_lookup {kind}", call))
    samples = await interleave(trials, config.rounds)
    for name in names:
        cells = [name]
        for kind in ("hit", "miss"):
            label = f"{name} {kind}"
            vs = paired_ratio(samples, label, f"cache[k] {kind}")
            cells += [ns(median(samples[label])), f"{vs:.2f}x"]
            what = f"TTLCache {kind}, cachetools {version}, {name}"
            table.figures.append(Figure(f"{what}: ns", median(samples[label]) * 1e9, "ns"))
            if name != "cache[k]":
                table.figures.append(Figure(f"{what} x cache[k]", vs, "x"))
        table.add(*cells)
    table.data = {
        "cachetools": version,
        "recognised": fast is not None,
        "median_seconds": {k: median(v) for k, v in samples.items()},
    }
    table.notes.append(
        "cache[k] runs inline in the loop, inside try/except KeyError, as in the decorator's hit "
        "path; fast_lookup is one call of the function it returns; both include the loop"
    )
    return table
