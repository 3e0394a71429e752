"""worker_queue.batch as services use it: what a batch function may do to its arguments, calls
it makes of itself, and the values it may return."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, Mapping
from typing import Any

import cachetools
import pytest

from wq_memo import MISSING, disabled, worker_queue
from wq_memo._batch import check as check_batches

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


# -- a batch function calling itself ---------------------------------------------------------------


@pytest.mark.parametrize("maxsize", [1, 2])
async def test_a_batch_function_may_load_keys_through_itself_deeper_than_maxsize(
    maxsize: int,
) -> None:
    calls: list[list[int]] = []

    # Two chains, the odd keys and the even ones, each key's parent two below it.
    @worker_queue.batch(maxsize=maxsize, cache=cachetools.LRUCache(100))
    async def depth(ids: list[int]) -> dict[int, int]:
        calls.append(list(ids))
        parents = await depth.many([i - 2 for i in ids if i > 1])
        below = dict(zip([i for i in ids if i > 1], parents, strict=True))
        check_batches(depth)
        return {i: 0 if i < 2 else 1 + below[i] for i in ids}

    assert await bounded(asyncio.gather(depth(5), depth(8))) == [2, 4]
    assert sorted(k for keys in calls for k in keys) == [0, 1, 2, 3, 4, 5, 6, 8]  # each once
    check_batches(depth)


async def test_keys_of_one_batch_that_need_each_other_get_recursion_error_not_a_hang() -> None:
    # 5 and 7 go in one batch; 7 needs 6, whose batch then needs 5: the first batch would wait
    # for itself, as one call waiting for its own key would.
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def depth(ids: list[int]) -> dict[int, int | BaseException]:
        out: dict[int, int | BaseException] = {}
        for i in ids:
            try:
                out[i] = 0 if i == 0 else 1 + await depth(i - 1)
            except RecursionError as exc:
                out[i] = exc
        return out

    five, seven = await bounded(asyncio.gather(depth(5), depth(7), return_exceptions=True))
    assert isinstance(seven, RecursionError) or isinstance(five, RecursionError)


async def test_a_batch_function_awaiting_a_key_of_its_own_batch_gets_recursion_error() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> dict[int, str]:
        try:
            await load(ids[0])
        except RecursionError as exc:
            return dict.fromkeys(ids, f"cycle: {exc}")
        return dict.fromkeys(ids, "no cycle")

    value = await bounded(load(1))
    assert value.startswith("cycle: ")
    assert "depends on itself" in value


async def test_a_cycle_through_another_batch_gets_recursion_error() -> None:
    # 1's batch loads 2, whose batch loads 1: the second call would await itself.
    @worker_queue.batch(maxsize=1, cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> dict[int, str]:
        (key,) = ids
        try:
            return {key: "then " + await load(2 if key == 1 else 1)}
        except RecursionError:
            return {key: "cycle"}

    assert await bounded(load(1)) == "then cycle"


async def test_a_key_waiting_in_line_that_a_running_batch_awaits_starts_in_its_slot() -> None:
    # 1's batch holds the only slot; 2's batch waits in line for it; 1's batch then awaits 2.
    started = asyncio.Event()
    go = asyncio.Event()

    @worker_queue.batch(maxsize=1, cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> dict[int, str]:
        if ids == [1]:
            started.set()
            await go.wait()
            return {1: "1 after " + await load(2)}
        return {i: f"v{i}" for i in ids}

    first = asyncio.ensure_future(load(1))
    async with asyncio.timeout(WAIT):
        await started.wait()
    second = asyncio.ensure_future(load(2))
    for _ in range(5):  # 2's batch closes and waits in line
        await asyncio.sleep(0)
    assert load.queue.waiting == 0  # keys wait for their batch, not for slots
    go.set()
    assert await bounded(asyncio.gather(first, second)) == ["1 after v2", "v2"]
    check_batches(load)


# -- recursion through other memoized functions ----------------------------------------------------


async def test_two_batch_functions_calling_each_other_work_with_maxsize_one() -> None:
    @worker_queue.batch(maxsize=1, cache=cachetools.LRUCache(100))
    async def users(ids: list[int]) -> dict[int, str]:
        teams = await team_of.many(ids)
        return {i: f"user {i} of {t}" for i, t in zip(ids, teams, strict=True)}

    @worker_queue.batch(maxsize=1, cache=cachetools.LRUCache(100))
    async def team_of(ids: list[int]) -> dict[int, str]:
        # A team is named after its lead, a user of a lower id.
        return {i: "nobody" if i < 10 else "lead " + await users(i - 10) for i in ids}

    assert await bounded(users(25)) == "user 25 of lead user 15 of lead user 5 of nobody"
    check_batches(users)
    check_batches(team_of)


async def test_a_cycle_through_two_batch_functions_gets_recursion_error() -> None:
    @worker_queue.batch(maxsize=2, cache=cachetools.LRUCache(100))
    async def first(ids: list[int]) -> dict[int, str]:
        return {i: "first " + await second(i) for i in ids}

    @worker_queue.batch(maxsize=2, cache=cachetools.LRUCache(100))
    async def second(ids: list[int]) -> dict[int, str]:
        try:
            return {i: "second " + await first(i) for i in ids}
        except RecursionError:
            return dict.fromkeys(ids, "cycle")

    assert await bounded(first(1)) == "first cycle"


async def test_a_memoized_function_calling_itself_through_a_batch_function_works() -> None:
    @worker_queue(maxsize=1, cache=cachetools.LRUCache(100))
    async def chain(i: int) -> str:
        return "end" if i == 0 else f"{i} > " + await links(i)

    @worker_queue.batch(maxsize=1, cache=cachetools.LRUCache(100))
    async def links(ids: list[int]) -> dict[int, str]:
        return {i: await chain(i - 1) for i in ids}

    assert await bounded(chain(3)) == "3 > 2 > 1 > end"


async def test_a_memoized_call_awaiting_itself_through_a_batch_gets_recursion_error() -> None:
    @worker_queue(maxsize=2, cache=cachetools.LRUCache(100))
    async def outer(i: int) -> str:
        return await inner(i)

    @worker_queue.batch(maxsize=2, cache=cachetools.LRUCache(100))
    async def inner(ids: list[int]) -> dict[int, str]:
        try:
            return {i: await outer(i) for i in ids}
        except RecursionError:
            return dict.fromkeys(ids, "cycle")

    assert await bounded(outer(1)) == "cycle"


# -- exceptions as values --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["mapping", "sequence"])
async def test_stop_iteration_as_a_value_fails_that_key_with_runtime_error(shape: str) -> None:
    # asyncio refuses StopIteration in a future; a coroutine raising it raises RuntimeError.
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> Any:
        values = [StopIteration("no more") if i == 1 else f"v{i}" for i in ids]
        return dict(zip(ids, values, strict=True)) if shape == "mapping" else values

    one, two = await bounded(asyncio.gather(load(1), load(2), return_exceptions=True))
    assert isinstance(one, RuntimeError)
    assert "StopIteration" in str(one)
    assert isinstance(one.__cause__, StopIteration)
    assert two == "v2"
    assert load.cache_peek(1) is MISSING
    assert load.cache_peek(2) == "v2"


# -- keys ------------------------------------------------------------------------------------------


class Opaque:
    """A key that is hashable, but whose repr fails."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        return hash(self.n)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.n == self.n

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_a_key_whose_repr_fails_is_loaded_as_any_other() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(keys: list[Opaque]) -> list[int]:
        return [k.n for k in keys]

    assert await bounded(load.many([Opaque(1), Opaque(2), Opaque(1)])) == [1, 2, 1]


async def test_a_mapping_answer_for_keys_it_cannot_hold_says_to_return_a_sequence() -> None:
    # Lists as keys, made hashable by key=: a mapping cannot be keyed by them.
    @worker_queue.batch(cache=cachetools.LRUCache(100), key=tuple)
    async def total(keys: list[Any]) -> dict[Any, int]:  # (K is Hashable for type checkers)
        return {tuple(k): sum(k) for k in keys}

    with pytest.raises(TypeError, match=r"total\(\) returned a mapping.*sequence"):
        await bounded(total([1, 2]))

    @worker_queue.batch(cache=cachetools.LRUCache(100), key=tuple)
    async def aligned(keys: list[Any]) -> list[int]:
        return [sum(k) for k in keys]

    assert await bounded(aligned.many([[1, 2], [3], [1, 2]])) == [3, 3, 3]


# -- caching switched off -------------------------------------------------------------------------


async def test_with_caching_switched_off_no_call_holds_more_than_max_batch_keys() -> None:
    # max_batch is often the backend's own limit (parameters in one query).
    calls: list[list[int]] = []

    @worker_queue.batch(max_batch=3)
    async def load(ids: list[int]) -> dict[int, str]:
        calls.append(list(ids))
        return {i: f"v{i}" for i in ids}

    with disabled():
        values = await bounded(load.many([1, 2, 3, 4, 2, 5, 6, 7]))
    assert values == ["v1", "v2", "v3", "v4", "v2", "v5", "v6", "v7"]
    assert calls == [[1, 2, 3], [4, 5, 6], [7]]


async def test_with_caching_switched_off_keys_made_hashable_by_key_are_loaded() -> None:
    @worker_queue.batch(key=tuple)
    async def total(keys: list[Any]) -> list[int]:
        return [sum(k) for k in keys]

    with disabled():
        assert await bounded(total.many([[1, 2], [3], [1, 2]])) == [3, 3, 3]
        assert await bounded(total([4, 5])) == 9


class Rows(Mapping[int, str]):
    """A mapping over rows that finds a row with next(): StopIteration for a key it lacks."""

    def __init__(self, ids: list[int]) -> None:
        self.rows = [(i, f"v{i}") for i in ids]

    def __getitem__(self, key: int) -> str:
        return next(value for i, value in self.rows if i == key)

    def __iter__(self) -> Iterator[int]:
        return (i for i, _ in self.rows)

    def __len__(self) -> int:
        return len(self.rows)


async def test_a_mapping_raising_stop_iteration_fails_the_batch_with_runtime_error() -> None:
    @worker_queue.batch(cache=cachetools.LRUCache(100))
    async def load(ids: list[int]) -> Rows:
        return Rows([i for i in ids if i != 2])

    one, two = await bounded(asyncio.gather(load(1), load(2), return_exceptions=True))
    for outcome in (one, two):
        assert isinstance(outcome, RuntimeError), outcome
        assert isinstance(outcome.__cause__, StopIteration)
