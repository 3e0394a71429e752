"""Scenario 4, head-of-line blocking: one slow item must not hold up the quick ones behind it.

wq_memo with maxsize=3 gets one item taking ``hol_slow`` seconds (1 s), then twelve taking
``hol_fast`` (10 ms) each. The slow item holds one slot; the twelve share the other two, so they
should be done after about six rounds of 10 ms. The peers do not bound their computations: they
run all thirteen at once, and the table says so.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ._harness import Config, Table, Target, clock, median
from .contenders import PEERS, WQ_MEMO, Contender, Setup

MAXSIZE = 3
QUICK_ITEMS = 12


@dataclass
class SlowAndQuick:
    """Key 0 takes ``slow`` seconds, every other key ``fast``; counts what runs at once."""

    slow: float
    fast: float
    active: int = 0
    peak: int = 0

    async def call(self, x: int) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.slow if x == 0 else self.fast)
        finally:
            self.active -= 1
        return x


async def head_of_line(config: Config) -> Table:
    table = Table(
        "head_of_line",
        f"Head-of-line: one {config.hol_slow:g} s item, then twelve {config.hol_fast * 1e3:g} ms "
        f"items (wq_memo maxsize={MAXSIZE})",
        ["contender", "twelve done after (s)", "most at once"],
    )
    contenders: list[Contender] = [WQ_MEMO, *PEERS]
    missing = {c.name: s for c in contenders if (s := c.status()) is not None}
    times: dict[str, list[float]] = {c.name: [] for c in contenders if c.name not in missing}
    peaks: dict[str, int] = {}
    slow_items: list[asyncio.Task[int]] = []
    # The slow items of earlier trials keep sleeping in the background while later trials
    # run (each trial has a fresh function, so they take no slot from it); all are awaited at
    # the end.
    for r in range(config.rounds):
        for c in contenders:
            if c.name in missing or (r > 0 and c is not WQ_MEMO):
                continue  # the peers finish at once; one round of them says it all
            service = SlowAndQuick(config.hol_slow, config.hol_fast)
            f = c.wrap(service.call, Setup(cache="dict", maxsize=MAXSIZE))
            start = clock()
            slow_items.append(asyncio.ensure_future(f(0)))
            await asyncio.sleep(0)  # the slow item starts first
            done = await asyncio.gather(*[f(i) for i in range(1, QUICK_ITEMS + 1)])
            times[c.name].append(clock() - start)
            peaks[c.name] = max(peaks.get(c.name, 0), service.peak)
            if done != list(range(1, QUICK_ITEMS + 1)):
                raise AssertionError(f"{c.name} returned wrong results")
    await asyncio.gather(*slow_items)
    for c in contenders:
        if c.name in missing:
            table.add(c.name, missing[c.name], "-")
        else:
            table.add(c.name, f"{median(times[c.name]):.3f}", peaks[c.name])
    table.data = {
        "median_seconds": {k: median(v) for k, v in times.items()},
        "peak_concurrency": peaks,
    }
    limit = 0.1 * config.hol_fast / 0.010
    table.targets.append(
        Target("head-of-line, twelve quick items done", median(times[WQ_MEMO.name]), limit, "s")
    )
    table.notes.append(
        f"wq_memo: median of {config.rounds} rounds, at most {MAXSIZE} computations at once; "
        "the peers run every computation at once (no bound), so they are never blocked "
        "and never limit the load on what they call"
    )
    return table
