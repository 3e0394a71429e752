"""Property tests of @worker_queue for what has no state: keys, argument shapes, values.

What the default key does: ``cachetools.keys.hashkey`` over the arguments *as spelled*, the way
``cachetools.cached`` does. Keyword order does not matter (f(x=1, y=2) is f(y=2, x=1)), and
equal arguments share an entry even across types (f(1), f(1.0) and f(True) are one entry). But
positional and keyword spellings, and spelled-out defaults, are different entries: f(1),
f(x=1) and f(1, 0) for ``async def f(x, y=0)`` are computed separately. ``typedkey`` also tells
1 from 1.0; a key function that binds the arguments to the signature makes every spelling of a
call one entry.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, TypeVar

import cachetools
import pytest
from cachetools.keys import hashkey, typedkey
from hypothesis import given
from hypothesis import strategies as st

from wq_memo import CacheInfo, worker_queue

# Hashable scalars that compare equal across types (1 == 1.0 == True), as calls do in practice.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 1.0, 2.5, -1.0]),
    st.text(max_size=2),
)
T = TypeVar("T")
arguments = st.lists(st.tuples(scalars, scalars), min_size=1, max_size=12)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one example on a fresh loop; fail at once if it can no longer make progress.

    Nothing here waits on a timer, so a loop with nothing ready to run and nothing scheduled
    while the example is unfinished is stuck for good (a lost wake-up, say): no need to wait
    out a timeout, which would make shrinking a failure very slow.
    """
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    try:
        for _ in range(100_000):
            loop.call_soon(loop.stop)
            loop.run_forever()
            if task.done():
                return task.result()
            if not loop._ready and not loop._scheduled:  # type: ignore[attr-defined]
                raise AssertionError("the calls wait for something that will never happen")
        raise AssertionError("the example did not finish")
    finally:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        tasks = asyncio.all_tasks(loop)
        while tasks:
            for t in tasks:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            tasks = asyncio.all_tasks(loop)
        loop.close()


def check_counts(info: CacheInfo, calls: int, computed: int) -> None:
    assert info.misses == computed
    assert info.hits + info.misses + info.joined == calls


@pytest.mark.parametrize(
    "key",
    [hashkey, typedkey, lambda a, b: (type(a).__name__, a)],
    ids=["hashkey", "typedkey", "custom"],
)
@given(calls=arguments)
def test_each_distinct_key_is_computed_once(
    key: Callable[..., Hashable], calls: list[tuple[Any, Any]]
) -> None:
    """Concurrent calls: one computation per distinct key; each call gets its key's result."""
    computed: list[tuple[Any, Any]] = []
    gate = asyncio.Event()

    @worker_queue(maxsize=3, cache=cachetools.LRUCache(1000), key=key)
    async def f(a: Any, b: Any) -> tuple[Any, Any, int]:
        computed.append((a, b))
        await gate.wait()
        return (a, b, len(computed))

    async def scenario() -> list[tuple[Any, Any, int]]:
        tasks = [asyncio.create_task(f(a, b)) for a, b in calls]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*tasks)

    results = run(scenario())
    first: dict[Hashable, tuple[Any, Any, int]] = {}
    for (a, b), result in zip(calls, results, strict=True):
        # Every call with this key got the result of the first call with this key.
        assert result is first.setdefault(key(a, b), result)
    assert len(computed) == len(first)
    check_counts(f.cache_info(), len(calls), len(first))
    # Asked again, every call is a hit and gets the very same object.
    before = f.cache_info()

    async def ask_again() -> list[tuple[Any, Any, int]]:
        return await asyncio.gather(*(f(a, b) for a, b in calls))

    again = run(ask_again())
    assert all(r is s for r, s in zip(again, results, strict=True))
    assert f.cache_info() == before._replace(hits=before.hits + len(calls))


@given(x=st.integers(-5, 5), y=st.integers(-5, 5))
def test_the_default_key_sees_calls_as_spelled(x: int, y: int) -> None:
    """f(x, y) and f(x, y=y) and f(x=x, y=y) are three entries; keyword order is not."""
    computed = 0

    @worker_queue(maxsize=2, cache=cachetools.LRUCache(100))
    async def f(x: int, y: int = 0) -> int:
        nonlocal computed
        computed += 1
        return x * 100 + y

    async def scenario() -> list[int]:
        return [
            await f(x, y),
            await f(x, y=y),
            await f(x=x, y=y),
            await f(y=y, x=x),  # same entry as the previous one: keyword order does not count
        ]

    assert run(scenario()) == [x * 100 + y] * 4
    assert computed == 3
    assert f.cache_info().hits == 1


@given(x=st.integers(-5, 5))
def test_the_default_key_does_not_fill_in_defaults(x: int) -> None:
    """f(x) and f(x, 0) for a default y=0 are two entries, as with cachetools.cached."""
    computed = 0

    @worker_queue(maxsize=2, cache=cachetools.LRUCache(100))
    async def f(x: int, y: int = 0) -> int:
        nonlocal computed
        computed += 1
        return x + y

    async def scenario() -> list[int]:
        return [await f(x), await f(x, 0), await f(x)]

    assert run(scenario()) == [x, x, x]
    assert computed == 2


def bound_key(func: Callable[..., Any]) -> Callable[..., Hashable]:
    """A key function making every spelling of a call to func one entry."""
    signature = inspect.signature(func)

    def key(*args: Any, **kwargs: Any) -> Hashable:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return hashkey(*bound.args, **bound.kwargs)

    return key


async def _add(x: int, y: int = 0, *, z: int = 0) -> int:
    return x + 10 * y + 100 * z


spellings = st.sampled_from(
    [
        lambda x, y, z: ((x, y), {"z": z}),
        lambda x, y, z: ((x,), {"y": y, "z": z}),
        lambda x, y, z: ((), {"x": x, "y": y, "z": z}),
        lambda x, y, z: ((), {"z": z, "y": y, "x": x}),
    ]
)


@given(
    calls=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 1), spellings),
        min_size=1,
        max_size=10,
    )
)
def test_a_key_bound_to_the_signature_merges_spellings(
    calls: list[tuple[int, int, int, Callable[[int, int, int], Any]]],
) -> None:
    """With key= binding to the signature, one computation per logical call."""
    computed: list[tuple[int, int, int]] = []

    async def add(x: int, y: int = 0, *, z: int = 0) -> int:
        computed.append((x, y, z))
        return await _add(x, y, z=z)

    f = worker_queue(maxsize=3, cache=cachetools.LRUCache(100), key=bound_key(add))(add)

    async def scenario() -> list[int]:
        coros = []
        for x, y, z, spell in calls:
            args, kwargs = spell(x, y, z)
            coros.append(f(*args, **kwargs))
        return await asyncio.gather(*coros)

    results = run(scenario())
    assert results == [x + 10 * y + 100 * z for x, y, z, _ in calls]
    assert sorted(computed) == sorted({(x, y, z) for x, y, z, _ in calls})


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=3),  # unhashable results are fine: only keys are hashed
    st.just(0.0),
    st.just(""),
)


@pytest.mark.parametrize("cache_kind", ["lru", "dict", "none"])
@given(value=values, repeats=st.integers(1, 4))
def test_any_value_is_returned_and_cached_as_is(
    cache_kind: str, value: object, repeats: int
) -> None:
    """None and other falsy results are cached like any other; the same object comes back."""
    computed = 0
    cache: Any = {"lru": cachetools.LRUCache(10), "dict": {}, "none": None}[cache_kind]

    @worker_queue(maxsize=1, cache=cache)
    async def f(k: int) -> object:
        nonlocal computed
        computed += 1
        return value

    async def scenario() -> list[object]:
        return [await f(1) for _ in range(repeats)]

    results = run(scenario())
    assert all(r is value for r in results)
    if cache is None:
        assert computed == repeats  # deduplication only: one after another, each computes
        check_counts(f.cache_info(), repeats, repeats)
    else:
        assert computed == 1
        assert f.cache_info() == CacheInfo(repeats - 1, 1, 0, getattr(cache, "maxsize", None), 1)


@given(value=values)
def test_none_cached_also_answers_concurrent_callers(value: object) -> None:
    """Concurrent callers of a computation returning None all get None; it is computed once."""
    computed = 0
    gate = asyncio.Event()

    @worker_queue(maxsize=1, cache=cachetools.LRUCache(10))
    async def f(k: int) -> object:
        nonlocal computed
        computed += 1
        await gate.wait()
        return value

    async def scenario() -> list[object]:
        tasks = [asyncio.create_task(f(7)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        return [*await asyncio.gather(*tasks), await f(7)]

    assert all(r is value for r in run(scenario()))
    assert computed == 1
    assert f.cache_info()[:3] == (1, 1, 2)


@given(arg=st.lists(st.integers(), max_size=3))
def test_unhashable_arguments_ask_for_a_key_function(arg: list[int]) -> None:
    @worker_queue
    async def f(x: list[int]) -> int:
        return sum(x)

    with pytest.raises(TypeError, match="pass key="):
        run(f(arg))

    @worker_queue(key=lambda x: tuple(x))
    async def g(x: list[int]) -> int:
        return sum(x)

    assert run(g(arg)) == sum(arg)
