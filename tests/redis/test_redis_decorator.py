"""@worker_queue(cache=RedisCache(...)): the decorator computing through Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until, waiting_anywhere

from wq_memo import worker_queue
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]


class _Opaque:
    def __hash__(self) -> int:
        return 1


async def test_concurrent_calls_compute_once_and_land_in_redis(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache()
    calls = 0
    gate = asyncio.Event()

    @worker_queue(cache=cache, name="square")
    async def square(x: int, *, shift: int = 0) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return x * x + shift

    async with asyncio.timeout(10):
        tasks = [asyncio.create_task(square(3, shift=1)) for _ in range(20)]
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*tasks) == [10] * 20
        assert await square(3, shift=1) == 10
    assert calls == 1
    info = square.cache_info()
    assert info.hits + info.misses + info.joined == 21
    assert info.hits >= 1
    function = "square"
    name = key_names(cache.namespace, CallKey(function, cachetools.keys.hashkey(3, shift=1)))
    stored = sync_redis.get(name.value)
    assert stored[:4] == b"wq2j"  # JSON, after the 8-byte write time
    assert stored[12:] == b"10"


async def test_a_second_process_view_reads_the_first_ones_results(make_redis_cache: Make) -> None:
    results: list[str] = []

    def define(cache: RedisCache) -> Any:
        @worker_queue(cache=cache, name="greet")
        async def greet(name: str) -> str:
            results.append(name)
            return f"hello {name}"

        return greet

    first, second = define(make_redis_cache()), define(make_redis_cache())
    assert await first("a") == "hello a"
    assert await second("a") == "hello a"
    assert results == ["a"]


async def test_none_is_cached_and_exceptions_are_not(make_redis_cache: Make) -> None:
    calls: list[int] = []

    @worker_queue(cache=make_redis_cache(), name="maybe")
    async def maybe(x: int) -> int | None:
        calls.append(x)
        if x < 0:
            raise ValueError("negative")
        return None

    assert await maybe(1) is None
    assert await maybe(1) is None
    for _ in range(2):
        with pytest.raises(ValueError, match="negative"):
            await maybe(-1)
    assert calls == [1, -1, -1]


async def test_invalidate_and_clear(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    calls: list[int] = []

    @worker_queue(cache=cache, name="ident")
    async def ident(x: int) -> int:
        calls.append(x)
        return x

    for x in (1, 2, 1, 2):
        await ident(x)
    assert calls == [1, 2]
    assert await ident.acache_invalidate(1) is True
    assert await ident.acache_invalidate(1) is False
    await ident(1)
    assert calls == [1, 2, 1]
    await ident.acache_clear()
    await ident(1)
    await ident(2)
    assert calls == [1, 2, 1, 1, 2]


async def test_acache_clear_sets_the_counts_back_to_zero(make_redis_cache: Make) -> None:
    cache = make_redis_cache()

    @worker_queue(cache=cache, name="counted")
    async def counted(x: int) -> int:
        return x

    for x in (1, 1, 2):
        await counted(x)
    assert counted.cache_info()[:3] == (1, 2, 0)
    await counted.acache_clear()
    info = counted.cache_info()
    assert (info.hits, info.misses, info.joined, info.refreshes, info.bypassed) == (0,) * 5
    assert await counted(1) == 1
    assert counted.cache_info()[:3] == (0, 1, 0)  # computed again: the entry went too


async def test_functions_sharing_a_cache_have_separate_entries(make_redis_cache: Make) -> None:
    cache = make_redis_cache()

    @worker_queue(cache=cache, name="double")
    async def double(x: int) -> int:
        return 2 * x

    @worker_queue(cache=cache, name="triple")
    async def triple(x: int) -> int:
        return 3 * x

    assert (await double(5), await triple(5)) == (10, 15)
    assert (await double(5), await triple(5)) == (10, 15)


async def test_argument_without_canonical_encoding_says_pass_key(make_redis_cache: Make) -> None:
    @worker_queue(cache=make_redis_cache(), name="use")
    async def use(obj: Any) -> int:
        return 1

    with pytest.raises(TypeError, match="pass key="):
        await use(_Opaque())

    @worker_queue(cache=make_redis_cache(), key=lambda obj: id(obj), name="use_by_id")
    async def use_by_id(obj: Any) -> int:
        return 2

    assert await use_by_id(_Opaque()) == 2


async def test_results_json_cannot_hold_are_returned_uncached(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    calls = 0

    @worker_queue(cache=cache, name="pair")
    async def pair(x: int) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        return (x, x)

    assert await pair(1) == (1, 1)
    assert await pair(1) == (1, 1)
    assert calls == 2
    assert cache.stats().unencodable == 2
    signed = make_redis_cache(secret="k" * 32)

    @worker_queue(cache=signed, name="signed_pair")
    async def signed_pair(x: int) -> tuple[int, int]:
        return (x, x)

    assert await signed_pair(1) == (1, 1)
    assert await signed.get(CallKey("signed_pair", (1,))) == (1, 1)
    assert await cache.get(CallKey("nothing", ())) is MISSING


def _process(cache: RedisCache, release: asyncio.Event, started: list[int]) -> Any:
    """The same decorated function, as each process defines it, over its own RedisCache."""

    @worker_queue(cache=cache, maxsize=3, name="lookup")
    async def lookup(x: int) -> int:
        started.append(x)
        if x < 3:
            await release.wait()  # stands for a computation of 8 s
        else:
            await asyncio.sleep(0.05)
        return x * 10

    return lookup


async def test_waiting_for_another_process_takes_none_of_the_functions_slots(
    make_redis_cache: Make,
) -> None:
    release = asyncio.Event()
    in_a: list[int] = []
    in_b: list[int] = []
    cache_b = make_redis_cache()
    a = _process(make_redis_cache(), release, in_a)
    b = _process(cache_b, release, in_b)
    try:
        async with asyncio.timeout(20):
            slow_a = [asyncio.create_task(a(x)) for x in range(3)]
            await until(lambda: len(in_a) == 3)  # A computes the three slow keys
            slow_b = [asyncio.create_task(b(x)) for x in range(3)]  # B waits for A's
            await until(lambda: waiting_anywhere(cache_b) == 3)
            # An unrelated key in B, while B's three callers wait on A: it must not wait for
            # one of B's three slots.
            async with asyncio.timeout(1.0):
                assert await b(3) == 30
            release.set()
            assert await asyncio.gather(*slow_a, *slow_b) == [0, 10, 20] * 2
        assert in_b == [3]
    finally:
        release.set()
        await a.queue.aclose()
        await b.queue.aclose()


def test_a_computation_left_on_an_earlier_event_loop_stores_nothing(
    redis_url: str, redis_namespace: str
) -> None:
    """f(1) computes on one loop, which stops; f is called on a second loop (the queue moves
    there); then the first loop runs again and the computation ends: RedisCache, which stores
    whatever the computation returns, must store nothing, as the other caches do."""
    cache = RedisCache(redis_url, namespace=redis_namespace)
    release = asyncio.Event()
    began = asyncio.Event()

    @worker_queue(cache=cache, name="tests.redis.old_loop")
    async def f(k: int) -> str:
        if k == 1:
            began.set()
            await release.wait()
        return f"computed {k}"

    first = asyncio.new_event_loop()
    try:
        left = first.create_task(f(1))
        first.run_until_complete(asyncio.wait_for(began.wait(), 10))

        async def on_the_second_loop() -> object:
            assert await f(2) == "computed 2"
            return await f.acache_peek(1)

        assert asyncio.run(on_the_second_loop()) is MISSING
        release.set()
        assert first.run_until_complete(asyncio.wait_for(left, 10)) == "computed 1"

        async def afterwards() -> object:
            try:
                return await f.acache_peek(1)
            finally:
                await f.acache_clear()
                await f.queue.aclose()
                await cache.aclose()

        assert asyncio.run(afterwards()) is MISSING
    finally:
        first.run_until_complete(first.shutdown_asyncgens())
        first.close()
