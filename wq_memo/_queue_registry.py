"""The weak, loop-aware registry of started queues behind aclose_all().

It holds every WorkerQueue bound to a loop, hidden ones included, to close them; the memoized
functions, to empty their caches, are in _memo_registry.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol


class Closable(Protocol):
    """What the registry needs of a queue."""

    def _started(self) -> bool: ...

    def _bound_elsewhere(self) -> bool: ...

    async def aclose(self) -> None: ...


# Weak: a queue its owner drops is garbage-collected, started or not.
_queues: weakref.WeakSet[Closable] = weakref.WeakSet()
# When each queue was last started (bound to a loop), in starts counted since the import.
_started_at: weakref.WeakKeyDictionary[Closable, int] = weakref.WeakKeyDictionary()
_starts = 0


def register(queue: Closable) -> None:
    """Remember queue until it is closed or garbage-collected (it has just been started)."""
    global _starts
    _starts += 1
    _queues.add(queue)
    _started_at[queue] = _starts


def mark() -> int:
    """A mark to pass to aclose_started_since() later."""
    return _starts


def unregister(queue: Closable) -> None:
    """Forget queue (it was closed)."""
    _queues.discard(queue)


async def aclose_all() -> None:
    """Close every started queue, concurrently; queues bound to another live loop are left alone.

    A queue already closing is awaited too, so that every shutdown has ended on return.

    Raises an ExceptionGroup of what the closes raised, after every close has finished.
    """
    await _aclose_started("aclose_all()", 0)


async def aclose_started_since(since: int) -> None:
    """Close, as aclose_all() does, the queues started (or moved to a new loop) since mark()."""
    await _aclose_started("closing the queues started since a mark", since)


async def _aclose_started(what: str, since: int) -> None:
    # A list first: closing queues unregisters them while we iterate.
    queues = [
        q
        for q in list(_queues)
        if q._started() and not q._bound_elsewhere() and _started_at.get(q, 0) > since
    ]
    if not queues:
        return
    results = await asyncio.gather(*(q.aclose() for q in queues), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise ExceptionGroup(f"{what}: some queues failed to close", errors)
