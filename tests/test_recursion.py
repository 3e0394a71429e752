"""Memoized recursion works with any maxsize, each argument computed once; a call that depends
on itself fails fast with RecursionError; top-level calls stay bounded by maxsize."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from wq_memo import WorkerQueue, worker_queue

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
