"""Scenario 1, the hit path: nanoseconds per call on a warm key.

Every contender memoizes the same trivial function and is called in a loop with an argument
already cached (``await f(1)``; the loop's own cost is in every figure alike). wq_memo runs over
a dict, an LRUCache and a TTLCache, each next to the hand-written reference over the same kind
of cache and next to async-lru configured alike; over the TTLCache also with ``refresh_after``
(its entries fresh, so no refresh runs), to show what refresh-ahead adds to a hit, and with
``ttl`` a function of the result (its entries fresh), to show what a per-entry lifetime adds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from wq_memo import worker_queue

from ._harness import (
    Config,
    Figure,
    Table,
    Target,
    clock,
    gc_paused,
    interleave,
    median,
    ns,
    paired_ratio,
    ratio,
)
from .contenders import (
    ASYNC_LRU,
    PEERS,
    REFERENCE,
    TTL_SECONDS,
    TUPLE_KEY_REFERENCE,
    WQ_MEMO,
    AsyncFn,
    Contender,
    Setup,
    label,
    make_cache,
)

KINDS = (Setup(cache="dict"), Setup(cache="lru"), Setup(cache="ttl"))

VS_ASYNC_LRU: dict[str, float] = {"dict": 0.35, "lru": 0.55, "ttl": 0.7}
"""Targets: wq_memo's hit over each kind of cache, as a ratio to async-lru configured alike."""
VS_HAND_WRITTEN = 1.2
"""Target: wq_memo's hit as a ratio to the hand-written memoizer over the same cache."""


REFRESH_AFTER = TTL_SECONDS / 2
"""refresh_after for the refresh-ahead row: no entry comes due for a refresh during the run."""


def _wq_memo_refresh_after(_: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    return worker_queue(
        maxsize=setup.maxsize, cache=make_cache(setup), refresh_after=REFRESH_AFTER
    )(fn)


WQ_MEMO_REFRESH = Contender(
    "wq_memo (TTLCache, refresh_after)", "wq_memo", "wq_memo", True, _wq_memo_refresh_after
)
"""wq_memo over a TTLCache with refresh-ahead on; its row stands beside wq_memo (TTLCache)."""


VS_PLAIN_TTL_CACHE = 1.3
"""Target: a hit with ``ttl`` a function, as a ratio to a plain TTLCache hit (issue 20)."""


def _wq_memo_ttl_function(_: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    return worker_queue(
        maxsize=setup.maxsize, cache=make_cache(setup), ttl=lambda result: TTL_SECONDS
    )(fn)


WQ_MEMO_TTL_FUNCTION = Contender(
    "wq_memo (TTLCache, ttl function)", "wq_memo", "wq_memo", True, _wq_memo_ttl_function
)
"""wq_memo over a TTLCache with a per-entry ttl function; its row stands beside the plain one."""


async def compute(x: int) -> int:
    return x


async def time_hits(f: AsyncFn, n: int, arg: int = 1) -> float:
    """Seconds per call over n calls of f(arg)."""
    with gc_paused():
        start = clock()
        for _ in itertools.repeat(None, n):
            await f(arg)
        return (clock() - start) / n


async def calibrated(f: AsyncFn, batch_seconds: float) -> int:
    """How many calls make a batch of about batch_seconds (f already warm)."""
    per_call = await time_hits(f, 200)
    return max(200, int(batch_seconds / per_call))


@dataclass(frozen=True)
class Row:
    name: str
    contender: Contender
    setup: Setup
    reference: str
    """The row of the hand-written reference over the same kind of cache."""
    tuple_key: str
    """The row of the hand-written reference keyed by the arguments' tuple."""
    async_lru: str
    """The row of async-lru configured alike."""


def rows() -> list[Row]:
    out: list[Row] = []

    def row(contender: Contender, s: Setup) -> Row:
        return Row(
            label(contender, s),
            contender,
            s,
            label(REFERENCE, s),
            label(TUPLE_KEY_REFERENCE, s),
            label(ASYNC_LRU, s),
        )

    for s in KINDS:
        out += [row(REFERENCE, s), row(TUPLE_KEY_REFERENCE, s), row(WQ_MEMO, s)]
        if s.cache == "ttl":
            out.append(row(WQ_MEMO_REFRESH, s))
            out.append(row(WQ_MEMO_TTL_FUNCTION, s))
    out += [row(ASYNC_LRU, s) for s in KINDS]
    lru = Setup(cache="lru")
    for peer in PEERS:
        if peer is ASYNC_LRU or peer.name == "aiocache stampede":  # same hit path as aiocache
            continue
        out.append(row(peer, lru if peer.module in ("asyncache", "cachetools_async") else Setup()))
    return out


async def measure(config: Config) -> Table:
    table = Table(
        "hit_path",
        "Hit path: ns per call on a warm key (lower is better)",
        [
            "contender",
            "ns/call",
            "x hand-written (same cache)",
            "x hand-written, tuple key",
            "x async-lru (alike)",
        ],
    )
    all_rows = rows()
    trials = []
    missing: dict[str, str] = {}
    for row in all_rows:
        status = row.contender.status()
        if status is not None:
            missing[row.name] = status
            continue
        f = row.contender.wrap(compute, row.setup)
        await f(1)
        n = await calibrated(f, config.batch_seconds)

        async def trial(f: AsyncFn = f, n: int = n) -> float:
            return await time_hits(f, n)

        trials.append((row.name, trial))
    samples = await interleave(trials, config.rounds)

    medians: dict[str, float] = {}
    for row in all_rows:
        if row.name in missing:
            table.add(row.name, missing[row.name], "-", "-", "-")
            continue
        medians[row.name] = median(samples[row.name])
        vs_ref = paired_ratio(samples, row.name, row.reference)
        vs_alru = (
            ratio(paired_ratio(samples, row.name, row.async_lru))
            if row.async_lru in samples
            else "-"
        )
        vs_tuple = paired_ratio(samples, row.name, row.tuple_key)
        table.add(row.name, ns(medians[row.name]), ratio(vs_ref), ratio(vs_tuple), vs_alru)
        if row.contender is WQ_MEMO:
            what = f"hit, {row.name}"
            table.figures.append(Figure(f"{what}: ns/call", medians[row.name] * 1e9, "ns"))
            table.figures.append(Figure(f"{what} x {row.tuple_key}", vs_tuple, "x"))
            table.targets.append(Target(f"{what} x {row.reference}", vs_ref, VS_HAND_WRITTEN))
            if row.async_lru in samples:
                table.targets.append(
                    Target(
                        f"{what} x {row.async_lru}",
                        paired_ratio(samples, row.name, row.async_lru),
                        VS_ASYNC_LRU[row.setup.cache],
                    )
                )
        elif row.contender is WQ_MEMO_REFRESH:
            _refresh_after_cost(table, samples, row)
        elif row.contender is WQ_MEMO_TTL_FUNCTION:
            _ttl_function_cost(table, samples, row)
        elif row.contender is ASYNC_LRU:
            table.figures.append(
                Figure(f"hit, {row.name}: ns/call", medians[row.name] * 1e9, "ns", ASYNC_LRU.name)
            )
        elif row.contender in PEERS and row.async_lru in samples:
            vs = paired_ratio(samples, row.name, row.async_lru)
            table.figures.append(
                Figure(f"hit, {row.name} x {row.async_lru}", vs, "x", row.contender.name)
            )
    table.data = {"median_seconds_per_call": medians, "rounds": config.rounds}
    table.notes.append(
        "each figure includes the `for` loop and the `await f(1)` itself; the hand-written "
        "reference is `async def` + `hashkey(*args, **kwargs)` + `try: return cache[k]`"
    )
    table.notes.append(
        "the tuple-key reference keys the cache by the arguments' tuple, which equals "
        "hashkey(*args) and hashes alike; wq_memo does the same with its default key"
    )
    table.notes.append(
        "aiocache's cached_stampede has the same hit path as its cached, so it is left out here"
    )
    return table


def _refresh_after_cost(table: Table, samples: dict[str, list[float]], row: Row) -> None:
    """What refresh_after adds to a hit (entries fresh): ns more, and the ratio, per round."""
    plain = label(WQ_MEMO, row.setup)
    if plain not in samples:
        return
    vs = paired_ratio(samples, row.name, plain)
    more = median([a - b for a, b in zip(samples[row.name], samples[plain], strict=True)])
    table.figures.append(Figure(f"hit, {row.name}: ns/call", median(samples[row.name]) * 1e9, "ns"))
    table.figures.append(Figure(f"hit, {row.name} x {plain}", vs, "x"))
    table.figures.append(Figure(f"hit, {row.name}: ns more than {plain}", more * 1e9, "ns"))
    table.notes.append(
        f"{row.name}: refresh_after={REFRESH_AFTER:g} s, so every entry stays fresh and no "
        f"refresh runs; {ratio(vs)} {plain} in the same rounds, {ns(more)} ns more per hit "
        "(medians over rounds)"
    )


def _ttl_function_cost(table: Table, samples: dict[str, list[float]], row: Row) -> None:
    """What a ttl function adds to a hit (entries fresh), against the target of at most 1.3x a
    plain TTLCache hit, paired per round."""
    plain = label(WQ_MEMO, row.setup)
    if plain not in samples:
        return
    vs = paired_ratio(samples, row.name, plain)
    table.figures.append(Figure(f"hit, {row.name}: ns/call", median(samples[row.name]) * 1e9, "ns"))
    table.targets.append(Target(f"hit, {row.name} x {plain}", vs, VS_PLAIN_TTL_CACHE))
    table.notes.append(
        f"{row.name}: ttl=lambda result: {TTL_SECONDS:g}, entries fresh; the TTLCache holds "
        f"wq_memo's dated entries and the hit reads their expiry too: {ratio(vs)} {plain} in "
        "the same rounds (median over rounds)"
    )
