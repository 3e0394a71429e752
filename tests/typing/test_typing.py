"""Typing checks: mypy --strict runs over this file in CI; pytest runs it as well.

Each ``# type: ignore[...]`` marks a call that must be a type error: with warn_unused_ignores,
mypy fails the build if one of them stops being an error.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

from wq_memo import BoundMemoized, CachedError, CacheInfo, Memoized, WorkerQueue, worker_queue
from wq_memo.backends import Missing


@worker_queue
async def bare(x: int, *, name: str = "") -> str:
    return f"{name}{x}"


@worker_queue(maxsize=2, cache=None)
async def called(x: int) -> list[int]:
    return [x]


class Service:
    @worker_queue
    async def fetch(self, key: str) -> bytes:
        return key.encode()

    @worker_queue(cache={})
    async def scaled(self, *, value: int) -> int:
        return value


@worker_queue(cache={})
async def valued(value: int, *, times: int = 1) -> int:
    return value * times


@worker_queue(cache={})
async def keyword_valued(*, value: int) -> str:
    return str(value)


async def test_signatures_survive_decoration() -> None:
    memoized: Memoized[[int], list[int]] = called
    assert memoized is called
    assert_type(await bare(1, name="n"), str)
    assert_type(await called(1), list[int])
    coro = bare(1)
    assert assert_type(coro, Coroutine[Any, Any, str]) is coro
    assert await coro == "1"
    assert_type(bare.cache_info(), CacheInfo)
    assert_type(bare.queue, WorkerQueue[Any, Any])
    assert_type(bare.cache_invalidate(1), bool)

    service = Service()
    bound: BoundMemoized[[str], bytes] = service.fetch
    assert bound.cache_info().misses == 0
    assert_type(await service.fetch("k"), bytes)
    assert_type(Service.fetch.cache_invalidate(service, "k"), bool)


async def test_per_call_controls_keep_the_signature() -> None:
    assert_type(await bare.refresh(1, name="n"), str)
    bare.cache_prime("v", 1, name="n")
    assert_type(bare.cache_peek(1, name="n"), str | Missing | CachedError)
    await bare.acache_prime("w", 1)
    assert_type(await bare.acache_peek(1), str | Missing | CachedError)
    service = Service()
    assert_type(await service.fetch.refresh("k"), bytes)
    service.fetch.cache_prime(b"v", "k")
    assert_type(service.fetch.cache_peek("k"), bytes | Missing | CachedError)


async def test_a_parameter_named_value_can_be_primed() -> None:
    # The primed value is positional-only: a parameter of the function named value is free.
    valued.cache_prime(6, value=3, times=2)
    await valued.acache_prime(7, value=7)
    keyword_valued.cache_prime("4", value=4)
    await keyword_valued.acache_prime("5", value=5)
    service = Service()
    service.scaled.cache_prime(8, value=8)
    await service.scaled.acache_prime(9, value=9)
    assert await keyword_valued(value=4) == "4"
    assert await service.scaled(value=9) == 9


async def wrong_calls() -> None:
    """Never run: each line must be rejected by mypy (see the module docstring)."""
    await bare("one")  # type: ignore[arg-type]
    await bare(1, name=2)  # type: ignore[arg-type]
    await called()  # type: ignore[call-arg]
    await Service().fetch(1)  # type: ignore[arg-type]
    wrong: int = await bare(1)  # type: ignore[assignment]
    print(wrong)
    bare.cache_prime(1, 1)  # type: ignore[arg-type]
    await bare.refresh("one")  # type: ignore[arg-type]
    Service().fetch.cache_prime("not bytes", "k")  # type: ignore[arg-type]
    bare.cache_prime(value="v", x=1)  # type: ignore[call-arg]
    keyword_valued.cache_prime(value=4)  # type: ignore[call-arg]


def test_worker_queue_is_generic() -> None:
    async def work(item: str) -> int:
        return len(item)

    async def get(item: str) -> int | None:
        return None

    async def put(item: str, value: int) -> None:
        pass

    queue = WorkerQueue(work, get, put)
    assert_type(queue, WorkerQueue[str, int])
