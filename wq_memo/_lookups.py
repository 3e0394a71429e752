"""Lookup sharing: callers asking for a key while another caller looks it up share that lookup.

While a caller looks a key up in the cache, no computation of the key can start: a second
caller that looked it up too would find the same thing, or start a computation of what the
first finds stored. So the second waits for the first's answer instead: the value found, or
the computation the first joined or started (which it joins in turn). A first caller that
leaves without an answer (cancelled, refused by a shutdown) answers None: the others start
over. An invalidation forgets the lookups under way (``forget``): those sharing one asked
before it and keep it; newcomers look up afresh, since it may have read what was invalidated.

``look_up`` is the one way the queue reads an async cache: a failing cache_get is a miss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ("Lookup", "Lookups", "NotAsync", "look_up")

K = TypeVar("K", bound=Hashable)

logger = logging.getLogger("wq_memo")


class NotAsync(TypeError):
    """A cache function that must be async returned something that cannot be awaited."""


class Lookup:
    """A cache lookup under way, which callers asking for the same item meanwhile share.

    Its answer is ``(True, value)`` when the value was found, ``(False, flight)`` once the
    looking caller has joined or started the item's computation, or None when that caller
    left without either (the others then start over).
    """

    __slots__ = ("answer",)

    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[bool, Any] | None] | None = None

    def shared(self, loop: asyncio.AbstractEventLoop) -> Awaitable[tuple[bool, Any] | None]:
        """The answer, for a caller sharing the lookup (cancelling it leaves the answer be)."""
        if self.answer is None:
            self.answer = loop.create_future()
        return asyncio.shield(self.answer)


class Lookups(Generic[K]):
    """The lookups under way in one table, by key."""

    __slots__ = ("_by_key",)

    def __init__(self) -> None:
        self._by_key: dict[K, Lookup] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"<Lookups {list(self._by_key)!r}>"

    def under_way(self, key: K) -> Lookup | None:
        """The lookup of key under way that newcomers share, or None."""
        return self._by_key.get(key)

    def begin(self, key: K) -> Lookup:
        """A caller starts looking key up; later callers share it until it is answered."""
        lookup = self._by_key[key] = Lookup()
        return lookup

    def answer(self, key: K, lookup: Lookup, answer: tuple[bool, Any] | None) -> None:
        """End lookup, telling those who share it; a lookup already answered is left alone."""
        if self._by_key.get(key) is lookup:
            del self._by_key[key]
        if lookup.answer is not None and not lookup.answer.done():
            lookup.answer.set_result(answer)

    def forget(self, key: K | None = None) -> None:
        """Newcomers look key (None: every key) up afresh, not sharing a lookup under way."""
        if key is None:
            self._by_key.clear()
        else:
            self._by_key.pop(key, None)


async def look_up(read: Callable[[K], Awaitable[Any]] | None, key: K, miss: object) -> Any:
    """``await read(key)``, or ``miss`` without a cache or when it fails (logged)."""
    if read is None:
        return miss
    try:
        return await read(key)
    except NotAsync:
        raise
    except Exception:
        logger.exception("cache_get failed for %r; treating it as a miss", key)
        return miss
