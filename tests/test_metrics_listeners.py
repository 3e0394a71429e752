"""Listeners: told of every call and computation, by name; a hit path untouched without them."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import cachetools
import pytest
from _queue_harness import MemoryAsyncCache

from wq_memo import CacheInfo, Memoized, worker_queue
from wq_memo import _listeners as listeners_module
from wq_memo.metrics import Listener, add_listener, remove_listener

WAIT = 5.0


class Recorder(Listener):
    """Counts every event by (event, name); keeps the computations' outcomes."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.computed: list[tuple[str, float, type[BaseException] | None]] = []

    def on_hit(self, name: str) -> None:
        self.events["hit", name] += 1

    def on_miss(self, name: str) -> None:
        self.events["miss", name] += 1

    def on_joined(self, name: str) -> None:
        self.events["joined", name] += 1

    def on_bypassed(self, name: str) -> None:
        self.events["bypassed", name] += 1

    def on_refresh(self, name: str) -> None:
        self.events["refresh", name] += 1

    def on_computed(self, name: str, seconds: float, error: type[BaseException] | None) -> None:
        self.computed.append((name, seconds, error))

    def agrees_with(self, info: CacheInfo, name: str) -> bool:
        seen = (
            self.events["hit", name],
            self.events["miss", name],
            self.events["joined", name],
            self.events["refresh", name],
        )
        return seen == (info.hits, info.misses, info.joined, info.refreshes)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    listener = Recorder()
    add_listener(listener)
    try:
        yield listener
    finally:
        remove_listener(listener)


CACHES: dict[str, Callable[[], Any]] = {
    "dict": dict,
    "LRUCache": lambda: cachetools.LRUCache(maxsize=10),
    "TTLCache": lambda: cachetools.TTLCache(maxsize=10, ttl=60),
    "none": lambda: None,
    "async": MemoryAsyncCache,
}


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("keyword", [False, True])
async def test_every_call_is_told_with_the_function_name_as_cache_info_counts_it(
    recorder: Recorder, kind: str, keyword: bool
) -> None:
    @worker_queue(cache=CACHES[kind](), name="double")
    async def double(x: int) -> int:
        return 2 * x

    for x in (1, 2, 1, 1, 3, 2):
        assert await (double(x=x) if keyword else double(x)) == 2 * x
    info = double.cache_info()
    assert info.hits + info.misses == 6
    assert recorder.agrees_with(info, "double"), (recorder.events, info)
    assert [(name, error) for name, _, error in recorder.computed] == [("double", None)] * (
        info.misses
    )
    await double.queue.aclose()


async def test_the_default_name_is_the_qualified_name(recorder: Recorder) -> None:
    @worker_queue
    async def f(x: int) -> int:
        return x

    await f(1)
    await f(1)
    name = f.__qualname__
    assert recorder.events == Counter({("miss", name): 1, ("hit", name): 1})


async def test_joined_calls_and_a_failure_by_its_type(recorder: Recorder) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()

    @worker_queue(cache=None, name="slow")
    async def slow(x: int) -> int:
        entered.set()
        await gate.wait()
        raise LookupError(x)

    async with asyncio.timeout(WAIT):
        calls = [asyncio.create_task(slow(1)) for _ in range(3)]
        await entered.wait()
        await asyncio.sleep(0)  # the other two calls join
        gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results)
    assert recorder.events == Counter({("miss", "slow"): 1, ("joined", "slow"): 2})
    [(name, seconds, error)] = recorder.computed
    assert (name, error) == ("slow", LookupError)
    assert seconds >= 0


async def test_a_background_refresh_is_told(recorder: Recorder) -> None:
    now = [0.0]
    cache: cachetools.TTLCache[Hashable, int] = cachetools.TTLCache(
        maxsize=10, ttl=100, timer=lambda: now[0]
    )
    refreshed = asyncio.Event()

    @worker_queue(cache=cache, refresh_after=10, name="r")
    async def r(x: int) -> int:
        if now[0]:
            refreshed.set()
        return x

    await r(1)
    now[0] = 20.0
    assert await r(1) == 1  # served at once; a refresh starts
    async with asyncio.timeout(WAIT):
        await refreshed.wait()
        await r.queue.aclose()  # lets the refresh finish
    assert recorder.events["refresh", "r"] == 1
    assert recorder.agrees_with(r.cache_info(), "r")


async def test_hits_served_while_a_refresh_runs_are_told(recorder: Recorder) -> None:
    """With an async cache, a call that finds a refresh of its key under way gets the entry:
    a hit, told to the listeners as cache_info() counts it."""
    now = [0.0]
    gate, refreshing = asyncio.Event(), asyncio.Event()
    computed = 0

    @worker_queue(cache=MemoryAsyncCache(), refresh_after=10, timer=lambda: now[0], name="rh")
    async def rh(x: int) -> int:
        nonlocal computed
        computed += 1
        if computed > 1:
            refreshing.set()
            await gate.wait()
        return x

    async with asyncio.timeout(WAIT):
        await rh(1)
        now[0] = 20.0
        assert await rh(1) == 1  # served at once; a refresh starts
        await refreshing.wait()
        for _ in range(5):
            assert await rh(1) == 1  # during the refresh
        gate.set()
        await rh.queue.aclose()
    assert rh.cache_info().hits == 6  # the call that found it due, and five during the refresh
    assert recorder.events["hit", "rh"] == 6
    assert recorder.agrees_with(rh.cache_info(), "rh")


def _free(f: Any, name: str) -> Any:
    """What the closure variable name of f's hit path holds now."""
    return f.__closure__[f.__code__.co_freevars.index(name)].cell_contents


def test_the_hit_path_reads_the_cache_itself_unless_a_listener_wants_hits() -> None:
    lru: cachetools.LRUCache[Hashable, int] = cachetools.LRUCache(maxsize=10)

    @worker_queue(cache=lru)
    async def f(x: int) -> int:
        return x

    @worker_queue(cache={})
    async def g(x: int) -> int:
        return x

    find = _free(g, "find")
    assert _free(f, "entries") is lru

    class OnlyComputations(Listener):
        def on_computed(
            self, name: str, seconds: float, error: type[BaseException] | None
        ) -> None: ...

    quiet = OnlyComputations()
    add_listener(quiet)
    try:
        # A listener that leaves on_hit alone changes nothing on the hit path.
        assert _free(f, "entries") is lru
        assert _free(g, "find") is find
    finally:
        remove_listener(quiet)
    hits = Recorder()
    add_listener(hits)
    try:
        assert _free(f, "entries") is not lru
        assert _free(g, "find") is not find
    finally:
        remove_listener(hits)
    assert _free(f, "entries") is lru
    assert _free(g, "find") is find
    assert not listeners_module.active


async def test_functions_made_before_and_while_listening_are_both_told() -> None:
    @worker_queue(name="before")
    async def before(x: int) -> int:
        return x

    await before(1)
    recorder = Recorder()
    add_listener(recorder)
    try:

        @worker_queue(name="during")
        async def during(x: int) -> int:
            return x

        for f in (before, during):
            await f(1)
            await f(1)
    finally:
        remove_listener(recorder)
    await before(1)  # no longer told
    assert recorder.events == Counter(
        {("hit", "before"): 2, ("miss", "during"): 1, ("hit", "during"): 1}
    )


async def test_a_failing_listener_is_logged_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Listener):
        def on_miss(self, name: str) -> None:
            raise RuntimeError("listener bug")

    broken = Broken()
    recorder = Recorder()
    add_listener(broken)
    add_listener(recorder)
    try:

        @worker_queue(name="h")
        async def h(x: int) -> int:
            return x

        with caplog.at_level(logging.ERROR, logger="wq_memo"):
            assert await h(1) == 1
    finally:
        remove_listener(broken)
        remove_listener(recorder)
    assert "on_miss" in caplog.text
    assert "listener bug" in caplog.text
    assert recorder.events["miss", "h"] == 1  # the others are still told


def test_bypassed_calls_are_told() -> None:
    recorder = Recorder()
    listeners_module.bypassed("f")  # nobody listening: nothing happens
    add_listener(recorder)
    try:
        listeners_module.bypassed("f")
    finally:
        remove_listener(recorder)
    assert recorder.events == Counter({("bypassed", "f"): 1})


def test_registering() -> None:
    recorder = Recorder()
    with pytest.raises(TypeError, match="subclass Listener"):
        add_listener(object())  # type: ignore[arg-type]
    add_listener(recorder)
    add_listener(recorder)
    assert listeners_module.listeners.count(recorder) == 1
    remove_listener(recorder)
    remove_listener(recorder)
    assert recorder not in listeners_module.listeners


@pytest.fixture
def listening() -> Iterator[None]:
    """A listener registered (one that wants no hits): totals() keep the counts of functions gone
    only while some listener may read them."""
    listener = Listener()
    add_listener(listener)
    try:
        yield
    finally:
        remove_listener(listener)


def test_counts_outlive_a_function_in_totals(listening: None) -> None:
    def make() -> Memoized[[int], int]:
        @worker_queue(name="short-lived")
        async def f(x: int) -> int:
            return x

        return f

    async def use(f: Memoized[[int], int]) -> None:
        await f(1)
        await f(1)

    f = make()
    asyncio.run(use(f))
    before = listeners_module.totals()["short-lived"]
    del f
    gc.collect()
    assert listeners_module.totals()["short-lived"] == before
    hits, misses = before[0], before[1]
    assert hits >= 1
    assert misses >= 1


def test_a_function_whose_cache_refers_to_it_is_still_collected(listening: None) -> None:
    class Holding(dict[Hashable, Any]):
        owner: Any = None

    def make() -> Any:
        cache = Holding()

        @worker_queue(cache=cache, name="self-held")
        async def f(x: int) -> int:
            return x

        cache.owner = f  # a cycle through the cache, as a machine holding both has
        return f

    f = make()
    asyncio.run(f(1))
    gone = weakref.ref(f)
    del f
    gc.collect()
    assert gone() is None
    assert listeners_module.totals()["self-held"][1] >= 1  # its miss outlives it
