"""Counting: cache_clear() and acache_clear() reset cache_info()'s counts, as functools does;
the metrics (OpenTelemetry counters, listeners' totals) never go down."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator, MutableMapping
from typing import Any, TypeVar

import cachetools
import pytest
from _queue_harness import MemoryAsyncCache, bounded, eventually, gathered, until
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from wq_memo import MISSING, CacheInfo, disabled, worker_queue
from wq_memo._listeners import totals
from wq_memo.metrics import Listener, add_listener, enable_opentelemetry, remove_listener

X = TypeVar("X")


class Calls:
    """The counter wq_memo.calls, read through an in-memory OpenTelemetry reader."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.reader = reader

    def of(self, function: str) -> dict[str, int]:
        """{outcome: count} of function, as collected now."""
        data = self.reader.get_metrics_data()
        assert data is not None
        found: dict[str, int] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != "wq_memo.calls":
                        continue
                    for point in metric.data.data_points:
                        attributes = point.attributes or {}
                        if attributes.get("function") == function:
                            assert isinstance(point, NumberDataPoint)
                            found[str(attributes["outcome"])] = int(point.value)
        return found


@pytest.fixture
def otel_calls() -> Iterator[Calls]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    adapter = enable_opentelemetry(meter_provider=provider)
    try:
        yield Calls(reader)
    finally:
        remove_listener(adapter)
        provider.shutdown()


def never_lower(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The outcomes whose count is lower in after than in before."""
    return [k for k, n in before.items() if after.get(k, 0) < n]


class HeldLookups(MemoryAsyncCache):
    """A MemoryAsyncCache whose lookups, once ``hold`` is set to an event, read the entry at
    once and answer only when the event is set (``holding`` is set meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def get(self, key: Hashable) -> Any:
        value = await super().get(key)
        hold = self.hold
        if hold is not None:
            self.holding.set()
            await hold.wait()
        return value


async def test_an_item_found_when_looked_up_again_is_counted_once_as_a_hit(
    otel_calls: Calls,
) -> None:
    """An item that waited in line and finds its value when its turn comes counts its caller
    as a hit, and never counted it as a miss first: no count goes down meanwhile."""
    cache = HeldLookups()
    gate = asyncio.Event()

    @worker_queue(maxsize=1, cache=cache, name="looked-again")
    async def f(x: int) -> str:
        if x == 1:
            await gate.wait()
        return f"computed {x}"

    first = asyncio.create_task(f(1))
    await eventually(lambda: f.queue.computing == 1)
    second = asyncio.create_task(f(2))
    await eventually(lambda: f.queue.waiting == 1)
    await bounded(f.acache_prime("primed", 2))  # stored while item 2 waits in line
    cache.hold = asyncio.Event()
    gate.set()  # item 1 ends; item 2 starts and looks its key up again, held there
    await until(cache.holding)
    during, metrics_during = f.cache_info(), otel_calls.of("looked-again")
    cache.hold.set()
    assert await bounded(second) == "primed"
    assert await bounded(first) == "computed 1"
    after, metrics_after = f.cache_info(), otel_calls.of("looked-again")
    assert after.misses >= during.misses, (during, after)
    assert not never_lower(metrics_during, metrics_after), (metrics_during, metrics_after)
    assert (after.hits, after.misses, after.joined) == (1, 1, 0)
    assert (metrics_after["hit"], metrics_after["miss"]) == (1, 1)


class SingleFlightMemoryCache(MemoryAsyncCache):
    """A MemoryAsyncCache that computes through get_or_compute, as a SingleFlightCache does."""

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[X]]) -> X:
        value = await self.get(key)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        result = await compute()
        await self.set(key, result)
        return result


CACHES: dict[str, Callable[[], Any]] = {
    "dict": dict,
    "LRUCache": lambda: cachetools.LRUCache(maxsize=10),
    "TTLCache": lambda: cachetools.TTLCache(maxsize=10, ttl=60),
    "none": lambda: None,
    "async": MemoryAsyncCache,
    "single-flight": SingleFlightMemoryCache,
}
SYNCHRONOUS = ("dict", "LRUCache", "TTLCache", "none")
CLEARS = [
    *((kind, "cache_clear") for kind in SYNCHRONOUS),
    *((kind, "acache_clear") for kind in CACHES),
]
COUNTS = ("hits", "misses", "joined", "refreshes", "refresh_failures", "bypassed")


def counts(info: CacheInfo) -> dict[str, int]:
    return {field: getattr(info, field) for field in COUNTS}


async def clear(f: Any, form: str) -> None:
    if form == "cache_clear":
        f.cache_clear()
    else:
        await bounded(f.acache_clear())


@pytest.mark.parametrize(("kind", "form"), CLEARS)
async def test_a_clear_sets_every_count_back_to_zero(kind: str, form: str) -> None:
    cache = CACHES[kind]()
    caching = cache is not None
    now = [0.0]
    entered, gate = asyncio.Event(), asyncio.Event()
    failing = False

    @worker_queue(
        cache=cache,
        name=f"cleared-{kind}",
        refresh_after=10 if caching else None,
        timer=lambda: now[0],
    )
    async def f(x: int) -> int:
        if x == 0:
            entered.set()
            await gate.wait()
        if failing and x == 2:
            raise LookupError(x)
        return x

    joining = [asyncio.create_task(f(0)) for _ in range(3)]
    await until(entered)
    gate.set()
    assert await gathered(*joining) == [0, 0, 0]
    assert (await f(1), await f(2), await f(1)) == (1, 2, 1)
    with disabled():
        assert await f(1) == 1
    if caching:
        now[0] = 20.0  # both entries are due: each call starts a background refresh
        failing = True
        assert (await f(1), await f(2)) == (1, 2)
        await eventually(lambda: f.cache_info().refresh_failures == 1)
        await eventually(lambda: f.queue.computing == 0)
    before = counts(f.cache_info())
    assert all(before[field] for field in ("misses", "joined", "bypassed")), before
    if caching:
        assert all(before.values()), before

    await clear(f, form)

    info = f.cache_info()
    assert counts(info) == dict.fromkeys(COUNTS, 0)
    if isinstance(cache, MutableMapping):
        assert info.currsize == len(cache) == 0
    else:
        assert info.currsize == (0 if cache is None else None)
    # And counting starts again from there.
    failing = False
    assert (await f(3), await f(3)) == (3, 3)
    assert (f.cache_info().hits, f.cache_info().misses) == ((1, 1) if caching else (0, 2))
    await f.queue.aclose()


@pytest.mark.parametrize("form", ["cache_clear", "acache_clear"])
async def test_a_bound_method_or_a_classmethod_clears_its_counts(form: str) -> None:
    class Repo:
        @worker_queue(cache={})
        async def load(self, x: int) -> int:
            return x

        @worker_queue(cache={})
        @classmethod
        async def build(cls, x: int) -> int:
            return x

        @classmethod
        @worker_queue(cache={})
        async def make(cls, x: int) -> int:
            return x

    repo = Repo()
    # Type checkers cannot see through @classmethod combined with the decorator.
    k: Any = Repo
    for _ in range(2):
        assert await repo.load(1) == 1
        assert await k.build(1) == 1
        assert await k.make(1) == 1
    for memoized in (repo.load, k.build, k.make):
        assert memoized.cache_info()[:2] == (1, 1)
        await clear(memoized, form)
        assert counts(memoized.cache_info()) == dict.fromkeys(COUNTS, 0)
    assert counts(Repo.load.cache_info()) == dict.fromkeys(COUNTS, 0)  # the function's own
    assert await repo.load(1) == 1
    assert repo.load.cache_info()[:2] == (0, 1)


class Heard(Listener):
    """Counts what listeners are told of each outcome."""

    def __init__(self) -> None:
        self.told: Counter[str] = Counter()

    def on_hit(self, name: str) -> None:
        self.told["hit"] += 1

    def on_miss(self, name: str) -> None:
        self.told["miss"] += 1

    def on_joined(self, name: str) -> None:
        self.told["joined"] += 1

    def on_bypassed(self, name: str) -> None:
        self.told["bypassed"] += 1


@pytest.mark.parametrize(("kind", "form"), CLEARS)
async def test_the_metrics_never_go_down_when_a_function_is_cleared(
    otel_calls: Calls, kind: str, form: str
) -> None:
    heard = Heard()
    add_listener(heard)
    try:

        @worker_queue(cache=CACHES[kind](), name=f"monotonic-{kind}")
        async def f(x: int) -> int:
            return x

        for x in (1, 1, 2, 1):
            await f(x)
        with disabled():
            await f(1)
        before, totals_before = otel_calls.of(f"monotonic-{kind}"), totals()[f"monotonic-{kind}"]
        told_before = heard.told.copy()
        assert before["miss"] > 0, before
        assert before["bypassed"] > 0, before

        await clear(f, form)

        after, totals_after = otel_calls.of(f"monotonic-{kind}"), totals()[f"monotonic-{kind}"]
        assert after == before
        assert totals_after == totals_before
        assert heard.told == told_before
        await f(1)
        later = otel_calls.of(f"monotonic-{kind}")
        assert later["miss"] == before["miss"] + 1, (before, later)
        assert not never_lower(before, later), (before, later)
    finally:
        remove_listener(heard)


def callers(f: Any, key: Hashable) -> int:
    """How many callers await key's item in f's queue."""
    table = f.queue._engine.table
    flight = None if table is None else table.flights.get(key)
    return 0 if flight is None else int(flight.callers)


async def test_a_call_is_counted_on_one_side_of_a_clear() -> None:
    """The callers of a computation under way at the clear were counted before it (and are
    cleared); those of an item still waiting in line for a slot are counted after it, when
    the item starts."""
    cache: dict[Hashable, str] = {}
    entered, gate = asyncio.Event(), asyncio.Event()

    @worker_queue(maxsize=1, cache=cache)
    async def f(x: int) -> str:
        if x == 1:
            entered.set()
            await gate.wait()
        return f"computed {x}"

    running = [asyncio.create_task(f(1)) for _ in range(2)]  # a miss and a join
    await until(entered)
    await eventually(lambda: f.cache_info().joined == 1)
    waiting = [asyncio.create_task(f(2)) for _ in range(2)]  # in line: not counted yet
    await eventually(lambda: callers(f, (2,)) == 2)
    assert f.queue.waiting == 1
    assert f.cache_info()[:3] == (0, 1, 1)

    f.cache_clear()
    assert f.cache_info()[:3] == (0, 0, 0)

    gate.set()
    assert await gathered(*running, *waiting) == ["computed 1"] * 2 + ["computed 2"] * 2
    assert f.cache_info()[:3] == (0, 1, 1)  # the item that waited, and the caller it joined
    assert cache == {(2,): "computed 2"}  # the forgotten computation stored nothing


class HeldClear(MemoryAsyncCache):
    """A MemoryAsyncCache whose clear() waits for ``release`` (``clearing`` is set meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.clearing, self.release = asyncio.Event(), asyncio.Event()

    async def clear(self) -> None:
        self.clearing.set()
        await self.release.wait()
        await super().clear()


async def test_a_call_made_while_acache_clear_runs_is_cleared_with_the_rest(
    otel_calls: Calls,
) -> None:
    cache = HeldClear()

    @worker_queue(cache=cache, name="during-the-clear")
    async def f(x: int) -> int:
        return x

    assert await f(1) == 1
    clearing = asyncio.create_task(f.acache_clear())
    await until(cache.clearing)
    assert await bounded(f(1)) == 1  # looked up before the entry went: a hit
    assert f.cache_info()[:3] == (1, 1, 0)
    cache.release.set()
    await bounded(clearing)
    assert f.cache_info()[:3] == (0, 0, 0)
    assert otel_calls.of("during-the-clear")["hit"] == 1  # the metrics keep it


class HeldClearAndLookups(HeldClear):
    """A HeldClear whose lookups can be held at a gate too (a slow remote read)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_gets = False
        self.looking, self.found = asyncio.Event(), asyncio.Event()

    async def get(self, key: Hashable) -> Any:
        if self.hold_gets:
            self.looking.set()
            await self.found.wait()
        return await super().get(key)


async def test_a_call_whose_lookup_outlasts_acache_clear_is_counted_after_it() -> None:
    cache = HeldClearAndLookups()

    @worker_queue(cache=cache, name="slow-lookup-during-the-clear")
    async def f(x: int) -> int:
        return x

    assert await f(1) == 1
    clearing = asyncio.create_task(f.acache_clear())
    await until(cache.clearing)
    cache.hold_gets = True
    call = asyncio.create_task(f(2))
    await until(cache.looking)
    cache.release.set()
    await bounded(clearing)
    assert f.cache_info()[:3] == (0, 0, 0)  # right after the clear: nothing counted
    cache.found.set()
    assert await bounded(call) == 2
    assert f.cache_info()[:3] == (0, 1, 0)  # its lookup ended after the clear: counted after
