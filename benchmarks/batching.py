"""Batch loading on an N+1 workload: wq_memo's worker_queue.batch beside the loaders people use.

    python -m benchmarks.batching [--quick]

1,000 concurrent requests each need 20 of 500 users (drawn with a fixed seed); the backend
answers one call for a list of ids after a fixed latency plus a little per id. Every contender
starts cold each round and serves the same requests; the table gives the backend calls, the ids
fetched (an id fetched twice counts twice) and the wall time of the whole burst (the median over
the rounds, interleaved), with each time's ratio to wq_memo's.

- wq_memo batch: ``@worker_queue.batch(cache=LRUCache(10_000))``, defaults otherwise
  (maxsize=3 batches at once, max_batch=100, max_wait=0), shared by every request.
- aiodataloader, per request (as its documentation advises: a loader per request) and shared.
- strawberry DataLoader, per request (as its documentation advises: in the request's context).
- aiocache multi_cached: a SimpleMemoryCache in front of the backend, the ids as one argument.
- wq_memo per key: ``@worker_queue(maxsize=100)`` on a one-id backend call (the N+1 itself).

This script installs nothing: a peer that is not installed gets a row saying so.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import cachetools

from wq_memo import worker_queue

Request = Callable[[list[int]], Awaitable[list[str]]]
"""Serves one request: the users of its ids, in order."""


@dataclass(frozen=True)
class Work:
    requests: int
    per_request: int
    users: int
    latency: float
    per_id: float
    rounds: int

    @classmethod
    def of(cls, quick: bool) -> Work:
        if quick:
            return cls(
                requests=100, per_request=20, users=100, latency=0.002, per_id=2e-6, rounds=1
            )
        return cls(requests=1000, per_request=20, users=500, latency=0.005, per_id=2e-5, rounds=5)


class Backend:
    """The database: one call for many ids costs a fixed latency plus a little per id."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.calls = 0
        self.ids = 0

    async def fetch(self, ids: list[int]) -> dict[int, str]:
        self.calls += 1
        self.ids += len(ids)
        await asyncio.sleep(self.work.latency + self.work.per_id * len(ids))
        return {i: f"user{i}" for i in ids}


@dataclass
class Row:
    name: str
    make: Callable[[Backend], Request] | None
    note: str = ""
    times: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


def _wq_memo_batch(backend: Backend) -> Request:
    @worker_queue.batch(cache=cachetools.LRUCache(10_000))
    async def load(ids: list[int]) -> Mapping[int, str]:
        return await backend.fetch(ids)

    return load.many


def _wq_memo_per_key(backend: Backend) -> Request:
    @worker_queue(maxsize=100, cache=cachetools.LRUCache(10_000))
    async def load(i: int) -> str:
        return (await backend.fetch([i]))[i]

    async def request(ids: list[int]) -> list[str]:
        return list(await asyncio.gather(*(load(i) for i in ids)))

    return request


def _aiodataloader(shared: bool) -> Callable[[Backend], Request] | None:
    try:
        from aiodataloader import DataLoader
    except ImportError:
        return None

    def make(backend: Backend) -> Request:
        async def batch_load(ids: list[int]) -> list[str]:
            found = await backend.fetch(ids)
            return [found[i] for i in ids]

        one = DataLoader(batch_load) if shared else None

        async def request(ids: list[int]) -> list[str]:
            loader = one if one is not None else DataLoader(batch_load)
            return list(await loader.load_many(ids))

        return request

    return make


def _strawberry() -> Callable[[Backend], Request] | None:
    try:
        from strawberry.dataloader import DataLoader
    except ImportError:
        return None

    def make(backend: Backend) -> Request:
        async def load(ids: list[int]) -> list[str]:
            found = await backend.fetch(ids)
            return [found[i] for i in ids]

        async def request(ids: list[int]) -> list[str]:
            loader: Any = DataLoader(load_fn=load)
            return list(await loader.load_many(ids))

        return request

    return make


def _aiocache() -> Callable[[Backend], Request] | None:
    try:
        from aiocache import SimpleMemoryCache, multi_cached
    except ImportError:
        return None

    def make(backend: Backend) -> Request:
        async def fetch_missing(ids: list[int]) -> dict[int, str]:
            return await backend.fetch(ids)

        fetch: Any = multi_cached(keys_from_attr="ids", cache=SimpleMemoryCache)(fetch_missing)

        async def request(ids: list[int]) -> list[str]:
            found = await fetch(ids=ids)
            return [found[i] for i in ids]

        return request

    return make


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _rows() -> list[Row]:
    peers = [
        ("aiodataloader, per request", _aiodataloader(False), "aiodataloader"),
        ("aiodataloader, shared", _aiodataloader(True), "aiodataloader"),
        ("strawberry DataLoader, per request", _strawberry(), "strawberry-graphql"),
        ("aiocache multi_cached", _aiocache(), "aiocache"),
    ]
    rows = [Row(f"wq_memo batch {_version('wq_memo')}", _wq_memo_batch)]
    for name, make, dist in peers:
        note = "" if make is not None else "not installed"
        rows.append(Row(f"{name} {_version(dist) if make else ''}".strip(), make, note))
    rows.append(Row("wq_memo, one @worker_queue call per key", _wq_memo_per_key))
    return rows


async def _round(row: Row, work: Work, requests: list[list[int]]) -> None:
    assert row.make is not None
    backend = Backend(work)
    serve = row.make(backend)
    started = time.perf_counter()
    answers = await asyncio.gather(*(serve(ids) for ids in requests))
    row.times.append(time.perf_counter() - started)
    for ids, users in zip(requests, answers, strict=True):
        assert users == [f"user{i}" for i in ids], row.name
    row.calls.append(backend.calls)
    row.ids.append(backend.ids)


async def measure(quick: bool) -> str:
    """Run the comparison and return it as a printable table."""
    work = Work.of(quick)
    pick = random.Random(19)
    requests = [pick.sample(range(work.users), work.per_request) for _ in range(work.requests)]
    distinct = len({i for ids in requests for i in ids})
    rows = _rows()
    active = [r for r in rows if r.make is not None]
    for n in range(work.rounds):
        for row in active[n % len(active) :] + active[: n % len(active)]:
            await _round(row, work, requests)
    reference = statistics.median(rows[0].times)
    lines = [
        f"Batch loading (N+1): {work.requests} concurrent requests, each {work.per_request} of "
        f"{work.users} users ({distinct} distinct); backend: {work.latency * 1000:g} ms + "
        f"{work.per_id * 1e6:g} us per id; median of {work.rounds} round(s)",
        "",
        "| contender | backend calls | ids fetched | wall time (ms) | time / wq_memo's |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row.make is None:
            lines.append(f"| {row.name} | {row.note} | | | |")
            continue
        wall = statistics.median(row.times)
        lines.append(
            f"| {row.name} | {statistics.median(row.calls):g} | {statistics.median(row.ids):g} "
            f"| {wall * 1000:.1f} | {wall / reference:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(asyncio.run(measure("--quick" in sys.argv[1:])))
