"""Model-based tests of @worker_queue: a TTLCache on a fake clock, and deduplication only."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, ClassVar, Protocol, TypeVar

import cachetools
import pytest
from cachetools.keys import hashkey
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule, run_state_machine_as_test

from wq_memo import CacheInfo, WorkerQueue, _listeners, disabled, worker_queue
from wq_memo._flight import FlightTable
from wq_memo.backends import MISSING, CallKey
from wq_memo.metrics import Listener, add_listener, remove_listener

from ._machinery import FINISH_TIMEOUT, KEYS, Computation, QueueModelMachine, Value, keys

V = TypeVar("V")
BYPASSING: contextvars.ContextVar[bool] = contextvars.ContextVar("bypassing", default=False)
"""Set in the machine's calls made inside disabled(): f then computes without the model."""
TTL = 10.5
"""Entries expire TTL after they are stored; the clock moves in whole steps, never onto a tie."""


class Driven(Protocol):
    """What the machines use of a memoized function, called with a key of the model."""

    @property
    def queue(self) -> WorkerQueue[Any, Any]: ...

    def __call__(self, key: str, /) -> Coroutine[Any, Any, Value | None]: ...

    def cache_info(self) -> CacheInfo: ...

    def cache_clear(self) -> None: ...

    async def acache_clear(self) -> None: ...

    def cache_invalidate(self, key: str, /) -> bool: ...

    async def acache_invalidate(self, key: str, /) -> bool: ...


def since_made(f: Any) -> tuple[int, int, int, int, int]:
    """f's hits, misses, joined, refreshes and bypassed since it was made: a clear sets
    cache_info()'s counts back to zero, not these (the metrics read them)."""
    counts = f.queue._engine.counts
    tracked = _listeners._Tracked("f", counts, getattr(f, "_own_hits", None))
    hits, misses, joined, refreshes, bypassed = tracked.counted()
    return hits, misses, joined, refreshes, bypassed


def assert_counts_cleared(info: CacheInfo) -> None:
    """info, read right after a clear, counts nothing."""
    counted = (
        info.hits,
        info.misses,
        info.joined,
        info.refreshes,
        info.refresh_failures,
        info.bypassed,
    )
    assert counted == (0,) * 6, f"right after a clear: {info}"


class RecordingTTLCache(cachetools.TTLCache[Hashable, Any]):
    """A TTLCache that tells the machine when a caller's lookup finds a value, and which
    computation stores each value."""

    def __init__(self, machine: QueueModelMachine) -> None:
        super().__init__(maxsize=100, ttl=TTL, timer=lambda: machine.fake_now)
        self.machine = machine

    def __getitem__(self, key: Hashable) -> Any:
        try:
            value = super().__getitem__(key)
        except KeyError:
            self.machine.about_to_call(key[0])  # type: ignore[index]
            raise
        self.machine.record_hit()
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        super().__setitem__(key, value)
        self.machine.stored_now(value)


class CountingListener(Listener):
    """Counts what listeners are told of f: it must add up to what f counted (cache_info()'s
    counts, and those a clear set back to zero)."""

    def __init__(self) -> None:
        self.hits = self.misses = self.joined = self.refreshes = 0

    def on_hit(self, name: str) -> None:
        if name == "f":
            self.hits += 1

    def on_miss(self, name: str) -> None:
        if name == "f":
            self.misses += 1

    def on_joined(self, name: str) -> None:
        if name == "f":
            self.joined += 1

    def on_refresh(self, name: str) -> None:
        if name == "f":
            self.refreshes += 1


class DecoratorMachine(QueueModelMachine):
    """Drives f(key), memoized by @worker_queue with a TTLCache on a fake clock."""

    none_results = True
    async_cache: ClassVar[bool] = False
    """Whether the cache is an AsyncCache, whose operations may suspend (``yielding``)."""

    def make_cache(self) -> cachetools.TTLCache[Hashable, Any] | None:
        return RecordingTTLCache(self)

    @initialize(maxsize=st.integers(1, 3), yielding=st.booleans())
    def decorate(self, maxsize: int, yielding: bool) -> None:
        self.maxsize = maxsize
        self.yielding = yielding and self.async_cache
        self.direct: list[tuple[str, Value]] = []
        """What calls made with caching off returned, and their keys."""
        self.cache = self.make_cache()
        self.f: Driven = self.memoize()
        self.listener = CountingListener()
        add_listener(self.listener)

    def memoize(self) -> Driven:
        """The function under test: f(key), computed by the machine's worker."""

        @worker_queue(
            maxsize=self.maxsize, cache=self.cache, finish_timeout=FINISH_TIMEOUT, name="f"
        )
        async def f(key: str) -> Value | None:
            if BYPASSING.get():
                return self.computed_directly(key)
            return await self.work(key)

        return f

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            remove_listener(self.listener)

    def call(self, key: str) -> Coroutine[Any, Any, Value | None]:
        return self.f(key)

    def computed_directly(self, key: str) -> Value:
        """What f computes when called with caching switched off: a value of its own."""
        self.direct.append((key, Value(-1 - len(self.direct))))
        return self.direct[-1][1]

    @rule(key=keys)
    def call_disabled(self, key: str) -> None:
        """A call inside wq_memo.disabled(): the function runs at once, in the caller's task;
        nothing is looked up, stored, joined or counted but bypassed."""
        cached, counters, computations = self.real_cache(), self.counters(), len(self.comps)

        async def call() -> Value | None:
            with disabled():
                token = BYPASSING.set(True)
                try:
                    return await self.f(key)
                finally:
                    BYPASSING.reset(token)

        # It never suspends, so it runs without the loop, whose other tasks the rules order.
        coroutine = call()
        try:
            coroutine.send(None)
        except StopIteration as returned:
            value = returned.value
        else:
            coroutine.close()
            raise AssertionError("a call with caching off suspended")
        assert self.direct, "the function was not called"
        assert self.direct[-1] == (key, value), "not computed directly"
        assert self.real_cache() == cached, "a call with caching off changed the cache"
        assert self.counters() == counters
        assert len(self.comps) == computations, "a call with caching off went through the queue"

    def memoized(self) -> Any:
        """The function @worker_queue made."""
        return self.f

    @invariant()
    def bypassed_counts_the_calls_made_with_caching_off(self) -> None:
        assert since_made(self.memoized())[4] == len(self.direct)

    async def aclose(self) -> None:
        await self.f.queue.aclose()

    def queue_table(self) -> FlightTable[Any, Any] | None:
        return self.f.queue._engine.table

    def counters(self) -> tuple[int, int, int]:
        hits, misses, joined, _, _ = since_made(self.memoized())
        return hits, misses, joined

    def flight_key(self, key: str) -> object:
        return hashkey(key)

    def looks_up(self) -> bool:
        return self.cache is not None

    def real_cache(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        found = {}
        for key in KEYS:
            with contextlib.suppress(KeyError):
                found[key] = cachetools.TTLCache.__getitem__(self.cache, hashkey(key))
        return found

    @rule(key=keys, use_async=st.booleans())
    def invalidate(self, key: str, use_async: bool) -> None:
        """Invalidate one call, with cache_invalidate() or acache_invalidate(): a computation of
        it under way is forgotten (its value is never stored; later calls compute afresh)."""
        forgotten = self.forget(key)
        if use_async:
            removed = self.loop.run_until_complete(self.f.acache_invalidate(key))
        else:
            removed = self.f.cache_invalidate(key)
        assert removed == self.uncache(key), f"cache_invalidate({key!r}) returned {removed}"
        self.forgotten_done(forgotten)

    @rule(use_async=st.booleans())
    def clear(self, use_async: bool) -> None:
        """Empty the cache, with cache_clear() or acache_clear(); computations under way are
        forgotten."""
        forgotten = [c for key in KEYS for c in self.forget(key)]
        if use_async:
            self.loop.run_until_complete(self.cleared_async())
        else:
            self.f.cache_clear()
            assert_counts_cleared(self.f.cache_info())
        for key in list(self.cached):
            self.uncache(key)
        self.forgotten_done(forgotten)

    @rule(seconds=st.sampled_from([1, 4, 11]))
    def advance_clock(self, seconds: int) -> None:
        """Move the TTLCache's clock on: entries older than the ttl expire."""
        self.fake_now += seconds
        for key, comp in list(self.cached.items()):
            if comp.cached_time + TTL <= self.fake_now:
                self.uncache(key)

    async def cleared_async(self) -> None:
        """acache_clear(); cache_info() right after it counts nothing."""
        await self.f.acache_clear()
        assert_counts_cleared(self.f.cache_info())

    @invariant()
    def listeners_are_told_what_is_counted(self) -> None:
        heard = self.listener
        told = (heard.hits, heard.misses, heard.joined, heard.refreshes)
        counted = since_made(self.memoized())[:4]
        assert told == counted, f"listeners were told {told}, {counted} were counted"

    @invariant()
    def cache_info_sizes(self) -> None:
        info = self.f.cache_info()
        if self.cache is None:
            assert (info.maxsize, info.currsize) == (None, 0)
        else:
            assert (info.maxsize, info.currsize) == (self.cache.maxsize, self.cache.currsize)


class MemoryAsyncCache:
    """An AsyncCache in memory, on the machine's fake clock; with ``yielding``, every operation
    suspends as a remote cache's would (a lookup reads at once and answers late). The machine's
    gates can hold lookups and stores longer."""

    def __init__(self, machine: QueueModelMachine) -> None:
        self.machine = machine
        self.data: dict[Hashable, tuple[Any, float]] = {}

    def peek(self, key: Hashable) -> Any:
        value, expires = self.data.get(key, (MISSING, 0.0))
        return value if self.machine.fake_now < expires else MISSING

    async def get(self, key: Hashable) -> Any:
        value = self.peek(key)
        if self.machine.yielding:
            await self.machine.answer_late()
        if value is not MISSING:
            self.machine.record_hit()
        else:
            self.machine.about_to_call(key.key[0])  # type: ignore[attr-defined]
        return value

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await self.machine.store_late()
        assert isinstance(key, CallKey), key
        self.data[key] = (value, self.machine.fake_now + (TTL if ttl is None else ttl))
        self.machine.stored(key.key[0], value)  # type: ignore[index]

    async def delete(self, key: Hashable) -> bool:
        if self.machine.yielding:
            await asyncio.sleep(0)
        found = self.peek(key) is not MISSING
        self.data.pop(key, None)
        return found

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass


class MemorySingleFlightCache(MemoryAsyncCache):
    """A MemoryAsyncCache that computes through get_or_compute, as a SingleFlightCache does:
    a key deleted while it computes is not stored (a delete starts a generation of its key, a
    clear one of every key)."""

    def __init__(self, machine: QueueModelMachine) -> None:
        super().__init__(machine)
        self.cleared = 0
        self.deleted: dict[Hashable, int] = {}

    def generation(self, key: Hashable) -> tuple[int, int]:
        return self.cleared, self.deleted.get(key, 0)

    async def delete(self, key: Hashable) -> bool:
        self.deleted[key] = self.deleted.get(key, 0) + 1
        return await super().delete(key)

    async def clear(self) -> None:
        self.cleared += 1
        await super().clear()

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        value = self.peek(key)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        generation = self.generation(key)
        result = await compute()
        await self.machine.store_late()
        if self.generation(key) == generation:  # checked and written in one step, as a script would
            assert isinstance(key, CallKey), key
            self.data[key] = (result, self.machine.fake_now + TTL)
            self.machine.stored(key.key[0], result)  # type: ignore[index]
        return result


class AsyncCacheMachine(DecoratorMachine):
    """Drives f(key) under @worker_queue with an AsyncCache (which may suspend)."""

    stored_by_worker = False
    async_cache = True
    stores_suspend = True

    def make_cache(self) -> Any:
        return MemoryAsyncCache(self)

    def flight_key(self, key: str) -> object:
        return CallKey("f", (key,))

    def real_cache(self) -> dict[str, Any]:
        assert not self.storing, f"results returned but never stored: {self.storing}"
        assert isinstance(self.cache, MemoryAsyncCache)
        found = {}
        for key in self.cache.data:
            value = self.cache.peek(key)
            if value is not MISSING:
                assert isinstance(key, CallKey)
                found[key.key[0]] = value
        return found

    @rule(key=keys, use_async=st.booleans())
    def invalidate(self, key: str, use_async: bool) -> None:
        """Invalidate one call: only acache_invalidate() works on an async cache."""
        if not use_async:
            with pytest.raises(TypeError, match="acache_invalidate"):
                self.f.cache_invalidate(key)
            return
        self.loop.run_until_complete(self.invalidation(key, everything=False))

    @rule(use_async=st.booleans())
    def clear(self, use_async: bool) -> None:
        """Empty the cache: only acache_clear() works on an async cache."""
        if not use_async:
            with pytest.raises(TypeError, match="acache_clear"):
                self.f.cache_clear()
            return
        self.loop.run_until_complete(self.invalidation("", everything=True))

    @precondition(lambda self: self.active)
    @rule(
        pick=st.integers(0, 7),
        everything=st.booleans(),
        during=st.lists(keys, max_size=3),
        then=st.sampled_from([None, "invalidate", "clear"]),
    )
    def invalidate_while_storing(
        self, pick: int, everything: bool, during: list[str], then: str | None
    ) -> None:
        """Invalidate a computation's key (or clear) once its callers have its result, while
        its store is still on its way; calls come in while the invalidation waits for that
        store, and (``then``) a second invalidation or clear overlaps the first. Once an
        invalidation returns, the value is gone and never stored again."""
        assert isinstance(self.cache, MemoryAsyncCache)
        comp = self.active[pick % len(self.active)]
        gate = self.store_gate = asyncio.Event()
        invalidating = []
        try:
            self.set_outcome(comp, fail=False, none=False)
            self.drive()
            late = [c for c in self.callers if c.joined is comp and not c.task.done()]
            assert not late, f"callers of #{comp.id} still wait while its store does: {late}"
            invalidating.append(self.loop.create_task(self.invalidation(comp.key, everything)))
            self.drive()
            self.start_calls(during)
            self.drive()
            if then is not None:
                second = self.invalidation(comp.key, everything=then == "clear")
                invalidating.append(self.loop.create_task(second))
                self.drive()
        finally:
            gate.set()
            self.store_gate = None
        self.drive()
        for task in invalidating:
            assert task.done(), "an invalidation never returned"
            task.result()

    def start_invalidation(self, key: str | None) -> asyncio.Task[None]:
        return self.loop.create_task(self.invalidation(key or "", everything=key is None))

    async def invalidation(self, key: str, everything: bool) -> None:
        """acache_invalidate(key) or acache_clear(), the model following each step: what the
        invalidation forgets as it starts, what it removed as it returns."""
        if everything:
            forgotten = [c for k in KEYS for c in self.forget(k)]
            await self.cleared_async()
            for k in list(self.cached):
                self.uncache(k)
        else:
            forgotten = self.forget(key)
            removed = await self.f.acache_invalidate(key)
            assert removed == self.uncache(key), f"acache_invalidate({key!r}) returned {removed}"
        self.forgotten_done(forgotten)

    @invariant()
    def cache_info_sizes(self) -> None:
        info = self.f.cache_info()
        assert (info.maxsize, info.currsize) == (None, None)


class SingleFlightMachine(AsyncCacheMachine):
    """As AsyncCacheMachine, with a cache that computes through get_or_compute."""

    forget_refuses_pending_store = True
    invalidate_while_storing = None  # type: ignore[assignment]
    """Its callers get a result only once get_or_compute has stored it."""

    def forget(self, key: str) -> list[Computation]:
        # A flight whose computation has not begun here (it claimed the key in the cache and
        # waits for a slot, or waits for the cache) is forgotten too: its outcome may come from
        # a computation that began before the invalidation. Its caller is recorded as its maker
        # now, while the table still maps the key to it.
        self.seen_making(key)
        table = self.queue_table()
        flight = table.flights.get(CallKey("f", (key,))) if table is not None else None
        if flight is not None and not flight.computing and flight.outcome is None:
            self.fenced.add(flight)
        return super().forget(key)

    def make_cache(self) -> Any:
        return MemorySingleFlightCache(self)


class DedupOnlyMachine(DecoratorMachine):
    """Drives f(key) under @worker_queue(cache=None): calls join, results are not kept."""

    caches_results = False

    def make_cache(self) -> None:
        return None


def test_decorator_machine() -> None:
    run_state_machine_as_test(DecoratorMachine)


def test_dedup_only_machine() -> None:
    run_state_machine_as_test(DedupOnlyMachine)


def test_async_cache_machine() -> None:
    run_state_machine_as_test(AsyncCacheMachine)


def test_single_flight_machine() -> None:
    run_state_machine_as_test(SingleFlightMachine)
