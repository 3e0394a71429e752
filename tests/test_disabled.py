"""Switching caching off: wq_memo.disabled() in one context, WQ_MEMO_DISABLE for the process."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import cachetools
import pytest
from test_decorator_async_cache import MemoryAsyncCache, SingleFlightMemoryCache

from wq_memo import MISSING, CacheInfo, Memoized, disabled, worker_queue
from wq_memo._switch import SWITCH

WAIT = 5.0


def dict_cache() -> Any:
    return {}


def lru_cache() -> Any:
    return cachetools.LRUCache(maxsize=16)


def no_cache() -> Any:
    return None


def async_cache() -> Any:
    return MemoryAsyncCache()


def single_flight_cache() -> Any:
    return SingleFlightMemoryCache()


CACHES: dict[str, Callable[[], Any]] = {
    "dict": dict_cache,
    "LRUCache": lru_cache,
    "none": no_cache,
    "async": async_cache,
    "single-flight": single_flight_cache,
}


class Counted:
    """A memoized function over the given cache that counts its computations by argument."""

    def __init__(self, cache: Any, **options: Any) -> None:
        self.computed: list[Hashable] = []

        @worker_queue(cache=cache, name="counted", **options)
        async def f(x: int, *, tag: str = "") -> tuple[int, str, int]:
            self.computed.append(x)
            return (x, tag, len(self.computed))

        self.f: Memoized[..., tuple[int, str, int]] = f


@pytest.fixture(autouse=True)
def nothing_switched_off() -> Iterator[None]:
    """Each test starts and must end with caching on everywhere."""
    assert not SWITCH.watch
    yield
    assert not SWITCH.watch, "a test left caching switched off"


async def stored(f: Memoized[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await f.acache_peek(*args, **kwargs)


@pytest.mark.parametrize("make_cache", CACHES.values(), ids=CACHES.keys())
@pytest.mark.parametrize(
    "options", [{}, {"key": cachetools.keys.typedkey}], ids=["hashkey", "typed"]
)
async def test_calls_inside_disabled_run_the_function_and_store_nothing(
    make_cache: Callable[[], Any], options: dict[str, Any]
) -> None:
    c = Counted(make_cache(), **options)
    first = await c.f(1)
    before = c.f.cache_info()
    with disabled():
        again = await c.f(1)  # cached outside: computed anyway
        fresh = await c.f(2, tag="t")  # not cached: computed, not stored
    assert again != first
    assert fresh == (2, "t", 3)
    assert c.computed == [1, 1, 2]
    assert await stored(c.f, 2, tag="t") is MISSING
    info = c.f.cache_info()
    assert info._replace(bypassed=0) == before
    assert info.bypassed == 2


async def test_async_with_and_nesting() -> None:
    c = Counted(dict_cache())
    await c.f(1)
    async with disabled():
        with disabled():
            await c.f(1)
        await c.f(1)  # the outer scope is still open
    await c.f(1)  # a hit again
    assert c.computed == [1, 1, 1]
    assert c.f.cache_info().bypassed == 2
    assert c.f.cache_info().hits == 1


async def test_refresh_ahead_function_inside_disabled() -> None:
    clock = [0.0]
    cache = cachetools.TTLCache[Hashable, Any](maxsize=8, ttl=10, timer=lambda: clock[0])
    c = Counted(cache, refresh_after=5)
    await c.f(1)
    clock[0] = 6  # due for a refresh: a hit would start one
    with disabled():
        await c.f(1)
    assert c.f.queue.computing == 0
    assert c.f.cache_info().refreshes == 0
    assert c.computed == [1, 1]


async def test_calls_inside_disabled_are_not_deduplicated() -> None:
    gate = asyncio.Event()
    both = asyncio.Event()
    started: list[int] = []

    @worker_queue(cache={})
    async def f(x: int) -> int:
        started.append(x)
        if len(started) == 2:
            both.set()
        await gate.wait()
        return x

    with disabled():
        calls = [asyncio.create_task(f(1)) for _ in range(2)]
        async with asyncio.timeout(WAIT):
            await both.wait()
            gate.set()
            assert await asyncio.gather(*calls) == [1, 1]
    info = f.cache_info()
    assert (info.misses, info.joined, info.bypassed, info.currsize) == (0, 0, 2, 0)


async def test_other_tasks_keep_caching_while_a_scope_is_open() -> None:
    c = Counted(dict_cache())
    await c.f(1)
    inside = asyncio.Event()
    done = asyncio.Event()

    async def disabled_task() -> tuple[int, str, int]:
        with disabled():
            inside.set()
            await done.wait()
            return await c.f(1)

    task = asyncio.create_task(disabled_task())
    async with asyncio.timeout(WAIT):
        await inside.wait()
        assert SWITCH.watch
        assert await c.f(1) == (1, "", 1)  # a hit, in this task
        done.set()
        assert await task == (1, "", 2)
    info = c.f.cache_info()
    assert (info.hits, info.misses, info.bypassed) == (1, 1, 1)


async def test_a_task_started_inside_a_scope_caches_again_once_the_scope_closes() -> None:
    c = Counted(dict_cache())
    await c.f(1)
    go = asyncio.Event()
    first = asyncio.Event()
    results: list[tuple[int, str, int]] = []

    async def child() -> None:
        results.append(await c.f(1))  # the scope is open: bypassed
        first.set()
        await go.wait()
        results.append(await c.f(1))  # the scope has closed: a hit

    with disabled():
        task = asyncio.create_task(child())
        async with asyncio.timeout(WAIT):
            await first.wait()
    go.set()
    async with asyncio.timeout(WAIT):
        await task
    assert results == [(1, "", 2), (1, "", 1)]


async def test_a_scope_is_entered_once() -> None:
    scope = disabled()
    with scope, pytest.raises(RuntimeError, match="call disabled\\(\\) again"):
        scope.__enter__()


async def test_an_exception_leaves_the_scope() -> None:
    with pytest.raises(ZeroDivisionError), disabled():
        1 / 0  # noqa: B018
    assert not SWITCH.watch


async def test_methods_are_bypassed_too() -> None:
    computed: list[int] = []

    class Box:
        @worker_queue
        async def get(self, x: int) -> int:
            computed.append(x)
            return x

    box = Box()
    await box.get(1)
    with disabled():
        assert await box.get(1) == 1
    await box.get(1)
    assert computed == [1, 1]
    assert box.get.cache_info().bypassed == 1


async def test_the_controls_still_work_inside_a_scope() -> None:
    c = Counted(dict_cache())
    with disabled():
        c.f.cache_prime((9, "", 9), 1)
        assert c.f.cache_peek(1) == (9, "", 9)
        assert await c.f.refresh(2) == (2, "", 1)
    assert await c.f(2) == (2, "", 1)  # refresh() stored it
    assert await c.f(1) == (9, "", 9)


# -- the environment variable -------------------------------------------------------------------


async def test_the_environment_variable_is_read_at_call_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = Counted(lru_cache())
    await c.f(1)
    monkeypatch.setenv("WQ_MEMO_DISABLE", "1")
    assert SWITCH.watch
    await c.f(1)
    monkeypatch.setenv("WQ_MEMO_DISABLE", "0")
    await c.f(1)  # a hit
    monkeypatch.setenv("WQ_MEMO_DISABLE", " TRUE ")
    await c.f(1)
    monkeypatch.delenv("WQ_MEMO_DISABLE")
    await c.f(1)  # a hit
    assert c.computed == [1, 1, 1]
    info = c.f.cache_info()
    assert (info.hits, info.misses, info.bypassed) == (2, 1, 2)


async def test_the_environment_variable_affects_every_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = Counted(dict_cache())
    await c.f(1)
    monkeypatch.setenv("WQ_MEMO_DISABLE", "yes")
    results = await asyncio.gather(*(asyncio.create_task(c.f(1)) for _ in range(3)))
    assert sorted(r[2] for r in results) == [2, 3, 4]
    monkeypatch.delenv("WQ_MEMO_DISABLE")


async def test_a_value_not_understood_keeps_caching_on_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = Counted(dict_cache())
    await c.f(1)
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        monkeypatch.setenv("WQ_MEMO_DISABLE", "maybe")
    assert "WQ_MEMO_DISABLE='maybe' is not understood" in caplog.text
    assert "Set it to 1" in caplog.text
    await c.f(1)
    assert c.computed == [1]
    monkeypatch.delenv("WQ_MEMO_DISABLE")


async def test_without_the_audit_hook_every_call_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = Counted(dict_cache())
    await c.f(1)
    monkeypatch.setattr(SWITCH, "hooked", False)
    SWITCH.scopes(0)  # recompute the flag as install() would have
    assert SWITCH.watch
    await c.f(1)  # a hit, read through the slow check
    os.environ["WQ_MEMO_DISABLE"] = "1"
    SWITCH.env_changed(None)  # as if no hook had seen the change
    try:
        await c.f(1)
    finally:
        del os.environ["WQ_MEMO_DISABLE"]
    monkeypatch.undo()
    SWITCH.scopes(0)
    assert c.computed == [1, 1]


def test_cache_info_keeps_its_field_order() -> None:
    assert CacheInfo._fields[-1] == "bypassed"
    assert CacheInfo(0, 0, 0, None, None).bypassed == 0
