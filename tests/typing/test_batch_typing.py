"""Typing checks of worker_queue.batch: mypy --strict runs over this file in CI; pytest runs it.

Each ``# type: ignore[...]`` marks a call that must be a type error: with warn_unused_ignores,
mypy fails the build if one of them stops being an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import assert_type

from cachetools import TTLCache

from wq_memo import Batched, BatchInfo, CachedError, Missing, worker_queue


class User:
    def __init__(self, id: int) -> None:
        self.id = id


@worker_queue.batch(maxsize=4, max_batch=100, max_wait=0.0, cache=TTLCache(10_000, ttl=60))
async def load_users(ids: list[int]) -> Mapping[int, User]:
    return {i: User(i) for i in ids}


@worker_queue.batch
async def load_names(ids: Sequence[int]) -> list[str]:
    return [str(i) for i in ids]


@worker_queue.batch(cache=None)
async def load_or_fail(ids: list[int]) -> dict[int, User | LookupError]:
    return {i: User(i) if i else LookupError(i) for i in ids}


@worker_queue.batch(
    cache=TTLCache(100, ttl=60),
    cache_if=lambda user: user.id > 0,
    ttl=lambda user: 5.0 if user.id < 10 else None,
    cache_errors={TimeoutError: 2.0},
)
async def load_with_policy(ids: list[int]) -> Mapping[int, User]:
    return {i: User(i) for i in ids}


async def test_the_result_policy_keeps_the_value_type() -> None:
    assert_type(await load_with_policy(1), User)
    assert_type(load_with_policy.cache_peek(1), User | Missing | CachedError)


async def test_a_batch_function_is_typed_by_its_value_type() -> None:
    # An exception as a value is raised: mypy leaves it out of the value type, pyright keeps it.
    value: User | LookupError = await load_or_fail(1)
    assert isinstance(value, User)
    assert_type(await load_users(7), User)
    assert_type(await load_users.many([3, 1, 3, 9]), list[User])
    assert_type(await load_names(1), str)
    assert_type(await load_names.many(range(3)), list[str])
    assert_type(load_users.cache_info(), BatchInfo)
    assert_type(load_users.cache_peek(7), User | Missing | CachedError)
    assert_type(await load_users.acache_peek(7), User | Missing | CachedError)
    assert_type(await load_users.refresh(7), User)
    assert_type(load_users.cache_invalidate(7), bool)
    load_users.cache_prime(User(8), 8)
    whole: Batched[int, User] = load_users
    assert whole is load_users


async def test_wrong_keys_and_values_are_type_errors() -> None:
    await load_users("7")  # type: ignore[arg-type]
    await load_users.many(["7"])  # type: ignore[list-item]
    load_users.cache_prime("not a user", 8)  # type: ignore[arg-type]
    load_users.cache_clear()
