"""The weak, loop-aware registry of started queues behind aclose_all().

It holds every WorkerQueue bound to a loop, hidden ones included, to close them; the memoized
functions, to empty their caches, are in _memo_registry.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine
from typing import Any, Protocol


class Closable(Protocol):
    """What the registry needs of a queue."""

    def _started(self) -> bool: ...

    def _bound_elsewhere(self) -> bool: ...

    def _bound_here(self) -> bool: ...

    async def aclose(self) -> None: ...

    async def _aclose_at_once(self) -> None: ...


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
    """A mark to pass to aclose_at_once() later."""
    return _starts


def unregister(queue: Closable) -> None:
    """Forget queue (it was closed)."""
    _queues.discard(queue)


async def aclose_all() -> None:
    """Close every started queue, concurrently; queues bound to another live loop are left alone.

    A queue already closing is awaited too, so that every shutdown has ended on return.

    Raises an ExceptionGroup of what the closes raised, after every close has finished.
    """
    # A list first: closing queues unregisters them while we iterate.
    queues = [q for q in list(_queues) if q._started() and not q._bound_elsewhere()]
    await _gather("aclose_all()", [q.aclose() for q in queues])


async def aclose_at_once(since: int) -> None:
    """End a test (the pytest plugin's isolation): close at once (without the grace of aclose(),
    storing nothing) every queue started on the running loop, whenever it was started, and
    every queue started (or moved to a new loop) since mark() that no other running loop holds.

    Raises an ExceptionGroup of what the closes raised, after every close has finished.
    """
    queues = [
        q
        for q in list(_queues)
        if q._bound_here()
        or (q._started() and not q._bound_elsewhere() and _started_at.get(q, 0) > since)
    ]
    await _gather("closing the queues of a test", [q._aclose_at_once() for q in queues])


async def _gather(what: str, closes: list[Coroutine[Any, Any, None]]) -> None:
    if not closes:
        return
    results = await asyncio.gather(*closes, return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise ExceptionGroup(f"{what}: some queues failed to close", errors)
