"""@worker_queue: memoization, deduplication, the hit path, cache_info and invalidation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

import cachetools
import pytest
from cachetools.keys import hashkey, typedkey

from wq_memo import CacheInfo, QueueShutDown, WorkerQueue, worker_queue

WAIT = 5.0  # seconds; every wait in these tests is bounded by it


class Timer:
    """A clock for TTLCache that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


async def settle() -> None:
    """Let every ready task run until none is left ready (bounded)."""
    for _ in range(20):
        await asyncio.sleep(0)


# -- 1. bare and called use, parameters -----------------------------------------------------------


async def test_bare_use_caches_in_a_fresh_lru_cache_of_128() -> None:
    calls = 0

    @worker_queue
    async def double(x: int) -> int:
        nonlocal calls
        calls += 1
        return 2 * x

    assert await double(2) == 4
    assert await double(2) == 4
    assert calls == 1
    assert isinstance(double.cache, cachetools.LRUCache)
    assert double.cache.maxsize == 128
    assert double.queue.maxsize == 3
    assert double.queue.finish_timeout == 3.0

    @worker_queue
    async def other(x: int) -> int:
        return x

    assert other.cache is not double.cache


async def test_called_use_passes_every_parameter_through() -> None:
    cache: dict[Hashable, Any] = {}

    @worker_queue(maxsize=5, cache=cache, key=typedkey, finish_timeout=0.5)
    async def ident(x: object) -> object:
        return x

    assert await ident(1) == 1
    assert await ident(1.0) == 1.0
    assert len(cache) == 2  # typedkey tells 1 from 1.0
    assert ident.cache is cache
    assert ident.queue.maxsize == 5
    assert ident.queue.finish_timeout == 0.5


async def test_a_plain_dict_is_a_cache() -> None:
    cache: dict[Hashable, Any] = {}

    @worker_queue(cache=cache)
    async def f(x: int) -> int:
        return x + 1

    assert await f(1) == 2
    assert cache == {hashkey(1): 2}
    assert f.cache_info() == CacheInfo(hits=0, misses=1, joined=0, maxsize=None, currsize=1)


async def test_cache_none_deduplicates_but_does_not_cache() -> None:
    calls = 0
    gate = asyncio.Event()

    @worker_queue(cache=None)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return x

    tasks = [asyncio.create_task(f(1)) for _ in range(10)]
    await settle()
    gate.set()
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*tasks) == [1] * 10
    assert calls == 1
    async with asyncio.timeout(WAIT):
        assert await f(1) == 1
    assert calls == 2  # nothing was cached
    assert f.cache is None
    assert f.cache_info() == CacheInfo(hits=0, misses=2, joined=9, maxsize=None, currsize=0)


async def test_custom_key_function_decides_what_is_the_same_call() -> None:
    calls = 0

    @worker_queue(key=lambda user, *, verbose=False: user)
    async def get(user: str, *, verbose: bool = False) -> str:
        nonlocal calls
        calls += 1
        return user.upper()

    assert await get("ann") == "ANN"
    assert await get("ann", verbose=True) == "ANN"
    assert calls == 1


def test_rejects_a_cache_of_the_wrong_kind() -> None:
    async def f() -> None:
        pass

    with pytest.raises(TypeError, match="cache must be a MutableMapping"):
        worker_queue(cache=[1, 2])(f)  # type: ignore[call-overload]


def test_rejects_bad_queue_parameters_at_decoration() -> None:
    with pytest.raises(ValueError, match="maxsize"):

        @worker_queue(maxsize=0)
        async def f() -> None: ...


# -- 2. deduplication, exceptions, None ----------------------------------------------------------


async def test_concurrent_equal_calls_compute_once_and_share_the_result() -> None:
    calls = 0
    gate = asyncio.Event()

    @worker_queue
    async def f(x: int) -> list[int]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return [x]

    tasks = [asyncio.create_task(f(7)) for _ in range(100)]
    await settle()
    assert calls == 1
    gate.set()
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(*tasks)
    assert all(r is results[0] for r in results)
    assert calls == 1


async def test_an_exception_reaches_every_caller_and_is_not_cached() -> None:
    calls = 0
    gate = asyncio.Event()

    @worker_queue
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        if calls == 1:
            raise ValueError("first time fails")
        return x

    tasks = [asyncio.create_task(f(1)) for _ in range(5)]
    await settle()
    gate.set()
    async with asyncio.timeout(WAIT):
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert all(o is outcomes[0] for o in outcomes)  # the same exception object
    assert len(f.cache) == 0  # type: ignore[arg-type]
    async with asyncio.timeout(WAIT):
        assert await f(1) == 1
    assert calls == 2


async def test_none_is_cached_like_any_other_value() -> None:
    calls = 0

    @worker_queue
    async def f(x: int) -> int | None:
        nonlocal calls
        calls += 1
        return None

    assert await f(1) is None
    assert await f(1) is None
    assert calls == 1
    assert f.cache_info().hits == 1


# -- 3. the hit path -----------------------------------------------------------------------------


async def test_a_hit_returns_without_suspending_or_creating_a_task() -> None:
    @worker_queue
    async def f(x: int) -> int:
        return x * 10

    assert await f(3) == 30
    loop = asyncio.get_running_loop()
    created = 0
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
        nonlocal created
        created += 1
        if default_factory is not None:
            return default_factory(loop, coro, **kw)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(counting_factory)
    try:
        coro = f(3)
        # A hit finishes on its first step: it awaits no future, no queue, no task.
        with pytest.raises(StopIteration) as stop:
            coro.send(None)
        assert stop.value.value == 30
        for _ in range(100):
            assert await f(3) == 30
    finally:
        loop.set_task_factory(default_factory)
    assert created == 0


async def test_a_hit_is_served_even_while_the_queue_shuts_down() -> None:
    gate = asyncio.Event()

    @worker_queue(finish_timeout=WAIT)
    async def f(x: int) -> int:
        if x == 2:
            await gate.wait()
        return x

    assert await f(1) == 1
    slow = asyncio.create_task(f(2))
    await settle()
    closing = asyncio.create_task(f.queue.aclose())
    await settle()
    assert await f(1) == 1  # cached: no queue involved
    with pytest.raises(QueueShutDown):
        await f(3)
    gate.set()
    async with asyncio.timeout(WAIT):
        await closing
        assert await slow == 2


# -- 4. cache_info -------------------------------------------------------------------------------


async def test_cache_info_counts_hits_misses_and_joins_exactly() -> None:
    gate = asyncio.Event()

    @worker_queue(cache=cachetools.LRUCache(maxsize=10))
    async def f(x: int) -> int:
        await gate.wait()
        return x

    tasks = [asyncio.create_task(f(i % 3)) for i in range(12)]
    await settle()
    gate.set()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*tasks)
    for i in range(5):
        await f(i % 3)
    info = f.cache_info()
    assert info == CacheInfo(hits=5, misses=3, joined=9, maxsize=10, currsize=3)
    assert info.hits + info.misses + info.joined == 17


async def test_cache_info_currsize_follows_the_caches_own_size() -> None:
    @worker_queue(cache=cachetools.LRUCache(maxsize=100, getsizeof=len))
    async def f(x: str) -> str:
        return x * 3

    await f("ab")
    assert f.cache_info().currsize == 6
    assert f.cache_info().maxsize == 100


async def test_cache_clear_and_invalidate() -> None:
    calls = 0

    @worker_queue
    async def f(x: int, *, y: int = 0) -> int:
        nonlocal calls
        calls += 1
        return x + y

    await f(1)
    await f(2, y=1)
    assert f.cache_invalidate(2, y=1) is True
    assert f.cache_invalidate(2, y=1) is False
    assert f.cache_invalidate(2) is False  # never cached with these arguments
    await f(2, y=1)
    assert calls == 3
    f.cache_clear()
    assert f.cache_info().currsize == 0
    await f(1)
    assert calls == 4
    assert await f.acache_invalidate(1) is True
    await f.acache_clear()


# -- 5. expiry -----------------------------------------------------------------------------------


async def test_after_expiry_concurrent_callers_recompute_once() -> None:
    timer = Timer()
    calls = 0
    gate = asyncio.Event()

    @worker_queue(cache=cachetools.TTLCache(maxsize=10, ttl=60, timer=timer))
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    gate.set()
    assert await f(1) == 1
    timer.tick(30)
    assert await f(1) == 1  # still fresh
    timer.tick(31)
    gate.clear()
    tasks = [asyncio.create_task(f(1)) for _ in range(50)]
    await settle()
    assert calls == 2
    gate.set()
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*tasks) == [2] * 50
    assert calls == 2
    assert await f(1) == 2


# -- 6. a cache that refuses a value -------------------------------------------------------------


async def test_a_value_too_large_for_the_cache_is_returned_uncached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    @worker_queue(cache=cachetools.LRUCache(maxsize=3, getsizeof=len))
    async def f(n: int) -> str:
        nonlocal calls
        calls += 1
        return "x" * n

    with caplog.at_level(logging.INFO, logger="wq_memo"):
        assert await f(10) == "x" * 10
    assert "not cached" in caplog.text
    assert f.cache_info().currsize == 0
    assert await f(10) == "x" * 10
    assert calls == 2
    assert await f(2) == "xx"
    assert await f(2) == "xx"
    assert calls == 3


# -- 7. bad input --------------------------------------------------------------------------------


async def test_unhashable_arguments_name_the_function_and_suggest_key() -> None:
    @worker_queue
    async def lookup(ids: Any) -> int:
        return 1

    with pytest.raises(TypeError, match=r"lookup\(\).*pass key="):
        await lookup([1, 2])
    with pytest.raises(TypeError, match=r"lookup\(\).*pass key="):
        lookup.cache_invalidate([1, 2])

    @worker_queue(cache=None)
    async def dedup(ids: Any) -> int:
        return 1

    with pytest.raises(TypeError, match=r"dedup\(\).*pass key="):
        await dedup({"a": 1})


async def test_key_can_make_unhashable_arguments_usable() -> None:
    @worker_queue(key=lambda ids: tuple(ids))
    async def total(ids: list[int]) -> int:
        return sum(ids)

    assert await total([1, 2]) == 3
    assert total.cache_info().misses == 1
    assert await total([1, 2]) == 3
    assert total.cache_info().hits == 1


def test_decorating_a_plain_function_fails_at_decoration_time() -> None:
    def blocking(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="needs an async function"):
        worker_queue(blocking)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs an async function"):
        worker_queue(maxsize=2)(blocking)  # type: ignore[arg-type]


async def test_an_object_with_an_async_call_method_can_be_decorated() -> None:
    class Service:
        async def __call__(self, x: int) -> int:
            return x + 100

    f = worker_queue(Service())
    assert await f(1) == 101


# -- 8. methods ----------------------------------------------------------------------------------


class Repo:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    @worker_queue
    async def fetch(self, x: int) -> str:
        self.calls += 1
        await self.gate.wait()
        return f"{self.name}:{x}"

    @classmethod
    @worker_queue
    async def build(cls, x: int) -> str:
        return f"{cls.__name__}:{x}"

    @staticmethod
    @worker_queue
    async def pure(x: int) -> int:
        return x * x

    @worker_queue  # above @classmethod works too
    @classmethod
    async def build_outer(cls, x: int) -> str:
        return f"outer:{cls.__name__}:{x}"


async def test_methods_key_on_the_instance() -> None:
    a, b = Repo("a"), Repo("b")
    assert await a.fetch(1) == "a:1"
    assert await b.fetch(1) == "b:1"
    assert await a.fetch(1) == "a:1"
    assert (a.calls, b.calls) == (1, 1)
    assert Repo.fetch.cache_invalidate(a, 1) is True
    assert await a.fetch(1) == "a:1"
    assert a.calls == 2
    assert a.fetch.cache_info().hits >= 1  # attributes reachable through the bound method


async def test_concurrent_calls_on_one_instance_are_deduplicated() -> None:
    repo = Repo("r")
    repo.gate.clear()
    tasks = [asyncio.create_task(repo.fetch(9)) for _ in range(20)]
    await settle()
    repo.gate.set()
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*tasks) == ["r:9"] * 20
    assert repo.calls == 1


async def test_classmethods_and_staticmethods() -> None:
    # They work at run time; mypy cannot bind classmethod/staticmethod through the decorator's
    # protocol type, so these calls go through Any.
    repo: Any = Repo
    assert await repo.build(1) == "Repo:1"
    assert await repo("x").build(1) == "Repo:1"
    assert await repo.pure(4) == 16
    assert await repo("y").pure(4) == 16
    assert await repo.build_outer(2) == "outer:Repo:2"
    assert repo.pure.cache_info().hits == 1
    assert repo.build.cache_info() == CacheInfo(hits=1, misses=1, joined=0, maxsize=128, currsize=1)


# -- 10. metadata --------------------------------------------------------------------------------


def test_wraps_keeps_the_functions_metadata() -> None:
    async def get_user(user_id: int) -> str:
        """Fetch one user."""
        return str(user_id)

    f = worker_queue(get_user)
    assert f.__name__ == "get_user"
    assert f.__doc__ == "Fetch one user."
    assert f.__wrapped__ is get_user
    assert f.__qualname__ == get_user.__qualname__
    assert asyncio.iscoroutinefunction(f)


# -- 11. the queue's guarantees through the decorator ---------------------------------------------


async def test_maxsize_bounds_running_computations() -> None:
    running = peak = 0
    release = asyncio.Event()

    @worker_queue(maxsize=2)
    async def f(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return x

    tasks = [asyncio.create_task(f(i)) for i in range(9)]
    await settle()
    assert running == 2
    release.set()
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*tasks) == list(range(9))
    assert peak == 2


async def test_cancelling_one_caller_spares_the_computation_and_the_others() -> None:
    gate = asyncio.Event()
    started = asyncio.Event()
    calls = 0

    @worker_queue
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        return x

    first = asyncio.create_task(f(1))
    second = asyncio.create_task(f(1))
    async with asyncio.timeout(WAIT):
        await started.wait()
    await settle()
    first.cancel()
    await settle()
    assert first.cancelled()
    gate.set()
    async with asyncio.timeout(WAIT):
        assert await second == 1
    assert calls == 1


async def test_all_callers_cancelled_the_result_is_still_cached() -> None:
    gate = asyncio.Event()
    done = asyncio.Event()
    calls = 0

    @worker_queue
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        done.set()
        return x

    tasks = [asyncio.create_task(f(5)) for _ in range(3)]
    await settle()
    for t in tasks:
        t.cancel()
    await settle()
    gate.set()
    async with asyncio.timeout(WAIT):
        await done.wait()
    await settle()
    assert await f(5) == 5
    assert calls == 1
    assert f.cache_info().hits == 1


async def test_shutdown_lets_accepted_calls_finish_and_restarts_on_demand() -> None:
    gate = asyncio.Event()

    @worker_queue(finish_timeout=WAIT)
    async def f(x: int) -> int:
        await gate.wait()
        return x

    task = asyncio.create_task(f(1))
    await settle()
    assert f.queue.running
    closing = asyncio.create_task(worker_queue.aclose_all())
    await settle()
    assert not f.queue.running
    gate.set()
    async with asyncio.timeout(WAIT):
        await closing
        assert await task == 1
    assert f.cache_info().currsize == 1
    assert await f(2) == 2  # the queue starts again
    assert f.queue.running
    await f.queue.aclose()


async def test_worker_queue_aclose_all_is_the_queues() -> None:
    @worker_queue
    async def f(x: int) -> int:
        return x

    await f(1)
    assert f.queue.running
    await WorkerQueue.aclose_all()
    assert not f.queue.running
