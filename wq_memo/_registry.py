"""The weak, loop-aware registry of queues behind aclose_all()."""

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


def register(queue: Closable) -> None:
    """Remember queue until it is closed or garbage-collected."""
    _queues.add(queue)


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
    if not queues:
        return
    results = await asyncio.gather(*(q.aclose() for q in queues), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise ExceptionGroup("aclose_all(): some queues failed to close", errors)
