"""Memoized recursion works with any maxsize, each argument computed once; a call that depends
on itself fails fast with RecursionError; top-level calls stay bounded by maxsize."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import pytest

from wq_memo import MISSING, WorkerQueue, worker_queue
from wq_memo.backends import CallKey, SingleFlightCache

V = TypeVar("V")

WAIT = 5.0


@pytest.mark.parametrize("maxsize", [1, 3])
async def test_fibonacci_is_computed_once_per_argument(maxsize: int) -> None:
    computed: Counter[int] = Counter()

    @worker_queue(maxsize=maxsize, cache={})
    async def fib(n: int) -> int:
        computed[n] += 1
        if n < 2:
            return n
        return await fib(n - 1) + await fib(n - 2)

    async with asyncio.timeout(WAIT):
        assert await fib(30) == 832040
    assert computed == Counter(range(31))


async def test_a_computation_awaiting_another_key_with_one_slot_finishes() -> None:
    @worker_queue(maxsize=1, cache=None)
    async def f(key: str) -> str:
        if key == "a":
            return "a+" + await f("b")
        return key

    async with asyncio.timeout(WAIT):
        assert await f("a") == "a+b"


async def test_nested_calls_in_parallel_from_one_computation_finish() -> None:
    computed: Counter[tuple[int, str]] = Counter()

    @worker_queue(maxsize=1, cache={})
    async def f(n: int, tag: str) -> int:
        computed[n, tag] += 1
        if n == 0:
            return 1
        parts = await asyncio.gather(f(n - 1, "a"), f(n - 1, "a"), f(n - 1, "b"))
        return sum(parts)

    async with asyncio.timeout(WAIT):
        assert await f(4, "a") == 3**4
    assert set(computed.values()) == {1}


async def test_a_nested_call_of_an_item_waiting_in_line_runs_it_at_once() -> None:
    """A top-level caller queued 'b'; the running computation of 'a' then needs 'b'."""
    gate = asyncio.Event()
    order: list[str] = []

    @worker_queue(maxsize=1, cache={})
    async def f(key: str) -> str:
        order.append(key)
        if key == "a":
            await gate.wait()
            return "a+" + await f("b")
        return key

    a = asyncio.create_task(f("a"))
    await asyncio.sleep(0)
    b = asyncio.create_task(f("b"))  # waits in line behind 'a'
    await asyncio.sleep(0)
    gate.set()
    async with asyncio.timeout(WAIT):
        assert list(await asyncio.gather(a, b)) == ["a+b", "b"]
    assert order == ["a", "b"]


async def test_a_computation_requiring_its_own_key_fails_fast() -> None:
    @worker_queue(cache={})
    async def f(key: str) -> str:
        return await f(key)

    with pytest.raises(RecursionError, match="depends on itself"):
        async with asyncio.timeout(WAIT):
            await f("a")
    assert f.cache == {}


async def test_a_cycle_through_other_keys_fails_fast_for_every_caller() -> None:
    @worker_queue(maxsize=1, cache={})
    async def f(key: str) -> str:
        nxt = {"a": "b", "b": "c", "c": "a"}[key]
        return key + await f(nxt)

    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(f("a"), f("a"), return_exceptions=True)
    assert all(isinstance(r, RecursionError) for r in results)


async def test_a_cycle_through_two_memoized_functions_fails_fast() -> None:
    @worker_queue(cache={})
    async def f(key: str) -> str:
        return await g(key)

    @worker_queue(cache={})
    async def g(key: str) -> str:
        return await f(key)

    with pytest.raises(RecursionError):
        async with asyncio.timeout(WAIT):
            await f("x")


async def test_top_level_calls_stay_bounded_while_computations_recurse() -> None:
    running = peak = 0
    release = asyncio.Event()

    @worker_queue(maxsize=2, cache={})
    async def f(n: int) -> int:
        nonlocal running, peak
        if n >= 100:  # a nested call: runs in its caller's slot
            return n
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            return await f(n + 100)
        finally:
            running -= 1

    tasks = [asyncio.create_task(f(i)) for i in range(6)]
    async with asyncio.timeout(WAIT):
        while running < 2:  # noqa: ASYNC110
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert running == 2
        release.set()
        assert await asyncio.gather(*tasks) == [i + 100 for i in range(6)]
    assert peak == 2


async def test_worker_queue_recursion_through_require() -> None:
    store: dict[int, int] = {}

    async def cache_get(n: int) -> int | None:
        return store.get(n)

    async def cache_set(n: int, value: int) -> None:
        store[n] = value

    async def worker(n: int) -> int:
        if n < 2:
            return n + 1
        return await queue.require(n - 1) + await queue.require(n - 2)

    queue: WorkerQueue[int, int] = WorkerQueue(worker, cache_get, cache_set, maxsize=1)
    async with asyncio.timeout(WAIT):
        assert await queue.require(20) == 17711


@pytest.mark.skipif(not hasattr(asyncio, "eager_task_factory"), reason="eager tasks are 3.12+")
async def test_deep_recursion_under_an_eager_task_factory_does_not_pile_up_the_stack() -> None:
    """Nested calls never start eagerly, whatever the loop's task factory: each would run its
    first step on the stack of its caller, and a chain 3,000 deep would overflow it."""
    loop = asyncio.get_running_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    try:

        @worker_queue(maxsize=3, cache={})
        async def depth(n: int) -> int:
            return 0 if n == 0 else 1 + await depth(n - 1)

        async with asyncio.timeout(WAIT):
            assert await depth(3000) == 3000
    finally:
        loop.set_task_factory(None)


async def test_a_nested_computation_outliving_its_caller_keeps_its_slot() -> None:
    """'p' starts 'c' (which runs in p's slot) and returns without waiting for it: 'c' then
    holds the slot itself, so with maxsize=1 no other computation starts until it ends."""
    c_may_end = asyncio.Event()
    started: list[str] = []
    background: list[asyncio.Future[str]] = []

    @worker_queue(maxsize=1, cache=None)
    async def f(key: str) -> str:
        started.append(key)
        if key == "p":
            background.append(asyncio.ensure_future(f("c")))
            await asyncio.sleep(0)  # c starts, in p's slot
        elif key == "c":
            await c_may_end.wait()
        return key

    async with asyncio.timeout(WAIT):
        assert await f("p") == "p"
        assert started == ["p", "c"]
        x = asyncio.ensure_future(f("x"))
        for _ in range(10):
            await asyncio.sleep(0)
        assert started == ["p", "c"], "x started while c still held the only slot"
        assert f.queue.computing == 1
        c_may_end.set()
        assert await background[0] == "c"
        assert await x == "x"
    assert started == ["p", "c", "x"]


async def test_a_wait_given_up_is_no_longer_part_of_a_cycle() -> None:
    """'p' awaited 'q' and gave up (cancelled its wait); 'q' may then await 'p' without a
    RecursionError: 'p' no longer waits for it."""
    p_gave_up = asyncio.Event()
    q_joined = asyncio.Event()
    seen: list[object] = []

    @worker_queue(maxsize=1, cache=None)
    async def f(key: str) -> str:
        if key == "p":
            wait = asyncio.ensure_future(f("q"))
            await asyncio.sleep(0)  # q starts; p now waits for it
            wait.cancel()
            p_gave_up.set()
            await q_joined.wait()
            return "P"
        await p_gave_up.wait()
        q_joined.set()
        try:
            seen.append(await f("p"))
        except RecursionError as exc:
            seen.append(exc)
        return "Q"

    async with asyncio.timeout(WAIT):
        assert await f("p") == "P"
        for _ in range(10):
            if seen:
                break
            await asyncio.sleep(0)
    assert seen == ["P"]


class SingleFlightMemoryCache:
    """A single-flight cache over a dict, counting its computations."""

    def __init__(self) -> None:
        self.data: dict[Hashable, Any] = {}
        self.computed = 0

    async def get(self, key: Hashable) -> Any:
        return self.data.get(key, MISSING)

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        self.data[key] = value

    async def delete(self, key: Hashable) -> bool:
        return self.data.pop(key, MISSING) is not MISSING

    async def clear(self) -> None:
        self.data.clear()

    async def aclose(self) -> None:
        pass

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        if key in self.data:
            found: V = self.data[key]
            return found
        self.computed += 1
        value = await compute()
        self.data[key] = value
        return value


async def test_recursion_through_a_single_flight_cache_runs_in_the_callers_slot() -> None:
    cache = SingleFlightMemoryCache()
    assert isinstance(cache, SingleFlightCache)

    @worker_queue(maxsize=1, cache=cache, name="tests.recursion.single_flight_fib")
    async def fib(n: int) -> int:
        return n if n < 2 else await fib(n - 1) + await fib(n - 2)

    async with asyncio.timeout(WAIT):
        assert await fib(15) == 610
    assert cache.computed == 16


class HeldSingleFlightCache(SingleFlightMemoryCache):
    """As SingleFlightMemoryCache, holding the computation of each call whose arguments are in
    ``held`` until its event is set: the key is claimed, its computation has not asked for a
    slot yet."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[Hashable, asyncio.Event] = {}
        self.claimed: dict[Hashable, asyncio.Event] = {}

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        args = key.key if isinstance(key, CallKey) else key
        if args in self.held:
            self.claimed.setdefault(args, asyncio.Event()).set()
            await self.held[args].wait()
        return await super().get_or_compute(key, compute)


async def test_a_nested_call_joining_a_claimed_key_before_it_asks_for_a_slot_lends_its_own() -> (
    None
):
    # "a" is claimed by a caller of its own, its computation held before it asks for a slot;
    # "b" takes the only slot and awaits "a". When "a" asks for a slot, the one it needs is
    # b's, which b lends it: before, a waited for that slot and b for a, for ever.
    cache = HeldSingleFlightCache()
    cache.held[("a",)] = release_a = asyncio.Event()
    b_awaits_a = asyncio.Event()

    @worker_queue(maxsize=1, cache=cache, name="tests.recursion.nested_before_slot")
    async def f(key: str) -> str:
        if key == "b":
            nested = asyncio.ensure_future(f("a"))
            await asyncio.sleep(0)  # the nested call joins a's flight
            b_awaits_a.set()
            return "b" + await nested
        return key

    async with asyncio.timeout(WAIT):
        first_a = asyncio.ensure_future(f("a"))
        await cache.claimed.setdefault(("a",), asyncio.Event()).wait()
        b = asyncio.ensure_future(f("b"))
        await b_awaits_a.wait()
        assert f.queue.computing == 1, "b holds the only slot"
        release_a.set()
        assert await b == "ba"
        assert await first_a == "a"
    assert cache.computed == 2
