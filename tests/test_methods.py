"""Memoized methods: distinct instances never share entries, even when equal; the cache never
keeps an instance alive; bound and class methods invalidate their own entries."""

from __future__ import annotations

import asyncio
import gc
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import cachetools
import pytest
from _queue_harness import MemoryAsyncCache

from wq_memo import worker_queue


@dataclass(frozen=True)
class User:
    """Equal and hashing alike whenever the ids are equal, as an ORM row would."""

    id: int
    name: str

    def __eq__(self, other: object) -> bool:
        return isinstance(other, User) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @worker_queue(cache=cachetools.LRUCache(10_000))
    async def greeting(self) -> str:
        return f"hello {self.name}"

    @worker_queue(cache=cachetools.LRUCache(100))
    async def with_suffix(self, suffix: str) -> str:
        return f"{self.name}{suffix}"


async def test_equal_instances_never_share_entries() -> None:
    anna, ann = User(1, "Anna"), User(1, "Ann")
    assert anna == ann
    assert await ann.greeting() == "hello Ann"
    assert await anna.greeting() == "hello Anna"
    assert await ann.greeting() == "hello Ann"
    assert await anna.with_suffix("!") == "Anna!"
    assert await ann.with_suffix("!") == "Ann!"


async def test_the_cache_keeps_no_instance_alive_and_drops_its_entries() -> None:
    cache = User.greeting.cache
    assert isinstance(cache, cachetools.LRUCache)
    cache.clear()
    users = [User(i, f"u{i}") for i in range(5_000)]
    assert await asyncio.gather(*(u.greeting() for u in users)) == [
        f"hello u{i}" for i in range(5_000)
    ]
    assert len(cache) == 5_000
    refs = [weakref.ref(u) for u in users]
    del users
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert User.greeting.cache_info().currsize == 0  # entries of collected instances go


async def test_bound_cache_invalidate_removes_that_instances_entry_only() -> None:
    a, b = User(7, "a"), User(7, "b")
    calls: list[str] = []

    class Counted:
        def __init__(self, user: User) -> None:
            self.user = user

        @worker_queue(cache={})
        async def name(self, times: int) -> str:
            calls.append(self.user.name)
            return self.user.name * times

    ca, cb = Counted(a), Counted(b)
    assert (await ca.name(2), await cb.name(2)) == ("aa", "bb")
    assert ca.name.cache_invalidate(2) is True
    assert ca.name.cache_invalidate(2) is False
    assert await cb.name(2) == "bb"  # still cached
    assert await ca.name(2) == "aa"
    assert calls == ["a", "b", "a"]
    assert await ca.name.acache_invalidate(2) is True
    # The unbound form takes the instance first, as the method itself does.
    await ca.name(2)
    assert Counted.name.cache_invalidate(ca, 2) is True


class Repo:
    built: ClassVar[list[str]] = []

    @worker_queue  # above @classmethod: binds the class on every Python
    @classmethod
    async def build(cls, x: int) -> str:
        cls.built.append(cls.__name__)
        return f"{cls.__name__}:{x}"


class SubRepo(Repo):
    built: ClassVar[list[str]] = []


async def test_a_classmethod_invalidates_without_passing_the_class() -> None:
    repo: Any = Repo
    sub: Any = SubRepo
    assert await repo.build(1) == "Repo:1"
    assert await sub.build(1) == "SubRepo:1"  # a class of its own: an entry of its own
    assert await repo().build(1) == "Repo:1"  # through an instance: the same entry
    assert repo.built == ["Repo"]
    assert repo.build.cache_invalidate(1) is True
    assert await repo.build(1) == "Repo:1"
    assert repo.built == ["Repo", "Repo"]
    assert sub.build.cache_invalidate(1) is True


SHARED = MemoryAsyncCache()


class Account:
    def __init__(self, number: int) -> None:
        self.number = number

    @worker_queue(cache=SHARED)
    async def balance(self) -> int:
        return self.number * 10

    @worker_queue(cache=SHARED, key=lambda self, currency: (self.number, currency))
    async def balance_in(self, currency: str) -> str:
        return f"{self.number * 10} {currency}"


async def test_an_async_cache_method_needs_a_key_that_turns_the_instance_into_a_value() -> None:
    with pytest.raises(TypeError, match="key="):
        await Account(1).balance()
    assert await Account(1).balance_in("EUR") == "10 EUR"
    assert await Account(1).balance_in("EUR") == "10 EUR"
    assert Account.balance_in.cache_info().hits == 1  # another instance, the same value: shared
    assert await Account(1).balance_in.acache_invalidate("EUR") is True


async def test_instances_that_cannot_be_weakly_referenced_are_told_to_pass_key() -> None:
    class Slotted:
        __slots__ = ("x",)

        def __init__(self, x: int) -> None:
            self.x = x

        @worker_queue(cache={})
        async def get(self) -> int:
            return self.x

    with pytest.raises(TypeError, match="__weakref__"):
        await Slotted(1).get()


async def test_a_staticmethod_in_a_class_stays_a_plain_function() -> None:
    class Maths:
        @staticmethod
        @worker_queue(cache={})
        async def square(x: int) -> int:
            return x * x

    maths: Any = Maths  # type checkers cannot see through staticmethod over the decorator
    assert await maths.square(3) == 9
    assert await maths().square(3) == 9
    assert Maths.square.cache_info().hits == 1


async def test_a_long_lived_instance_remembers_only_keys_the_cache_still_holds() -> None:
    class Repo:
        @worker_queue(cache=cachetools.LRUCache(maxsize=4))
        async def row(self, n: int) -> int:
            return n

    repo = Repo()
    for n in range(1000):
        assert await repo.row(n) == n
    cache = Repo.row.cache
    assert isinstance(cache, cachetools.LRUCache)
    stand_in = next(iter(cache))[0]
    assert len(cache) == 4
    assert len(stand_in.keys) <= 32, "evicted entries' keys kept for the instance"
    assert set(cache) <= stand_in.keys
    repo.row.cache_clear()
    assert not stand_in.keys
