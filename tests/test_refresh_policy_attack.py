"""Refresh-ahead with the per-result policy under invalidations, primes and edge lifetimes: what
a refresh that an invalidation or a prime overtook leaves behind (nothing: not its due time, not
a warning that a value is served), and the due times of lifetimes at the edges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import cachetools
import pytest
from _policy_harness import Clock, Source, bounded, settle

from wq_memo import CachedError, worker_queue
from wq_memo.backends import MISSING

CACHES: dict[str, Any] = {
    "dict": lambda clock: {},
    "lru": lambda clock: cachetools.LRUCache(100),
    "ttl": lambda clock: cachetools.TTLCache(100, ttl=100, timer=clock),
}

OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "cache_if": {"cache_if": lambda r: True},
    "ttl": {"ttl": 70},
    "ttl_function": {"ttl": lambda r: 70.0},
    "cache_errors": {"ttl": 70, "cache_errors": {OSError: 5.0}},
}


def memoized(kind: str, source: Source, clock: Clock, **options: Any) -> Any:
    return worker_queue(cache=CACHES[kind](clock), timer=clock, refresh_after=30, **options)(source)


def due(f: Any) -> dict[Any, float]:
    """The due times a memoized function keeps (internal)."""
    times: dict[Any, float] = f._refresher.due
    return dict(times)


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("kind", sorted(CACHES))
@pytest.mark.parametrize("how", ["prime", "invalidate"])
async def test_a_refresh_overtaken_by_a_prime_or_an_invalidation_leaves_no_due_time_when_it_fails(
    kind: str, option: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock, source = Clock(), Source()
    f = memoized(kind, source, clock, **OPTIONS[option])
    assert await f("k") == "k@0"
    clock.now = 30
    source.gate = asyncio.Event()
    source.started.clear()
    source.failures = {"k": OSError("down")}
    assert await f("k") == "k@0"  # due: refreshed in the background, held by the gate
    await bounded(source.started.wait())
    # 30 s after its write; 70 x 30 / 100 with a ttl function under a TTLCache's ttl of 100
    after = 21.0 if (kind, option) == ("ttl", "ttl_function") else 30.0
    if how == "prime":
        f.cache_prime("primed", "k")
        assert due(f) == {("k",): 30 + after}
    else:
        assert f.cache_invalidate("k") is True
        assert due(f) == {}
    replaced = due(f)
    source.gate.set()
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        await settle()
    # The overtaken refresh's failure moves nothing: the new entry is refreshed when it is due,
    # not refresh_backoff after that failure, and no "cached value is served" is claimed.
    assert due(f) == replaced
    assert not [r for r in caplog.records if "refreshing" in r.getMessage()]
    assert f.cache_info().refresh_failures == 1
    source.failures = {}
    if how == "invalidate":
        assert await bounded(f("k")) == "k@2"
        assert due(f) == {("k",): 30 + after}
    clock.now = 31
    assert await f("k") in ("primed", "k@2")
    await settle()
    assert len(source.calls) == (2 if how == "prime" else 3)  # not refreshed before it is due


# -- random interleavings -------------------------------------------------------------------------


class Boom(Exception):
    """A failure cache_errors remembers (and stale_if_error falls back from)."""


class Interleaving:
    """A source whose computations each wait for a gate of their own, opened in random order;
    each result says which computation it is and the epoch (invalidations and primes so far)
    when it started. Primes are labelled by the epoch they begin."""

    def __init__(self) -> None:
        self.epoch = 0
        self.started: dict[int, int] = {}
        self.gates: list[asyncio.Event] = []
        self.failing = False
        self.open = False

    async def __call__(self, key: str) -> tuple[str, int, int]:
        n = len(self.started) + 1
        self.started[n] = self.epoch
        gate = asyncio.Event()
        self.gates.append(gate)
        if not self.open:
            await gate.wait()
        if self.failing:
            raise Boom(n)
        return ("computed", n, self.started[n])


@pytest.mark.parametrize("seed", range(300))
async def test_invalidations_and_primes_win_over_refreshes_in_random_interleavings(
    seed: int,
) -> None:
    # Calls, gates opening, invalidations, primes, the clock moving (backwards too) and the
    # source failing, in a random order: every value served or kept comes from a computation
    # that started after the last invalidation or prime before the call (or is that prime), and
    # so does every remembered error.
    rnd = random.Random(seed)
    clock, source = Clock(), Interleaving()
    kind = rnd.choice(sorted(CACHES))
    lifetimes = [5.0, 20.0, 60.0, None]
    options: dict[str, Any] = {
        "ttl": rnd.choice([50, lambda r: rnd.choice(lifetimes)]),
        "cache_if": lambda r: rnd.random() < 0.8,
        "cache_errors": {Boom: 3.0},
        "refresh_after": rnd.choice([2, 10, 30]),
        "jitter": rnd.choice([0, 0.5]),
        "maxsize": rnd.choice([1, 2, 100]),
    }
    if kind != "ttl" and rnd.random() < 0.6:
        options["stale_if_error"] = 20
    f = worker_queue(cache=CACHES[kind](clock), timer=clock, **options)(source)
    calls: list[tuple[int, asyncio.Future[Any]]] = []

    def check(epoch: int, got: tuple[str, int, int]) -> None:
        assert got[2] >= epoch, (seed, epoch, got)

    async with asyncio.timeout(10):
        for _ in range(120):
            step = rnd.random()
            if step < 0.35:
                calls.append((source.epoch, asyncio.ensure_future(f("k"))))
            elif step < 0.55 and source.gates:
                source.gates.pop(rnd.randrange(len(source.gates))).set()
            elif step < 0.65:
                f.cache_invalidate("k")
                source.epoch += 1
            elif step < 0.7:
                source.epoch += 1
                f.cache_prime(("primed", 0, source.epoch), "k")
            elif step < 0.85:
                clock.now += rnd.choice([0.5, 1, 3, 10, 25, -5, -30])  # backwards too
            else:
                source.failing = not source.failing
            await settle()
            for epoch, call in [c for c in calls if c[1].done()]:
                calls.remove((epoch, call))
                if call.exception() is None:
                    check(epoch, call.result())
            kept = f.cache_peek("k")
            if isinstance(kept, CachedError):
                assert source.started[kept.args[0]] == source.epoch, (seed, kept)
            elif kept is not MISSING:
                assert kept[2] == source.epoch, (seed, kept)
        source.failing, source.open = False, True
        for gate in source.gates:
            gate.set()
        for _, call in calls:
            with contextlib.suppress(Boom):
                await call
    info = f.cache_info()
    assert info.refresh_failures <= info.refreshes
