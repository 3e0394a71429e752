"""Switching caching off: wq_memo.disabled() in one context, WQ_MEMO_DISABLE for the process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import cachetools
import pytest
from test_decorator_async_cache import MemoryAsyncCache, SingleFlightMemoryCache

from wq_memo import MISSING, CacheInfo, Memoized, disabled, worker_queue
from wq_memo._switch import SWITCH

WAIT = 5.0
ROOT = Path(__file__).resolve().parent.parent


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


def run_python(code: str, *, env_value: str | None) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (where wq_memo is first imported), with WQ_MEMO_DISABLE
    set to env_value (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "WQ_MEMO_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if env_value is not None:
        env["WQ_MEMO_DISABLE"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


COUNTING = textwrap.dedent(
    """
    import asyncio, os, sys
    {before}
    from wq_memo import worker_queue

    computed = []

    @worker_queue(cache={{}})
    async def f(x):
        computed.append(x)
        return x

    async def main():
        for _ in range(3):
            await f(1)
        os.environ.pop("WQ_MEMO_DISABLE", None)  # read at import: this changes nothing
        await f(1)
        info = f.cache_info()
        print(len(computed), info.hits, info.misses, info.bypassed)

    asyncio.run(main())
"""
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "1 3 1 0"),
        ("1", "4 0 0 4"),
        (" TRUE ", "4 0 0 4"),
        ("on", "4 0 0 4"),
        ("0", "1 3 1 0"),
        ("off", "1 3 1 0"),
    ],
)
def test_the_environment_variable_is_read_when_wq_memo_is_imported(
    value: str | None, expected: str
) -> None:
    done = run_python(COUNTING.format(before=""), env_value=value)
    assert done.stdout.split() == expected.split()
    assert "not understood" not in done.stderr


def test_a_value_not_understood_keeps_caching_on_and_warns_once() -> None:
    # The hook installed first refuses later ones, as a sandbox's would.
    refuse_hooks = """
    def refuse(event, args):
        if event == "sys.addaudithook":
            raise RuntimeError("no more audit hooks")

    sys.addaudithook(refuse)
    """
    code = COUNTING.format(before=textwrap.dedent(refuse_hooks)).replace("range(3)", "range(1000)")
    done = run_python(code, env_value="maybe")
    assert done.stdout.split() == ["1", "1000", "1", "0"]
    assert done.stderr.count("WQ_MEMO_DISABLE='maybe' is not understood") == 1, done.stderr
    assert "Set it to 1" in done.stderr


def test_importing_and_using_wq_memo_installs_no_audit_hook() -> None:
    spy = """
    added = []

    def spy(event, args):
        if event == "sys.addaudithook":
            added.append(event)

    sys.addaudithook(spy)
    import wq_memo.metrics, wq_memo.pytest_plugin
    """
    code = COUNTING.format(before=textwrap.dedent(spy)).replace(
        "asyncio.run(main())", "asyncio.run(main())\nprint(added)"
    )
    done = run_python(code, env_value="1")
    assert done.stdout.split()[-1] == "[]"


def test_cache_info_keeps_its_field_order() -> None:
    # New fields come after the old ones, so that positional reads keep working.
    assert CacheInfo._fields[:8] == (
        "hits",
        "misses",
        "joined",
        "maxsize",
        "currsize",
        "refreshes",
        "refresh_failures",
        "bypassed",
    )
    assert CacheInfo._fields[8:] == ("uncached", "stale")
    assert CacheInfo(0, 0, 0, None, None).bypassed == 0
