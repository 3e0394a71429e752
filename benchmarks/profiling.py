"""python -m benchmarks.profiling {hit,stampede,miss} [--rows N]: where wq_memo's time goes.

Runs one scenario's wq_memo side under cProfile (garbage collection paused, as in the timed
runs) and prints the functions that spend the most time themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
from collections.abc import Callable, Coroutine
from typing import Any

from wq_memo import worker_queue

from .bursts import MISS_MAXSIZE, STAMPEDE_DELAY

ROUNDS = 5
N = 10_000


async def _one_ms(x: int) -> int:
    await asyncio.sleep(STAMPEDE_DELAY)
    return x


async def _one_turn(x: int) -> int:
    await asyncio.sleep(0)
    return x


async def hit(profiler: cProfile.Profile) -> None:
    @worker_queue(cache={})
    async def f(x: int) -> int:
        return x

    await f(1)
    for _ in range(ROUNDS):
        profiler.enable()
        for _ in range(N * 10):
            await f(1)
        profiler.disable()


async def stampede(profiler: cProfile.Profile) -> None:
    for _ in range(ROUNDS):
        f = worker_queue(cache={})(_one_ms)
        calls = [f(0) for _ in range(N)]
        profiler.enable()
        await asyncio.gather(*calls)
        profiler.disable()


async def miss(profiler: cProfile.Profile) -> None:
    for _ in range(ROUNDS):
        f = worker_queue(maxsize=MISS_MAXSIZE, cache={})(_one_turn)
        calls = [f(i) for i in range(N)]
        profiler.enable()
        await asyncio.gather(*calls)
        profiler.disable()


SCENARIOS: dict[str, Callable[[cProfile.Profile], Coroutine[Any, Any, None]]] = {
    "hit": hit,
    "stampede": stampede,
    "miss": miss,
}


def profile(scenario: str, rows: int = 25) -> str:
    profiler = cProfile.Profile()
    gc.collect()
    gc.disable()
    try:
        asyncio.run(SCENARIOS[scenario](profiler))
    finally:
        gc.enable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    print(profile(args.scenario, args.rows))


if __name__ == "__main__":
    main()
