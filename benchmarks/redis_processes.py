"""Several processes, many callers, thousands of cold keys, one Redis: who computes each key once?

    python -m benchmarks.redis_processes [--quick]     # Redis at $WQ_MEMO_REDIS_URL or 6379/0

Eight processes (four with --quick) each run 200 concurrent callers (100) that go through every
one of 2,000 cold keys (400), each process in an order of its own, so that the processes contend
for the same keys at the same time. A computation awaits 5 ms and counts itself in Redis.
Contenders run one after another, each on fresh keys, in the same processes:

- wq_memo: ``@worker_queue(cache=RedisCache(url), maxsize=callers)``;
- aiocache: ``@cached_stampede(cache=Cache.REDIS, ...)``, its lock-based decorator;
- cashews: ``@cache(ttl=..., lock=True)``, its locking decorator.

Reported per contender: computations (the target is one per key), calls that raised, the mean
time per call (from each call to its result) and the slowest call, and the wall time of the
slowest process. Figures are medians over rounds. A peer that is not installed is shown as
"not installed".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import random
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ._harness import Config, Table, Target

DEFAULT_URL = "redis://127.0.0.1:6379/0"
COMPUTATION = 0.005
CONTENDERS = ("wq_memo RedisCache", "aiocache cached_stampede", "cashews lock=True")
COLUMNS = [
    "contender",
    "computations",
    "per key",
    "calls failed",
    "ms per call",
    "slowest call (s)",
    "wall (s)",
]


@dataclass(frozen=True)
class Sizes:
    processes: int
    callers: int
    keys: int
    rounds: int


def sizes(config: Config) -> Sizes:
    if config.quick:
        return Sizes(4, min(100, config.callers), min(400, config.keys), 1)
    return Sizes(8, 200, 2000, max(1, min(3, config.rounds)))


# -- in each process -------------------------------------------------------------------------

Fn = Callable[[int], Awaitable[str]]


async def _make(name: str, url: str, prefix: str, callers: int, count: Any) -> Any:
    """(memoized function, close) for contender name, or a string saying why there is none."""

    async def compute(key: int) -> str:
        await count()
        await asyncio.sleep(COMPUTATION)
        return f"v{key}"

    if name.startswith("wq_memo"):
        from wq_memo import worker_queue
        from wq_memo.backends.redis import RedisCache

        cache = RedisCache(url, namespace=f"{prefix}_wq")
        memoized = worker_queue(cache=cache, maxsize=callers, name="compute")(compute)

        async def close_wq() -> None:
            await memoized.queue.aclose()
            await cache.aclose()

        return memoized, close_wq
    if name.startswith("aiocache"):
        try:
            from aiocache import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
                Cache,
                cached_stampede,
            )
        except ImportError:
            return "not installed (pip install 'aiocache[redis]')"
        from redis.asyncio.connection import parse_url

        where = parse_url(url)
        memo = cached_stampede(
            cache=Cache.REDIS,
            namespace=f"{prefix}_aiocache:",
            endpoint=where.get("host", "127.0.0.1"),
            port=where.get("port", 6379),
            db=where.get("db", 0),
            password=where.get("password"),
        )
        stampede = memo(compute)

        async def close_aiocache() -> None:
            if memo.cache is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    await memo.cache.close()

        return stampede, close_aiocache
    try:
        import cashews
    except ImportError:
        return "not installed (pip install 'cashews[redis]')"
    cashews_cache = cashews.Cache()
    cashews_cache.setup(url)
    locked = cashews_cache(ttl="1h", prefix=f"{prefix}_cashews", lock=True)(compute)

    async def close_cashews() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            await cashews_cache.close()

    return locked, close_cashews


async def _run(name: str, url: str, prefix: str, n: Sizes, seed: int) -> dict[str, Any]:
    from redis.asyncio import Redis

    counter = Redis.from_url(url)
    made = await _make(
        name, url, prefix, n.callers, partial(counter.incr, f"{prefix}_computations")
    )
    if isinstance(made, str):
        await counter.aclose()
        return {"missing": made}
    fn, close = made
    order = list(range(n.keys))
    random.Random(seed).shuffle(order)
    failed = wrong = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def caller(share: list[int]) -> None:
        nonlocal failed, wrong
        for key in share:
            started = time.perf_counter()
            try:
                value = await fn(key)
            except Exception as exc:
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            else:
                wrong += value != f"v{key}"
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(caller(order[c :: n.callers]) for c in range(n.callers)))
    finally:
        wall = time.perf_counter() - started
        await close()
        await counter.aclose()
    return {
        "failed": failed,
        "wrong": wrong,
        "errors": errors,
        "mean": statistics.fmean(latencies),
        "slowest": max(latencies),
        "wall": wall,
    }


def process(url: str, n: Sizes, seed: int, plan: list[tuple[str, str, Any]], reports: Any) -> None:
    """One process of the benchmark: per (contender, prefix, start event) of the plan, wait for
    the start, run the contender, report."""
    warnings.simplefilter("ignore", DeprecationWarning)  # the peers' use of redis-py
    # The peers log a traceback for each Redis failure they swallow (thousands here, for
    # aiocache); the calls that fail are counted instead.
    for peer in ("aiocache", "cashews"):
        logging.getLogger(peer).setLevel(logging.CRITICAL + 1)
    reports.put(("ready", os.getpid(), None))
    for name, prefix, start in plan:
        if not start.wait(300):
            reports.put(("gave up", os.getpid(), name))
            return
        try:
            report = asyncio.run(_run(name, url, prefix, n, seed))
        except Exception as exc:
            report = {"crashed": f"{type(exc).__name__}: {exc}"}
        reports.put((name, os.getpid(), report))


# -- in the benchmark's own process ----------------------------------------------------------


def _skipped(why: str) -> Table:
    table = Table("redis_processes", "Several processes through one Redis", COLUMNS)
    for name in CONTENDERS:
        table.add(name, *["-"] * (len(COLUMNS) - 2), why)
    table.notes.append(f"skipped: {why}")
    return table


async def _reachable(url: str) -> str | None:
    try:
        from redis.asyncio import Redis
    except ImportError:
        return "no redis package (pip install 'wq_memo[redis]')"
    client = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:
        return f"no Redis at {url} ({type(exc).__name__})"
    finally:
        await client.aclose()
    return None


async def _cleanup(url: str, prefixes: list[str]) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        for prefix in prefixes:
            names = [name async for name in client.scan_iter(match=f"{prefix}*", count=1000)]
            for i in range(0, len(names), 1000):
                await client.delete(*names[i : i + 1000])
    finally:
        await client.aclose()


async def _computations(url: str, prefix: str) -> int:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        return int(await client.get(f"{prefix}_computations") or 0)
    finally:
        await client.aclose()


def _collect(reports: Any, kind: str, count: int, procs: list[Any], seconds: float) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while len(got) < count:
        try:
            message = reports.get(timeout=0.2)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"benchmark processes: {dead or 'too slow'} ({kind})") from None
            continue
        if message[0] != kind:
            raise RuntimeError(f"benchmark processes: expected {kind!r}, got {message!r}")
        got.append(message[2])
    return got


async def measure(config: Config) -> Table:
    """Run the scenario and return its table (every contender in the same processes)."""
    url = os.environ.get("WQ_MEMO_REDIS_URL") or DEFAULT_URL
    problem = await _reachable(url)
    if problem is not None:
        return _skipped(problem)
    n = sizes(config)
    run_id = uuid.uuid4().hex[:10]
    rounds = [
        [(name, f"wq_memo_bench_procs_{run_id}_{r}_{i}") for i, name in enumerate(CONTENDERS)]
        for r in range(n.rounds)
    ]
    for r, order in enumerate(rounds):  # rotate the order from round to round
        rounds[r] = order[r % len(order) :] + order[: r % len(order)]
    ctx = multiprocessing.get_context("spawn")
    reports: Any = ctx.Queue()
    starts = [[ctx.Event() for _ in order] for order in rounds]
    plan = [
        (name, prefix, starts[r][i])
        for r, round_plan in enumerate(rounds)
        for i, (name, prefix) in enumerate(round_plan)
    ]
    procs = [
        ctx.Process(target=process, args=(url, n, seed, plan, reports), daemon=True)
        for seed in range(n.processes)
    ]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    missing: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    try:
        for proc in procs:
            proc.start()
        await loop.run_in_executor(None, _collect, reports, "ready", n.processes, procs, 120)
        for r, round_plan in enumerate(rounds):
            for i, (name, prefix) in enumerate(round_plan):
                starts[r][i].set()
                got = await loop.run_in_executor(
                    None, _collect, reports, name, n.processes, procs, 300
                )
                if any("missing" in g for g in got):
                    missing[name] = got[0]["missing"]
                    continue
                crashed = [g["crashed"] for g in got if "crashed" in g]
                if crashed:
                    raise RuntimeError(f"{name} crashed in a benchmark process: {crashed[0]}")
                results[name].append(
                    {
                        "computations": await _computations(url, prefix),
                        "failed": sum(g["failed"] + g["wrong"] for g in got),
                        "errors": _merge(g["errors"] for g in got),
                        "mean": statistics.fmean(g["mean"] for g in got),
                        "slowest": max(g["slowest"] for g in got),
                        "wall": max(g["wall"] for g in got),
                    }
                )
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        reports.close()
        reports.join_thread()
        await _cleanup(url, [prefix for round_plan in rounds for _, prefix in round_plan])
    return _table(n, results, missing)


def _merge(counts: Any) -> dict[str, int]:
    merged: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            merged[k] = merged.get(k, 0) + v
    return merged


def _table(n: Sizes, results: dict[str, list[dict[str, Any]]], missing: dict[str, str]) -> Table:
    title = (
        f"{n.processes} processes x {n.callers} callers over {n.keys:,} cold keys, one Redis "
        f"(computation {COMPUTATION * 1000:g} ms; median of {n.rounds} round(s))"
    )
    table = Table("redis_processes", title, COLUMNS)
    medians: dict[str, dict[str, float]] = {}
    for name in CONTENDERS:
        runs = results[name]
        if name in missing or not runs:
            table.add(name, *["-"] * (len(COLUMNS) - 2), missing.get(name, "not run"))
            continue
        m = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k != "errors"}
        medians[name] = m
        errors = _merge(run["errors"] for run in runs)
        failed = f"{m['failed']:,.0f}" + (f" ({', '.join(sorted(errors))})" if errors else "")
        table.add(
            name,
            f"{m['computations']:,.0f}",
            f"{m['computations'] / n.keys:.2f}",
            failed,
            f"{m['mean'] * 1000:.2f}",
            f"{m['slowest']:.2f}",
            f"{m['wall']:.2f}",
        )
    table.data = {"sizes": n.__dict__, "medians": medians, "missing": missing}
    table.notes.append(
        "calls failed: calls that raised (the peers also log, and swallow, failures of their "
        "own Redis operations; those logs are silenced here)"
    )
    wq = medians.get(CONTENDERS[0])
    if wq is not None:
        table.targets.append(
            Target(
                "Redis, processes: computations per key (wq_memo)", wq["computations"] / n.keys, 1.0
            )
        )
        table.notes.append(
            "every key computed once: "
            + ("yes" if wq["computations"] == n.keys and not wq["failed"] else "NO")
        )
        lock = medians.get(CONTENDERS[2])
        if lock is not None:
            table.targets.append(
                Target(
                    "Redis, processes: time per call, wq_memo / cashews lock=True",
                    wq["mean"] / lock["mean"],
                    1.0,
                )
            )
    return table


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = Config.quick_run() if "--quick" in args else Config.full()
    started = time.perf_counter()
    table = asyncio.run(measure(config))
    print(table.render())
    print(f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
