"""The asynchronous cache protocol that @worker_queue accepts besides a MutableMapping."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, NamedTuple, Protocol, TypeVar, runtime_checkable

__all__ = (
    "MISSING",
    "AsyncCache",
    "BatchFlightCache",
    "CallKey",
    "Lifetime",
    "Missing",
    "RefreshingCache",
    "SingleFlightCache",
)

V = TypeVar("V")


class Missing(enum.Enum):
    """The type of MISSING."""

    MISSING = enum.auto()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = Missing.MISSING
"""What AsyncCache.get returns for a key it does not hold, so that None can be a cached value."""

Lifetime = Callable[[Any], tuple[bool, "float | None"]]
"""Told a computed value by a cache that stores it itself (RedisCache's ``get_or_compute`` and
``refresh``, given ``lifetime=``): whether to store it, and for how long (None: the cache's ttl).
"""


class CallKey(NamedTuple):
    """The key @worker_queue hands an AsyncCache: the function's qualified name and the call's key.

    ``function`` is ``f"{func.__module__}.{func.__qualname__}"``; ``key`` is what the decorator's
    key function (``cachetools.keys.hashkey`` by default) built from the call's arguments. One
    AsyncCache can therefore serve several decorated functions without their entries colliding.
    """

    function: str
    key: Hashable


@runtime_checkable
class AsyncCache(Protocol):
    """A cache whose operations are coroutines, such as one kept in Redis.

    Implementations must not raise for a miss: ``get`` returns ``MISSING``. Errors of the store
    itself may propagate; @worker_queue logs them and carries on as if the cache were empty.

    A cache may also have ``async def peek(key)``, answering as ``get`` does without counting
    the read in its own statistics; ``acache_peek`` then reads through it.
    """

    async def get(self, key: Hashable) -> Any:
        """Return the value stored under key, or MISSING."""
        ...

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        """Store value under key, expiring after ttl seconds (None: the cache's default)."""
        ...

    async def delete(self, key: Hashable) -> bool:
        """Remove key; return whether an entry was removed."""
        ...

    async def clear(self) -> None:
        """Remove every entry this cache holds."""
        ...

    async def aclose(self) -> None:
        """Release the cache's connections."""
        ...


@runtime_checkable
class SingleFlightCache(AsyncCache, Protocol):
    """An AsyncCache that can also make sure one computation runs across processes.

    When the cache given to @worker_queue has this method, the decorator's worker calls it instead
    of calling the function directly, and does not store the result itself afterwards. It calls
    it holding none of the function's ``maxsize`` slots: ``compute()`` takes one itself, so call
    it only when this process computes (never while waiting for another process).
    """

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        """Return the value under key, computing and storing it with compute() if absent.

        Across every process sharing the store, at most one compute() for a key runs at a time.
        An exception from compute() propagates to the caller and nothing is stored. A
        ``delete(key)``, ``clear()`` or ``set(key, ...)`` (a prime) made while compute() runs
        means its result is not stored. @worker_queue stores computed values through this method
        only (for f.refresh() too: it deletes the entry first, unless the cache is a
        RefreshingCache, whose refresh() it uses), so that these rules hold for every write.
        """
        ...


@runtime_checkable
class RefreshingCache(SingleFlightCache, Protocol):
    """A SingleFlightCache that knows each entry's age and refreshes entries across processes.

    With ``refresh_after=``, @worker_queue reads entries with ``get_with_age`` (so that an entry
    another process wrote is refreshed on time) and refreshes them with ``refresh`` (so that one
    process refreshes a key while the others keep serving it).
    """

    async def get_with_age(self, key: Hashable) -> tuple[Any, float | None]:
        """(the value under key or MISSING, seconds since it was written or None if unknown)."""
        ...

    async def refresh(
        self, key: Hashable, compute: Callable[[], Awaitable[V]]
    ) -> tuple[bool, V | Missing]:
        """Compute key anew and store it, unless another process is computing it already.

        Returns ``(True, value)`` when this call computed and stored it (stored as
        get_or_compute stores: not after a delete, never over a newer value), and
        ``(False, MISSING)`` at once, without waiting and without calling compute(), when
        another process holds the key's computation. Exceptions from compute() propagate and
        nothing is stored.
        """
        ...


@runtime_checkable
class BatchFlightCache(SingleFlightCache, Protocol):
    """A SingleFlightCache that also runs its single flight for many keys at once (RedisCache):
    what @worker_queue.batch needs of an async cache."""

    def batch_flight(self) -> Any:
        """The multi-key single-flight operations @worker_queue.batch drives (one round trip
        for the claims of a batch's keys, one for their stores)."""
        ...
