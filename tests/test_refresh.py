"""Refresh-ahead: stale entries served at once while one background refresh per key runs through
the queue; a failed refresh keeps the old value; jitter; per-call controls."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import sys
from collections.abc import Callable, Hashable
from typing import Any

import cachetools
import cachetools.keys
import pytest
from _queue_harness import MemoryAsyncCache

from wq_memo import CacheInfo, worker_queue
from wq_memo.backends import MISSING, CallKey

WAIT = 5.0


class Clock:
    """A fake clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Source:
    """An async function of a key whose n-th computation returns f"{key}@{n}", optionally held by
    a gate or failing."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.contexts: list[str] = []
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> str:
        n = len(self.calls)
        self.calls.append(key)
        self.contexts.append(request.get())
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return f"{key}@{n}"


request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="-")


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def bounded(awaitable: Any) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


CACHES: dict[str, Callable[[Clock], Any]] = {
    "dict": lambda clock: {},
    "lru": lambda clock: cachetools.LRUCache(100),
    "ttl": lambda clock: cachetools.TTLCache(100, ttl=10, timer=clock),
}


@pytest.fixture(params=sorted(CACHES))
def make(request: pytest.FixtureRequest) -> Callable[..., tuple[Any, Source, Clock]]:
    def build(**options: Any) -> tuple[Any, Source, Clock]:
        clock = Clock()
        source = Source()
        cache = CACHES[request.param](clock)
        f = worker_queue(cache=cache, refresh_after=5, timer=clock, **options)(source)
        return f, source, clock

    return build


async def test_a_stale_entry_is_served_at_once_and_refreshed_in_the_background(
    make: Callable[..., tuple[Any, Source, Clock]],
) -> None:
    f, source, clock = make()
    assert await f("k") == "k@0"
    clock.now = 4.9
    assert await f("k") == "k@0"  # fresh: no refresh
    await settle()
    assert source.calls == ["k"]
    clock.now = 5
    source.gate = asyncio.Event()
    source.started.clear()
    assert await f("k") == "k@0"  # due: the old value at once, a refresh starts
    await bounded(source.started.wait())
    assert source.calls == ["k", "k"]
    for _ in range(3):  # while it runs: the old value at once, no second refresh
        assert await f("k") == "k@0"
    assert source.calls == ["k", "k"]
    source.gate.set()
    await settle()
    assert await f("k") == "k@1"  # its result replaced the entry
    clock.now = 9.9  # and its age was reset
    assert await f("k") == "k@1"
    await settle()
    assert source.calls == ["k", "k"]
    info = f.cache_info()
    assert (info.misses, info.refreshes, info.refresh_failures) == (1, 1, 0)


async def test_a_refresh_runs_in_the_context_of_the_call_that_found_the_entry_due(
    make: Callable[..., tuple[Any, Source, Clock]],
) -> None:
    f, source, clock = make()

    async def as_request(name: str) -> str:
        request.set(name)
        return await f("k")  # type: ignore[no-any-return]

    assert await asyncio.create_task(as_request("first")) == "k@0"
    clock.now = 6
    assert await asyncio.create_task(as_request("second")) == "k@0"
    await settle()
    assert source.contexts == ["first", "second"]


async def test_refreshes_are_bounded_by_maxsize_and_wait_their_turn() -> None:
    clock = Clock()
    source = Source()
    f = worker_queue(maxsize=1, cache={}, refresh_after=5, timer=clock)(source)
    assert [await f(key) for key in ("a", "b", "c")] == ["a@0", "b@1", "c@2"]
    clock.now = 6
    source.gate = asyncio.Event()
    assert [await f(key) for key in ("a", "b", "c")] == ["a@0", "b@1", "c@2"]
    await settle()
    assert source.calls == ["a", "b", "c", "a"]  # one refresh at a time
    assert f.queue.computing == 1
    assert f.queue.waiting == 2
    source.gate.set()
    await settle()
    assert source.calls == ["a", "b", "c", "a", "b", "c"]
    assert [await f(key) for key in ("a", "b", "c")] == ["a@3", "b@4", "c@5"]
    assert f.queue.computing == f.queue.waiting == 0


async def test_a_miss_never_waits_behind_background_refreshes() -> None:
    clock = Clock()
    source = Source()
    cache: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(100, ttl=10, timer=clock)
    f = worker_queue(maxsize=1, cache=cache, refresh_after=1)(source)
    assert [await f("a"), await f("b")] == ["a@0", "b@1"]
    clock.now = 2
    source.gate = asyncio.Event()
    assert [await f("a"), await f("b")] == ["a@0", "b@1"]  # a refreshes, b waits behind it
    await settle()
    assert source.calls == ["a", "b", "a"]
    miss = asyncio.create_task(f("c"))
    await settle()
    assert source.calls == ["a", "b", "a", "c"]  # the miss started at once, beside a's refresh
    assert (f.queue.computing, f.queue.waiting) == (2, 1)  # b's refresh still waits
    source.gate.set()
    assert await bounded(miss) == "c@3"
    await settle()
    assert source.calls == ["a", "b", "a", "c", "b"]


class Gated:
    """An async function of a key held, per key, by a gate until the test opens it."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []

    def gate(self, key: str) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    def began(self, key: str) -> asyncio.Event:
        return self.started.setdefault(key, asyncio.Event())

    async def __call__(self, key: str) -> str:
        self.calls.append(key)
        n = len(self.calls)
        self.began(key).set()
        await self.gate(key).wait()
        return f"{key}@{n}"


async def test_refreshes_under_way_in_every_slot_never_delay_a_later_miss() -> None:
    """Two due keys start two slow refreshes, which fill maxsize=2; a miss arriving after them
    computes at once, and returns while both refreshes are still held."""
    clock = Clock()
    source = Gated()
    f = worker_queue(maxsize=2, cache={}, refresh_after=5, timer=clock)(source)
    for key in ("a", "b", "miss"):
        source.gate(key).set()
    assert [await bounded(f("a")), await bounded(f("b"))] == ["a@1", "b@2"]
    source.gate("a").clear()
    source.gate("b").clear()
    source.began("a").clear()
    source.began("b").clear()
    clock.now = 6
    assert [await f("a"), await f("b")] == ["a@1", "b@2"]  # due: two background refreshes
    await bounded(source.began("a").wait())
    await bounded(source.began("b").wait())
    assert f.queue.computing == 2
    assert await bounded(f("miss")) == "miss@5"  # both refreshes still held
    assert not source.gate("a").is_set()
    assert not source.gate("b").is_set()
    source.gate("a").set()
    source.gate("b").set()
    await settle()
    assert await f("a") == "a@3"
    assert await f("b") == "b@4"
    assert f.cache_info().refreshes == 2


async def test_refreshes_take_only_slots_nobody_needs_and_stay_within_twice_maxsize() -> None:
    """A refresh starts only while fewer than maxsize computations run and no caller waits: with
    maxsize=1, a refresh in the spare slot and a miss beside it make two; a second miss waits
    for the first (the bound for callers), and a second refresh for both."""
    clock = Clock()
    source = Gated()
    f = worker_queue(maxsize=1, cache={}, refresh_after=5, timer=clock)(source)
    for key in ("a", "b"):
        source.gate(key).set()
        assert await bounded(f(key)) == f"{key}@{len(source.calls)}"
        source.gate(key).clear()
    clock.now = 6
    assert [await f("a"), await f("b")] == ["a@1", "b@2"]  # a refreshes; b's refresh waits
    await bounded(source.began("a").wait())
    first = asyncio.create_task(f("c"))
    await bounded(source.began("c").wait())  # at once, beside a's refresh
    second = asyncio.create_task(f("d"))
    await settle()
    assert source.calls == ["a", "b", "a", "c"]
    assert (f.queue.computing, f.queue.waiting) == (2, 2)  # d waits for c, b's refresh for all
    source.gate("a").set()
    await settle()
    assert source.calls == ["a", "b", "a", "c"]  # a's spare slot is not one for callers
    source.gate("c").set()
    await bounded(source.began("d").wait())
    await settle()
    assert source.calls == ["a", "b", "a", "c", "d"]  # b's refresh waits while d computes
    source.gate("d").set()
    assert await bounded(asyncio.gather(first, second)) == ["c@4", "d@5"]
    await bounded(source.began("b").wait())
    assert source.calls == ["a", "b", "a", "c", "d", "b"]
    source.gate("b").set()
    await settle()
    assert f.queue.computing == f.queue.waiting == 0


async def test_a_caller_that_joins_a_queued_refresh_takes_its_turn_among_callers() -> None:
    clock = Clock()
    source = Source()
    cache: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(100, ttl=3, timer=clock)
    f = worker_queue(maxsize=1, cache=cache, refresh_after=1)(source)
    assert [await f("a"), await f("b")] == ["a@0", "b@1"]
    clock.now = 2
    source.gate = asyncio.Event()
    assert [await f("a"), await f("b")] == ["a@0", "b@1"]  # a refreshes, b's refresh waits
    await settle()
    clock.now = 3  # b expires: its caller joins the refresh still in line
    late_b = asyncio.create_task(f("b"))
    await settle()
    late_c = asyncio.create_task(f("c"))
    await settle()
    source.gate.set()
    assert await bounded(asyncio.gather(late_b, late_c)) == ["b@3", "c@4"]
    assert source.calls == ["a", "b", "a", "b", "c"]


async def test_a_miss_joins_a_refresh_under_way_rather_than_computing_again() -> None:
    clock = Clock()
    source = Source()
    cache: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(10, ttl=6, timer=clock)
    f = worker_queue(cache=cache, refresh_after=5, timer=clock)(source)
    assert await f("k") == "k@0"
    clock.now = 5.5
    source.gate = asyncio.Event()
    source.started.clear()
    assert await f("k") == "k@0"
    await bounded(source.started.wait())
    clock.now = 6  # the entry expires while the refresh runs
    late = asyncio.create_task(f("k"))
    await settle()
    source.gate.set()
    assert await bounded(late) == "k@1"
    assert source.calls == ["k", "k"]
    assert f.cache_info().joined == 1


async def test_a_failed_refresh_keeps_the_old_value_and_is_tried_again_after_the_backoff(
    make: Callable[..., tuple[Any, Source, Clock]], caplog: pytest.LogCaptureFixture
) -> None:
    f, source, clock = make(refresh_backoff=2)
    assert await f("k") == "k@0"
    clock.now = 5
    source.error = OSError("source down")
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await f("k") == "k@0"
        await settle()
    assert source.calls == ["k", "k"]
    [record] = [r for r in caplog.records if r.name == "wq_memo"]
    assert record.levelno == logging.WARNING
    assert "refreshing" in record.getMessage()
    assert isinstance(record.exc_info and record.exc_info[1], OSError)
    clock.now = 6.9  # within the back-off: served, not retried
    assert await f("k") == "k@0"
    await settle()
    assert source.calls == ["k", "k"]
    clock.now = 7  # after it: retried
    source.error = None
    assert await f("k") == "k@0"
    await settle()
    assert await f("k") == "k@2"
    info = f.cache_info()
    assert (info.refreshes, info.refresh_failures) == (2, 1)


async def test_a_failed_refresh_never_outlives_the_ttl() -> None:
    clock = Clock()
    source = Source()
    cache: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(10, ttl=8, timer=clock)
    f = worker_queue(cache=cache, refresh_after=5, timer=clock)(source)
    assert await f("k") == "k@0"
    source.error = OSError("down")
    clock.now = 5
    assert await f("k") == "k@0"
    await settle()
    clock.now = 8  # expired: a miss, whose caller gets the error
    with pytest.raises(OSError, match="down"):
        await bounded(f("k"))


async def test_an_invalidation_during_a_refresh_wins(
    make: Callable[..., tuple[Any, Source, Clock]],
) -> None:
    f, source, clock = make()
    assert await f("k") == "k@0"
    clock.now = 5
    source.gate = asyncio.Event()
    source.started.clear()
    assert await f("k") == "k@0"
    await bounded(source.started.wait())
    assert f.cache_invalidate("k") is True
    source.gate.set()
    await settle()
    assert f.cache_peek("k") is MISSING  # the refresh's result was not stored
    assert await f("k") == "k@2"


async def test_refresh_after_must_be_below_the_ttl() -> None:
    async def g(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="below the cache's ttl=10"):
        worker_queue(cache=cachetools.TTLCache(10, ttl=10), refresh_after=10)(g)
    with pytest.raises(ValueError, match="jitter"):
        worker_queue(cache=cachetools.TTLCache(10, ttl=10), refresh_after=8, jitter=0.3)(g)
    worker_queue(cache=cachetools.TTLCache(10, ttl=10), refresh_after=8, jitter=0.2)(g)
    for bad in (0, -1, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="refresh_after"):
            worker_queue(cache={}, refresh_after=bad)(g)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jitter"):
        worker_queue(cache={}, refresh_after=1, jitter=1)(g)
    with pytest.raises(ValueError, match="needs a cache"):
        worker_queue(cache=None, refresh_after=1)(g)


def test_jitter_spreads_due_times_and_is_deterministic_under_a_seed() -> None:
    def due_times(seed: int) -> list[float]:
        clock = Clock()

        async def g(x: int) -> int:
            return x

        random.seed(seed)
        f = worker_queue(cache={}, refresh_after=10, jitter=0.2, timer=clock)(g)

        async def fill() -> None:
            for x in range(200):
                await f(x)

        asyncio.run(fill())
        return list(_due(f).values())

    first, again, other = due_times(1), due_times(1), due_times(2)
    assert first == again
    assert first != other
    assert all(8 <= d <= 12 for d in first)
    assert max(first) - min(first) > 3  # spread over most of the ±20%


def _due(f: Any) -> dict[Hashable, float]:
    """The due times a memoized function keeps (internal, for the jitter test)."""
    due: dict[Hashable, float] = f._refresher.due
    return due


async def test_refresh_ahead_with_an_async_cache() -> None:
    clock = Clock()
    source = Source()
    f = worker_queue(cache=MemoryAsyncCache(yields=True), refresh_after=5, timer=clock, name="src")(
        source
    )
    assert await f("k") == "k@0"
    clock.now = 5
    assert await f("k") == "k@0"
    await settle()
    assert await f("k") == "k@1"
    assert f.cache_info().refreshes == 1


async def test_with_an_async_cache_calls_during_a_refresh_get_the_entry_at_once() -> None:
    clock = Clock()
    source = Source()
    cache = MemoryAsyncCache(yields=True)
    f = worker_queue(cache=cache, refresh_after=5, timer=clock, name="src")(source)
    assert await f("k") == "k@0"
    clock.now = 5
    source.gate = asyncio.Event()
    source.started.clear()
    assert await bounded(f("k")) == "k@0"
    await bounded(source.started.wait())
    # The refresh is held: calls do not join it, they get the entry it will replace.
    assert await bounded(asyncio.gather(f("k"), f("k"))) == ["k@0", "k@0"]
    assert f.cache_info().joined == 0
    cache.data.clear()  # the entry goes (expiry) while the refresh runs: a call joins it
    late = asyncio.create_task(f("k"))
    await settle()
    assert not late.done()
    source.gate.set()
    assert await bounded(late) == "k@1"
    assert source.calls == ["k", "k"]
    info = f.cache_info()
    assert (info.hits, info.misses, info.joined, info.refreshes) == (3, 1, 1, 1)


# -- per-call controls ----------------------------------------------------------------------------


async def test_refresh_computes_now_stores_and_joins_one_under_way() -> None:
    source = Source()
    cache: dict[Hashable, Any] = {}
    f = worker_queue(cache=cache)(source)
    assert await f("k") == "k@0"
    assert await f.refresh("k") == "k@1"  # computed although cached
    assert cache[("k",)] == "k@1"
    source.gate = asyncio.Event()
    first = asyncio.create_task(f.refresh("k"))
    await bounded(source.started.wait())
    second = asyncio.create_task(f.refresh("k"))
    await settle()
    source.gate.set()
    assert await bounded(asyncio.gather(first, second)) == ["k@2", "k@2"]
    assert source.calls == ["k", "k", "k"]


async def test_prime_and_peek() -> None:
    source = Source()
    cache: cachetools.LRUCache[Hashable, Any] = cachetools.LRUCache(2)
    f = worker_queue(cache=cache)(source)
    f.cache_prime("primed", "a")
    assert await f("a") == "primed"
    assert source.calls == []
    await f("b")
    before = f.cache_info()
    assert f.cache_peek("a") == "primed"
    assert f.cache_peek("zzz") is MISSING
    assert f.cache_info() == before  # peeking is not a call
    await f("c")  # evicts the least recently used entry: "a" (the peek did not touch it)
    assert f.cache_peek("a") is MISSING
    assert f.cache_peek("b") == "b@0"
    await f.acache_prime("again", "a")
    assert await f.acache_peek("a") == "again"


async def test_priming_forgets_a_computation_under_way() -> None:
    source = Source()
    source.gate = asyncio.Event()
    cache: dict[Hashable, Any] = {}
    f = worker_queue(cache=cache)(source)
    early = asyncio.create_task(f("k"))  # it will return k@0
    await bounded(source.started.wait())
    f.cache_prime("primed", "k")
    assert await f("k") == "primed"
    source.gate.set()
    assert await bounded(early) == "k@0"  # joined before: its own result
    assert cache == {("k",): "primed"}  # which did not overwrite the primed value


async def test_controls_of_an_async_cache_are_async() -> None:
    f = worker_queue(cache=MemoryAsyncCache(yields=True), name="src-controls")(Source())
    with pytest.raises(TypeError, match="acache_prime"):
        f.cache_prime("v", "k")
    with pytest.raises(TypeError, match="acache_peek"):
        f.cache_peek("k")
    assert await f.acache_peek("k") is MISSING
    await f.acache_prime("v", "k")
    assert await f.acache_peek("k") == "v"
    assert await f("k") == "v"
    assert await f.refresh("k") == "k@0"
    assert await f.acache_peek("k") == "k@0"


class Repo:
    def __init__(self, name: str) -> None:
        self.name = name

    @worker_queue(cache={})
    async def fetch(self, x: int) -> str:
        return f"{self.name}:{x}"


async def test_controls_on_bound_methods() -> None:
    a, b = Repo("a"), Repo("b")
    a.fetch.cache_prime("primed-a", 1)
    assert await a.fetch(1) == "primed-a"
    assert await b.fetch(1) == "b:1"
    assert a.fetch.cache_peek(1) == "primed-a"
    assert b.fetch.cache_peek(1) == "b:1"
    assert await a.fetch.refresh(1) == "a:1"
    assert await a.fetch.acache_peek(1) == "a:1"
    await b.fetch.acache_prime("primed-b", 2)
    assert await b.fetch(2) == "primed-b"


def test_cache_info_has_the_refresh_counters_with_defaults() -> None:
    info = CacheInfo(1, 2, 3, None, 0)
    assert (info.refreshes, info.refresh_failures) == (0, 0)


class SharedStore:
    """What processes share: entries with their write times, and the keys being computed."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.entries: dict[Hashable, tuple[Any, float]] = {}
        self.computing: set[Hashable] = set()


class RefreshingView:
    """One process's RefreshingCache over a SharedStore (a stand-in for RedisCache)."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    async def get(self, key: Hashable) -> Any:
        return (await self.get_with_age(key))[0]

    async def get_with_age(self, key: Hashable) -> tuple[Any, float | None]:
        await asyncio.sleep(0)
        entry = self.store.entries.get(key)
        if entry is None:
            return MISSING, None
        return entry[0], self.store.clock() - entry[1]

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        self.store.entries[key] = (value, self.store.clock())

    async def delete(self, key: Hashable) -> bool:
        return self.store.entries.pop(key, None) is not None

    async def clear(self) -> None:
        self.store.entries.clear()

    async def aclose(self) -> None:
        pass

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        value, _ = await self.get_with_age(key)
        if value is not MISSING:
            return value
        self.store.computing.add(key)
        try:
            value = await compute()
        finally:
            self.store.computing.discard(key)
        await self.set(key, value)
        return value

    async def refresh(self, key: Hashable, compute: Callable[[], Any]) -> tuple[bool, Any]:
        if key in self.store.computing:
            return False, MISSING
        self.store.computing.add(key)
        try:
            value = await compute()
        finally:
            self.store.computing.discard(key)
        await self.set(key, value)
        return True, value


async def test_across_processes_an_entry_written_elsewhere_is_refreshed_by_one_process() -> None:
    clock = Clock()
    store = SharedStore(clock)
    sources = [Source(), Source()]
    a, b = (
        worker_queue(cache=RefreshingView(store), refresh_after=5, timer=clock, name="src")(s)
        for s in sources
    )
    assert await a("k") == "k@0"  # written by process a
    clock.now = 3
    assert await b("k") == "k@0"  # b reads it with its age: 3 s, not fresh from b's view
    clock.now = 5
    gate = asyncio.Event()
    for source in sources:
        source.gate = gate
    assert [await a("k"), await b("k")] == ["k@0", "k@0"]  # both find it due at once
    await settle()
    assert len(sources[0].calls) + len(sources[1].calls) == 2  # one refresh, in one process
    gate.set()
    await settle()
    [(value, written)] = store.entries.values()
    assert written == 5  # refreshed once, at 5
    assert await a("k") == await b("k") == value
    # Each process started a refresh; the one that found the key being computed kept serving.
    assert a.cache_info().refreshes == b.cache_info().refreshes == 1


async def test_with_a_refreshing_cache_a_caller_joining_a_queued_refresh_takes_a_free_slot() -> (
    None
):
    """maxsize=1: a's refresh holds the spare slot, b's waits for one. b's entry goes (expired):
    its caller joins b's refresh, which then computes in the callers' free slot, at once."""
    clock = Clock()
    store = SharedStore(clock)
    source = Gated()
    f = worker_queue(
        maxsize=1, cache=RefreshingView(store), refresh_after=5, timer=clock, name="src"
    )(source)
    for key in ("a", "b"):
        store.entries[CallKey("src", cachetools.keys.hashkey(key))] = (f"{key}@0", 0.0)
    clock.now = 6
    assert await bounded(f("a")) == "a@0"
    await bounded(source.began("a").wait())  # a's refresh holds the spare slot
    assert await bounded(f("b")) == "b@0"
    await settle()
    assert source.calls == ["a"]  # b's refresh waits for a spare slot
    del store.entries[CallKey("src", cachetools.keys.hashkey("b"))]
    late = asyncio.create_task(f("b"))
    await bounded(source.began("b").wait())
    source.gate("b").set()
    assert await bounded(late) == "b@2"  # a's refresh is still held
    assert not source.gate("a").is_set()
    source.gate("a").set()
    await settle()
    assert await f("a") == "a@1"
    assert f.queue.computing == f.queue.waiting == 0


async def test_jitter_draws_once_per_entry_read_with_its_age() -> None:
    """200 entries written together elsewhere, each read 30 times before it is due: at 12.5 s,
    with refresh_after=10 and jitter=0.5, about 3 in 4 are due (as many as a TTLCache's), not
    none (a draw at each read, keeping the latest, pushes every due time to 15 s)."""
    clock = Clock()
    store = SharedStore(clock)
    random.seed(17)
    view = RefreshingView(store)
    f = worker_queue(
        maxsize=200, cache=view, refresh_after=10, jitter=0.5, timer=clock, name="src"
    )(Source())
    keys = [f"k{i}" for i in range(200)]
    for key in keys:  # written by another process at 0
        store.entries[CallKey("src", cachetools.keys.hashkey(key))] = (f"v{key}", 0.0)
    for step in range(30):
        clock.now = step * 0.1
        assert await bounded(asyncio.gather(*(f(key) for key in keys))) == [
            f"v{key}" for key in keys
        ]
    assert f.cache_info().refreshes == 0
    due = dict(_due(f))
    assert all(5 <= d <= 15 for d in due.values())
    clock.now = 4  # read again: an entry's due time does not move
    await bounded(asyncio.gather(*(f(key) for key in keys)))
    assert _due(f) == due
    clock.now = 12.5
    await bounded(asyncio.gather(*(f(key) for key in keys)))
    await settle()
    refreshed = f.cache_info().refreshes
    assert refreshed == sum(d <= 12.5 for d in due.values())
    assert 120 <= refreshed <= 180, refreshed
    # A refreshed entry is a new one: it gets a due time of its own, drawn once.
    await bounded(asyncio.gather(*(f(key) for key in keys)))
    redrawn = [k for k, d in due.items() if d <= 12.5]
    assert all(12.5 + 5 <= _due(f)[k] <= 12.5 + 15 for k in redrawn)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager first steps are 3.12+")
async def test_a_refresh_that_ends_in_its_first_step_is_due_again_after_refresh_after() -> None:
    """A worker that never suspends finishes its refresh inside the hit that started it: the
    entry's next refresh is refresh_after later, not one back-off later."""
    clock = Clock()
    calls: list[str] = []

    @worker_queue(cache={}, refresh_after=5, refresh_backoff=1, timer=clock)
    async def f(key: str) -> str:
        calls.append(key)
        return f"{key}@{len(calls)}"

    assert await f("k") == "k@1"
    clock.now = 5
    assert await f("k") == "k@1"  # due: refreshed in the background
    await settle()
    assert calls == ["k", "k"]
    clock.now = 6.5  # past the back-off, before the next refresh_after
    assert await f("k") == "k@2"
    await settle()
    assert calls == ["k", "k"]


async def test_refresh_joining_an_item_waiting_in_line_computes_it() -> None:
    """refresh() joins the waiting item of its key, which then computes when its turn comes
    instead of taking the value stored meanwhile."""
    gate = asyncio.Event()
    computed: list[int] = []

    @worker_queue(maxsize=1, cache={})
    async def f(x: int) -> str:
        computed.append(x)
        if x == 0:
            await gate.wait()
        return f"computed-{x}"

    holder = asyncio.create_task(f(0))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(f(1))
    await asyncio.sleep(0)
    assert f.queue.waiting == 1
    f.cache_prime("primed", 1)
    refreshing = asyncio.create_task(f.refresh(1))
    await asyncio.sleep(0)
    gate.set()
    async with asyncio.timeout(WAIT):
        assert await holder == "computed-0"
        assert await refreshing == "computed-1"
        assert await waiting == "computed-1"
    assert computed == [0, 1]
    assert f.cache_peek(1) == "computed-1"


def test_due_times_of_an_async_cache_are_pruned_by_when_they_were_last_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An async cache cannot say what it holds, so past a bound the due times set longest ago
    # go. A key stored again (refreshed) is young, wherever it was first inserted: it keeps
    # its due time, and the one stored once long ago goes.
    from wq_memo import _refresh

    monkeypatch.setattr(_refresh, "_PRUNE_AT", 8)
    monkeypatch.setattr(_refresh, "_KEEP_UNCHECKED", 8)
    now = [0.0]
    refresher = _refresh.Refresher(10.0, 1.0, 0.0, lambda: now[0], "f", None)
    refresher.stored("hot")
    refresher.stored("cold")
    for i in range(20):
        now[0] += 1.0
        refresher.stored(i)
        if i % 3 == 0:
            refresher.started("hot")
            refresher.stored("hot")
    assert refresher.due_time("hot") == 19.0 + 10.0, "the key stored again at 19 was pruned"
    assert refresher.due_time("cold") == _refresh.NEVER, "the key stored once, first, was kept"
    assert len(refresher.due) <= 8 + 1


async def test_a_nested_call_of_a_background_refresh_runs_in_its_spare_slot() -> None:
    """A background refresh in the spare slot calls f on another key: that nested call shares
    the refresh's slot instead of taking the only caller slot, so a miss arriving meanwhile
    starts at once (before, it waited for the nested call)."""
    clock = Clock()
    gates: dict[str, asyncio.Event] = {"part": asyncio.Event()}
    began: dict[str, asyncio.Event] = {"part": asyncio.Event()}

    @worker_queue(maxsize=1, cache={}, refresh_after=5, timer=clock)
    async def f(key: str) -> str:
        if key == "page":
            return "page of " + await f(f"part {clock.now}")
        if key.startswith("part") and clock.now:
            began["part"].set()
            await gates["part"].wait()
        return key

    assert await bounded(f("page")) == "page of part 0.0"
    clock.now = 6
    assert await f("page") == "page of part 0.0"  # due: refreshed in the background
    await bounded(began["part"].wait())  # the refresh's nested call is held
    assert f.queue.computing == 2
    assert await bounded(f("miss")) == "miss"
    assert not gates["part"].is_set()
    gates["part"].set()
    await settle()
    assert await f("page") == "page of part 6"
