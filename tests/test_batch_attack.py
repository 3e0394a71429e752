"""worker_queue.batch as services use it: what a batch function may do to its arguments, calls
it makes of itself, and the values it may return."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import cachetools

from wq_memo import disabled, worker_queue

WAIT = 5.0


async def bounded(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        return await awaitable


# -- the list of keys is the batch function's own -----------------------------------------------


async def test_a_batch_function_sorting_its_keys_in_place_gets_each_key_its_own_value() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> dict[int, str]:
        ids.sort()  # as a query wants them
        return {i: f"v{i}" for i in ids}

    assert await bounded(asyncio.gather(load(3), load(1), load(2))) == ["v3", "v1", "v2"]
    assert dict(load.cache) == {1: "v1", 2: "v2", 3: "v3"}  # type: ignore[arg-type]


async def test_a_batch_function_emptying_its_keys_still_answers_every_caller() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> dict[int, str]:
        answer = {i: f"v{i}" for i in ids}
        ids.clear()
        return answer

    assert await bounded(asyncio.gather(load(3), load(1))) == ["v3", "v1"]


async def test_a_sequence_is_aligned_with_the_keys_as_given_whatever_the_function_does() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> list[str]:
        answer = [f"v{i}" for i in ids]
        ids.pop()
        return answer

    assert await bounded(load.many([3, 1, 2])) == ["v3", "v1", "v2"]


async def test_with_caching_switched_off_a_sorted_list_of_keys_changes_nothing() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> list[str]:
        answer = [f"v{i}" for i in ids]
        ids.sort()
        return answer

    with disabled():
        assert await bounded(load.many([3, 1, 3, 2])) == ["v3", "v1", "v3", "v2"]
