"""With any SingleFlightCache, f.refresh() stores through get_or_compute, the cache's one fenced
store: an invalidation or a clear made while the refresh computes keeps its result out (issue
17, item 1)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import pytest

from wq_memo import MISSING, worker_queue
from wq_memo.backends import RefreshingCache, SingleFlightCache

V = TypeVar("V")
WAIT = 5.0


class FencedCache:
    """A SingleFlightCache in memory whose get_or_compute stores only if no delete or set of the
    key and no clear came since it began, in one step after a suspension, as a script would."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.generation: dict[Hashable, int] = {}
        self.clears = 0

    async def get(self, key: Hashable) -> Any:
        await asyncio.sleep(0)
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await asyncio.sleep(0)
        self.generation[key] = self.generation.get(key, 0) + 1  # a prime wins
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        await asyncio.sleep(0)
        self.generation[key] = self.generation.get(key, 0) + 1
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        await asyncio.sleep(0)
        self.clears += 1
        self.data.clear()

    async def aclose(self) -> None:
        pass

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        value = await self.get(key)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        began = (self.clears, self.generation.get(key, 0))
        value = await compute()
        await asyncio.sleep(0)
        if (self.clears, self.generation.get(key, 0)) == began:
            self.data[key] = value
        return value


def test_the_double_is_a_single_flight_cache() -> None:
    assert isinstance(FencedCache(), SingleFlightCache)


@pytest.mark.parametrize("how", ["acache_invalidate", "acache_clear"])
async def test_a_refresh_never_stores_after_an_invalidation(how: str) -> None:
    cache = FencedCache()
    gate, started = asyncio.Event(), asyncio.Event()
    calls = 0

    @worker_queue(cache=cache, name="fenced-refresh")
    async def f(k: str) -> str:
        nonlocal calls
        calls += 1
        n = calls
        started.set()
        await gate.wait()
        return f"{k}#{n}"

    gate.set()
    async with asyncio.timeout(WAIT):
        assert await f("k") == "k#1"
        gate.clear()
        started.clear()
        refreshing = asyncio.create_task(f.refresh("k"))
        await started.wait()
        if how == "acache_invalidate":
            await f.acache_invalidate("k")
        else:
            await f.acache_clear()
        gate.set()
        assert await refreshing == "k#2"  # its caller gets it ...
        assert await f.acache_peek("k") is MISSING  # ... but it is not stored
        assert await f("k") == "k#3"  # computed afresh
        assert await f.acache_peek("k") == "k#3"
        assert await f.refresh("k") == "k#4"  # with nothing in the way, a refresh stores
        assert await f.acache_peek("k") == "k#4"
    await f.queue.aclose()


class HeldSetCache(FencedCache):
    """A FencedCache whose set() can be held at a gate, as a slow network write would be."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_sets = False
        self.set_began = asyncio.Event()
        self.set_may_end = asyncio.Event()

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        if self.hold_sets:
            self.set_began.set()
            await self.set_may_end.wait()
        await super().set(key, value, ttl)


def _refreshing(
    cache: FencedCache, now: list[float], gate: asyncio.Event, began: asyncio.Event | None = None
) -> Any:
    """f(k) -> f"{k}#{n}" for its n-th computation, held at gate from the second on (setting
    began first; failing when k is "bad"), refreshed in the background 10 s after each store."""
    calls = 0

    @worker_queue(cache=cache, name="background", refresh_after=10, timer=lambda: now[0])
    async def f(k: str) -> str:
        nonlocal calls
        calls += 1
        n = calls
        if n > 1:
            if began is not None:
                began.set()
            await gate.wait()
            if k == "bad":
                raise LookupError("source down")
        return f"{k}#{n}"

    return f


@pytest.mark.parametrize("key", ["good", "bad"])
async def test_a_background_refresh_keeps_the_entry_for_every_reader(key: str) -> None:
    """With a SingleFlightCache that offers no refresh of its own, the entry stays while a
    background refresh computes, every call gets it at once, and a failed refresh leaves it."""
    cache, now, gate, began = FencedCache(), [0.0], asyncio.Event(), asyncio.Event()
    f = _refreshing(cache, now, gate, began)
    async with asyncio.timeout(WAIT):
        assert await f(key) == f"{key}#1"
        now[0] = 20.0  # due
        assert await f(key) == f"{key}#1"  # served at once; a refresh starts
        await began.wait()
        assert await f(key) == f"{key}#1"  # during the refresh: the entry, at once
        assert await f.acache_peek(key) == f"{key}#1"
        gate.set()
        await f.queue.aclose()  # lets the refresh end
    expected = f"{key}#1" if key == "bad" else f"{key}#2"
    assert await f.acache_peek(key) == expected
    assert f.cache_info().refresh_failures == (key == "bad")


@pytest.mark.parametrize("how", ["acache_invalidate", "acache_clear", "acache_prime"])
async def test_an_invalidation_waits_for_a_background_refresh_store_on_its_way(how: str) -> None:
    """The refresh's store has begun when the invalidation (or clear, or prime) is made: the
    invalidation waits for it, so that the refreshed value does not outlive it."""
    cache, now, gate = HeldSetCache(), [0.0], asyncio.Event()
    f = _refreshing(cache, now, gate)
    async with asyncio.timeout(WAIT):
        assert await f("k") == "k#1"
        now[0] = 20.0
        cache.hold_sets = True
        gate.set()
        assert await f("k") == "k#1"  # a refresh starts, computes k#2 and begins to store it
        await cache.set_began.wait()
        cache.hold_sets = False
        if how == "acache_prime":
            done = asyncio.ensure_future(f.acache_prime("primed", "k"))
        else:
            done = asyncio.ensure_future(
                getattr(f, how)(*(("k",) if how != "acache_clear" else ()))
            )
        for _ in range(5):
            await asyncio.sleep(0)
        assert not done.done(), "the invalidation returned before the store on its way ended"
        cache.set_may_end.set()
        await done
        assert await f.acache_peek("k") == ("primed" if how == "acache_prime" else MISSING)


async def test_a_nested_computation_its_caller_gave_up_on_frees_the_slot_once() -> None:
    """maxsize=1, a single-flight cache, refresh-ahead: while a computation holds the slot, a
    due key's refresh waits in line and is invalidated; the computation then calls the key,
    which runs in its slot, gives up waiting for it and returns; the key's computation takes
    the slot over. Each slot is given back once: afterwards, callers' computations stay within
    maxsize again (the slot was given back twice, and two ran at once)."""
    cache, now = FencedCache(), [0.0]
    p_go, k_began, k_may_end, k_ended = (asyncio.Event() for _ in range(4))
    live = most = computed = 0

    @worker_queue(cache=cache, name="gave-up", maxsize=1, refresh_after=10, timer=lambda: now[0])
    async def f(k: str) -> str:
        nonlocal live, most, computed
        computed += 1
        live += 1
        most = max(most, live)
        try:
            if k == "p":
                await p_go.wait()
                nested = asyncio.ensure_future(f("k"))
                await k_began.wait()
                nested.cancel()  # gives up on it, as asyncio.wait_for would
                return "p"
            if k == "k" and computed > 1:
                k_began.set()
                try:
                    await k_may_end.wait()
                finally:
                    k_ended.set()
            await asyncio.sleep(0)
            return k
        finally:
            live -= 1

    async with asyncio.timeout(WAIT):
        assert await f("k") == "k"
        now[0] = 20.0  # k is due
        parent = asyncio.ensure_future(f("p"))
        while f.queue.computing == 0:  # noqa: ASYNC110  # p is computing
            await asyncio.sleep(0)
        assert await f("k") == "k"  # a hit; its refresh waits for a spare slot
        await f.acache_invalidate("k")
        p_go.set()
        assert await parent == "p"
        k_may_end.set()
        await k_ended.wait()
        for _ in range(10):  # a few loop turns: k's computation ends and gives its slot back
            await asyncio.sleep(0)
        most = 0
        assert list(await asyncio.gather(f("a"), f("b"), f("d"))) == ["a", "b", "d"]
    assert most == 1


async def test_recursion_joining_a_computation_that_waits_for_the_slot_runs_it_in_its_own() -> None:
    """maxsize=1, a single-flight cache: fib(5) holds the slot; a call of fib(3) from outside
    is under way, its computation waiting for the slot. fib(5)'s nested fib(4) then needs
    fib(3): it lends fib(3) its slot, as it would to an item waiting in line (it waited for
    ever: fib(3) for the slot, fib(5) for fib(4), fib(4) for fib(3))."""
    go = asyncio.Event()

    @worker_queue(cache=FencedCache(), name="fib", maxsize=1)
    async def fib(n: int) -> int:
        if n == 5:
            await go.wait()
        return n if n < 2 else await fib(n - 1) + await fib(n - 2)

    async with asyncio.timeout(WAIT):
        five = asyncio.ensure_future(fib(5))
        while fib.queue.computing == 0:  # noqa: ASYNC110  # fib(5) holds the slot
            await asyncio.sleep(0)
        three = asyncio.ensure_future(fib(3))
        for _ in range(20):  # fib(3)'s lookups and claim, up to its wait for the slot
            await asyncio.sleep(0)
        go.set()
        assert await five == 5
        assert await three == 2


class OtherProcessCache(FencedCache):
    """As FencedCache, where another process computes ``waited_key``: get_or_compute waits for
    it (``answer``) and returns what that process stored, without computing here."""

    def __init__(self, waited_key: Hashable) -> None:
        super().__init__()
        self.waited_key = waited_key
        self.waiting = asyncio.Event()
        self.answer: asyncio.Future[Any] | None = None

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        if getattr(key, "key", None) != self.waited_key or self.answer is not None:
            return await super().get_or_compute(key, compute)
        self.answer = asyncio.get_running_loop().create_future()
        self.waiting.set()
        value: V = await self.answer
        return value


@pytest.mark.parametrize("how", ["invalidate", "clear", "prime"])
async def test_a_call_after_an_invalidation_never_joins_a_wait_for_another_process(
    how: str,
) -> None:
    # A caller waits for another process's computation of key 1, which began before the
    # invalidation; once the invalidation has returned, a new call must not join that wait:
    # it would get the old result.
    cache = OtherProcessCache((1,))

    @worker_queue(cache=cache, name="tests.single_flight.waited_elsewhere")
    async def f(k: int) -> str:
        return f"new {k}"

    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(f(1))
        await cache.waiting.wait()
        if how == "invalidate":
            await f.acache_invalidate(1)
        elif how == "clear":
            await f.acache_clear()
        else:
            await f.acache_prime("primed 1", 1)
        later = asyncio.create_task(f(1))
        for _ in range(10):  # loop turns: its lookup misses, and it joins or makes a flight
            await asyncio.sleep(0)
        assert cache.answer is not None
        cache.answer.set_result("old 1")  # read after the invalidation returned
        assert await first == "old 1"  # called before the invalidation: may get it
        assert await later == ("primed 1" if how == "prime" else "new 1")


class GivenUpElsewhereCache(FencedCache):
    """A RefreshingCache in memory where another process holds every refresh, then gives the
    key up: refresh() leaves it to that process, and get_or_compute() computes here (that
    process failed). Entries are dated on a clock moved by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.written: dict[Hashable, float] = {}
        self.waiting = asyncio.Event()
        self.given_up = asyncio.Event()

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await super().set(key, value, ttl)
        self.written[key] = self.now

    async def get_with_age(self, key: Hashable) -> tuple[Any, float | None]:
        value = await self.get(key)
        return value, None if value is MISSING else self.now - self.written[key]

    async def refresh(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> tuple[bool, Any]:
        return False, MISSING

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        if key not in self.data:
            value = await compute()
            self.data[key] = value
            self.written[key] = self.now
            return value
        self.waiting.set()
        await self.given_up.wait()  # the process computing it gives up: computed here
        return await compute()


async def test_a_refresh_computing_after_another_process_gave_up_takes_no_callers_slot() -> None:
    # maxsize=1: a due entry's background refresh is left to another process, which gives the
    # key up while no spare slot is free; the refresh does not take the caller's slot (a miss
    # would wait behind it): it is deferred, neither logged nor counted as a failure.
    cache = GivenUpElsewhereCache()
    assert isinstance(cache, RefreshingCache)
    gates: dict[str, asyncio.Event] = {}
    began: dict[str, asyncio.Event] = {}
    calls: list[str] = []

    @worker_queue(
        maxsize=1,
        cache=cache,
        refresh_after=5,
        timer=lambda: cache.now,
        name="tests.single_flight.given_up",
    )
    async def f(k: str) -> str:
        calls.append(k)
        began.setdefault(k, asyncio.Event()).set()
        await gates.setdefault(k, asyncio.Event()).wait()
        return f"{k}#{len(calls)}"

    async with asyncio.timeout(WAIT):
        gates["a"] = asyncio.Event()
        gates["a"].set()
        assert await f("a") == "a#1"
        gates["a"].clear()  # a refresh of "a" that computes is held
        cache.now = 6  # due
        assert await f("a") == "a#1"  # served; its refresh starts in the spare slot
        await cache.waiting.wait()  # left to another process: it gave its slot back
        slow = asyncio.create_task(f("slow"))  # a caller's miss takes the only slot
        await began.setdefault("slow", asyncio.Event()).wait()
        cache.given_up.set()  # the other process gives up: the refresh would compute here
        gates["slow"].set()
        assert await slow == "slow#2"
        gates["b"] = asyncio.Event()
        gates["b"].set()
        assert await f("b") == "b#3", "a miss waited behind the refresh"
        assert calls == ["a", "slow", "b"]
        assert f.cache_info().refresh_failures == 0
    assert f.queue.computing == 0
