"""Invalidation wins, like singleflight's Forget: once cache_invalidate(), acache_invalidate(),
cache_clear() or acache_clear() has returned, no later call gets a computation that started
before it, and that computation's result is never stored."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import cachetools
import pytest

from wq_memo import worker_queue
from wq_memo.backends import MISSING

WAIT = 5.0


class Gated:
    """An async function of x whose n-th computation waits for gate n; results name the call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()

    async def __call__(self, x: int) -> str:
        n = len(self.calls)
        self.calls.append(x)
        gate = asyncio.Event()
        self.gates.append(gate)
        self.started.set()
        await gate.wait()
        return f"{x}#{n}"

    async def wait_started(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.calls) < count:  # noqa: ASYNC110 - every step yields to the callers
                await asyncio.sleep(0)


async def bounded(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


InvalidateSync = Callable[[Any], Any]


@pytest.mark.parametrize("how", ["cache_invalidate", "acache_invalidate", "clear", "aclear"])
@pytest.mark.parametrize(
    "make_cache", [dict, lambda: cachetools.LRUCache(10), lambda: cachetools.TTLCache(10, 60)]
)
async def test_a_call_after_an_invalidation_starts_afresh_and_the_old_result_is_not_stored(
    how: str, make_cache: Callable[[], Any]
) -> None:
    cache = make_cache()
    g = Gated()
    f = worker_queue(maxsize=4, cache=cache)(g)
    early = asyncio.create_task(f(1))
    await g.wait_started(1)
    if how == "cache_invalidate":
        assert f.cache_invalidate(1) is False  # nothing stored yet
    elif how == "acache_invalidate":
        assert await f.acache_invalidate(1) is False
    elif how == "clear":
        f.cache_clear()
    else:
        await f.acache_clear()
    late = asyncio.create_task(f(1))
    await g.wait_started(2)  # a second computation, not a join of the first
    g.gates[0].set()
    assert await bounded(early) == "1#0"  # joined before: the old result
    assert 1 not in cache  # and never stored
    g.gates[1].set()
    assert await bounded(late) == "1#1"
    assert cache[(1,)] == "1#1"
    assert await f(1) == "1#1"
    assert g.calls == [1, 1]


async def test_clear_forgets_every_computation_under_way() -> None:
    g = Gated()
    cache: dict[Hashable, Any] = {}
    f = worker_queue(maxsize=4, cache=cache)(g)
    early = [asyncio.create_task(f(x)) for x in (1, 2)]
    await g.wait_started(2)
    f.cache_clear()
    for gate in g.gates:
        gate.set()
    assert await bounded(asyncio.gather(*early)) == ["1#0", "2#1"]
    assert cache == {}


async def test_invalidating_another_key_forgets_nothing() -> None:
    g = Gated()
    cache: dict[Hashable, Any] = {}
    f = worker_queue(maxsize=4, cache=cache)(g)
    early = asyncio.create_task(f(1))
    await g.wait_started(1)
    assert f.cache_invalidate(2) is False
    joined = asyncio.create_task(f(1))
    g.gates[0].set()
    assert await bounded(asyncio.gather(early, joined)) == ["1#0", "1#0"]
    assert cache == {(1,): "1#0"}
    assert g.calls == [1]


async def test_an_item_still_waiting_for_a_slot_is_not_forgotten() -> None:
    # It has not started: it will compute from data as it is after the invalidation.
    g = Gated()
    cache: dict[Hashable, Any] = {}
    f = worker_queue(maxsize=1, cache=cache)(g)
    first = asyncio.create_task(f(1))
    await g.wait_started(1)
    waiting = asyncio.create_task(f(2))
    await asyncio.sleep(0)
    f.cache_invalidate(2)
    joined = asyncio.create_task(f(2))
    g.gates[0].set()
    await g.wait_started(2)
    g.gates[1].set()
    assert await bounded(asyncio.gather(first, waiting, joined)) == ["1#0", "2#1", "2#1"]
    assert cache == {(1,): "1#0", (2,): "2#1"}


class SlowStoreCache:
    """An AsyncCache whose set() is sent at once but lands only when ``landing`` is set."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.sending = asyncio.Event()
        self.landing = asyncio.Event()
        self.sets: list[Hashable] = []

    async def get(self, key: Hashable) -> Any:
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        self.sets.append(key)
        self.sending.set()
        await self.landing.wait()
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("how", ["acache_invalidate", "acache_clear"])
async def test_an_async_store_on_its_way_never_lands_after_the_invalidation(how: str) -> None:
    """The caller has its result while the store is still on its way: invalidating then must
    leave nothing behind, and report the entry it removed."""
    cache = SlowStoreCache()
    calls = 0

    @worker_queue(cache=cache, name="slow-store")
    async def f(x: int) -> str:
        nonlocal calls
        calls += 1
        return f"v{calls}"

    assert await bounded(f(1)) == "v1"
    async with asyncio.timeout(WAIT):
        await cache.sending.wait()
    invalidating = asyncio.create_task(
        f.acache_invalidate(1) if how == "acache_invalidate" else f.acache_clear()
    )
    await asyncio.sleep(0)
    assert not invalidating.done()  # it waits for the store already sent
    cache.landing.set()
    removed = await bounded(invalidating)
    if how == "acache_invalidate":
        assert removed is True
    for _ in range(5):
        await asyncio.sleep(0)
    assert cache.data == {}
    assert await bounded(f(1)) == "v2"


async def test_an_async_computation_invalidated_while_it_runs_is_not_stored() -> None:
    cache = SlowStoreCache()
    cache.landing.set()
    g = Gated()
    f = worker_queue(cache=cache, name="gated")(g)
    early = asyncio.create_task(f(1))
    await g.wait_started(1)
    assert await bounded(f.acache_invalidate(1)) is False
    late = asyncio.create_task(f(1))
    await g.wait_started(2)
    g.gates[0].set()
    assert await bounded(early) == "1#0"
    assert cache.sets == []  # the forgotten computation stores nothing
    g.gates[1].set()
    assert await bounded(late) == "1#1"
    assert list(cache.data.values()) == ["1#1"]


@pytest.mark.parametrize("first_cancelled", [False, True])
@pytest.mark.parametrize("second", ["acache_invalidate", "acache_clear", "acache_prime"])
async def test_every_overlapping_invalidation_waits_for_the_store_on_its_way(
    second: str, first_cancelled: bool
) -> None:
    """Two invalidations of one key overlap while the old result's store is on its way: the
    second, too, returns only once that store has landed and been removed, even when the first
    is cancelled meanwhile (a request timing out)."""
    cache = SlowStoreCache()
    calls = 0

    @worker_queue(cache=cache, name="overlapping-invalidations")
    async def f(x: int) -> str:
        nonlocal calls
        calls += 1
        return f"v{calls}"

    assert await bounded(f(1)) == "v1"
    async with asyncio.timeout(WAIT):
        await cache.sending.wait()
    first = asyncio.create_task(f.acache_invalidate(1))
    await asyncio.sleep(0)
    later: Awaitable[Any]
    if second == "acache_invalidate":
        later = f.acache_invalidate(1)
    elif second == "acache_clear":
        later = f.acache_clear()
    else:
        later = f.acache_prime("primed", 1)
    other = asyncio.ensure_future(later)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not first.done()
    assert not other.done()  # it waits for the store, like the first
    if first_cancelled:
        first.cancel()
    cache.landing.set()
    await bounded(other)
    assert await bounded(asyncio.gather(first, return_exceptions=True)) is not None
    expected = "primed" if second == "acache_prime" else MISSING
    assert await f.acache_peek(1) == expected
    for _ in range(5):
        await asyncio.sleep(0)
    assert await f.acache_peek(1) == expected  # the old store did not land afterwards
    assert await bounded(f(1)) == ("primed" if second == "acache_prime" else "v2")


class GatedDeleteCache(SlowStoreCache):
    """Its delete() is held open until ``deleting`` is set, like a DEL on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.landing.set()
        self.delete_sent = asyncio.Event()
        self.deleting = asyncio.Event()

        self.hold_reads = False
        self.reading = asyncio.Event()
        self.read_may_end = asyncio.Event()

    async def get(self, key: Hashable) -> Any:
        value = await super().get(key)
        if self.hold_reads:  # read, and the answer is on its way back
            self.reading.set()
            await self.read_may_end.wait()
        return value

    async def delete(self, key: Hashable) -> bool:
        self.delete_sent.set()
        await self.deleting.wait()
        return await super().delete(key)


async def test_a_lookup_begun_during_an_invalidation_is_not_shared_after_it() -> None:
    """A call made while the invalidation awaits its delete may read the old value; a call made
    after the invalidation returned must not share that read."""
    cache = GatedDeleteCache()
    calls = 0

    @worker_queue(cache=cache, name="lookup-during-invalidation")
    async def f(x: int) -> str:
        nonlocal calls
        calls += 1
        return f"v{calls}"

    assert await bounded(f(1)) == "v1"
    for _ in range(5):
        await asyncio.sleep(0)
    invalidating = asyncio.create_task(f.acache_invalidate(1))
    async with asyncio.timeout(WAIT):
        await cache.delete_sent.wait()
    cache.hold_reads = True
    during = asyncio.create_task(f(1))
    async with asyncio.timeout(WAIT):
        await cache.reading.wait()
    cache.hold_reads = False
    cache.deleting.set()
    assert await bounded(invalidating) is True
    after = asyncio.create_task(f(1))
    await asyncio.sleep(0)
    cache.read_may_end.set()
    assert await bounded(during) == "v1"  # concurrent with the invalidation: either is right
    assert await bounded(after) == "v2"
