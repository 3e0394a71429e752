"""A burst of requests to a slow service, sent plainly and then through @worker_queue.

Run it with ``python -m wq_memo.demo`` (``--help`` for the knobs). The service takes 50 ms a
call and serves 50 calls at a time. A few thousand requests arrive at once, over a hundred
distinct keys: sent plainly, every request is a call to the service; through
``@worker_queue`` each key is fetched once (at most ``maxsize`` at a time) and every other
request joins that fetch or reads the cache.

Standard library and wq_memo (with its cachetools) only; meant to be read as an example as
much as run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from cachetools import LRUCache

from wq_memo import CacheInfo, worker_queue


class SlowService:
    """A stand-in for a remote service: ``latency`` seconds a call, ``capacity`` calls at once."""

    def __init__(self, latency: float, capacity: int) -> None:
        self.latency = latency
        self.calls = 0
        self._slots = asyncio.Semaphore(capacity)

    async def fetch(self, key: int) -> str:
        async with self._slots:  # more than `capacity` callers queue up here
            self.calls += 1
            await asyncio.sleep(self.latency)
            return f"profile #{key}"


class Progress:
    """A live progress line: redrawn in place on a terminal, a line per quarter otherwise."""

    def __init__(self, label: str, total: int, out: TextIO) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.out = out
        self.live = out.isatty()
        self.start = time.perf_counter()
        self._quarters_shown = 0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        return (
            f"  {self.label:<22} {self.done:>6,}/{self.total:,} requests answered {elapsed:6.2f} s"
        )

    def show(self) -> None:
        if self.live:
            self.out.write("\r" + self.line())
            self.out.flush()
            return
        quarters = 4 * self.done // self.total
        if quarters > self._quarters_shown and quarters < 4:
            self._quarters_shown = quarters
            print(self.line(), file=self.out, flush=True)

    async def keep_showing(self) -> None:
        while True:
            self.show()
            await asyncio.sleep(0.1)

    def finish(self) -> None:
        print(("\r" if self.live else "") + self.line(), file=self.out, flush=True)


@dataclass(frozen=True)
class Run:
    """What one burst cost."""

    label: str
    requests: int
    service_calls: int
    seconds: float


async def burst(
    label: str,
    fetch: Callable[[int], Awaitable[str]],
    service: SlowService,
    keys: Sequence[int],
    out: TextIO,
) -> tuple[Run, list[str]]:
    """Send one request per key, all at once, showing progress; return the cost and answers."""
    progress = Progress(label, len(keys), out)
    calls_before = service.calls

    async def request(key: int) -> str:
        answer = await fetch(key)
        progress.done += 1
        return answer

    ticker = asyncio.create_task(progress.keep_showing())
    try:
        answers = await asyncio.gather(*(request(key) for key in keys))
    finally:
        ticker.cancel()
    progress.finish()
    seconds = time.perf_counter() - progress.start
    return Run(label, len(keys), service.calls - calls_before, seconds), answers


@dataclass(frozen=True)
class Summary:
    """What the demo found, for a caller that wants more than the printed summary."""

    runs: list[Run]
    cache_info: CacheInfo
    same_answers: bool


async def demo(
    requests: int = 3_000,
    distinct: int = 100,
    latency: float = 0.050,
    capacity: int = 50,
    maxsize: int = 20,
    out: TextIO | None = None,
) -> Summary:
    """Run the plain burst, the memoized one, and the memoized one again; print a summary."""
    out = out or sys.stdout
    keys = [i % distinct for i in range(requests)]
    random.Random(7).shuffle(keys)
    print(
        f"A service answering in {latency * 1e3:g} ms, {capacity} calls at a time; "
        f"{requests:,} requests at once over {distinct} distinct keys.",
        file=out,
    )

    service = SlowService(latency, capacity)
    plain, plain_answers = await burst("plain", service.fetch, service, keys, out)

    # The whole change: decorate the function. Each key is fetched once, at most `maxsize`
    # fetches run at once, and the answers stay in the cache (any cachetools cache or dict).
    @worker_queue(maxsize=maxsize, cache=LRUCache(maxsize=distinct))
    async def fetch(key: int) -> str:
        return await service.fetch(key)

    first, answers = await burst("@worker_queue", fetch, service, keys, out)
    again, _ = await burst("@worker_queue, again", fetch, service, keys, out)
    info = fetch.cache_info()
    # Graceful shutdown of the hidden queue (worker_queue.aclose_all() closes every one).
    await fetch.queue.aclose()

    runs = [plain, first, again]
    print(file=out)
    print(f"  {'':<22} {'requests':>9} {'service calls':>14} {'wall time':>10}", file=out)
    for run in runs:
        print(
            f"  {run.label:<22} {run.requests:>9,} {run.service_calls:>14,} {run.seconds:>8.2f} s",
            file=out,
        )
    print(f"\n  fetch.cache_info() = {info}", file=out)
    print(
        f"  over both memoized bursts: {info.misses:,} fetched, {info.joined:,} joined a fetch "
        f"under way, {info.hits:,} answered from the cache",
        file=out,
    )
    same = answers == plain_answers
    print(f"  same answers as the plain run: {'yes' if same else 'NO'}", file=out, flush=True)
    return Summary(runs, info, same)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wq_memo.demo", description=__doc__)
    parser.add_argument("--requests", type=int, default=3_000, help="requests in the burst")
    parser.add_argument("--keys", type=int, default=100, help="distinct keys among them")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the service's latency")
    args = parser.parse_args(argv)
    asyncio.run(demo(args.requests, args.keys, args.latency_ms / 1e3))


if __name__ == "__main__":
    main()
