"""The weak registry of memoized functions, behind reset_all() and the pytest plugin's isolation.

It holds every function @worker_queue made, to empty their caches; the started queues, to close
them, are in _queue_registry.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, MutableMapping
from typing import Protocol, cast


class Resettable(Protocol):
    """What the registry needs of a memoized function."""

    @property
    def cache(self) -> object: ...

    def cache_clear(self) -> None: ...

    async def acache_clear(self) -> None: ...


# Weak: a memoized function its owner drops (one made in a test, say) is garbage-collected.
_memoized: weakref.WeakSet[Resettable] = weakref.WeakSet()


def register(memoized: object) -> None:
    """Remember memoized (a function @worker_queue made) until it is garbage-collected."""
    _memoized.add(cast(Resettable, memoized))


def everything() -> list[Resettable]:
    """Every memoized function alive now."""
    return list(_memoized)


def is_synchronous(memoized: Resettable) -> bool:
    """Whether memoized's cache can be emptied without awaiting (a mapping, or no cache)."""
    return memoized.cache is None or isinstance(memoized.cache, MutableMapping)


def reset_all_now() -> None:
    """reset_all() where every cache is synchronous; TypeError if one is not."""
    if not all(is_synchronous(m) for m in everything()):
        raise TypeError("wq_memo: an asynchronous cache needs await reset_all()")
    _raise_all([_clear(m.cache_clear) for m in everything()])


async def reset_all() -> None:
    """Empty every memoized function's cache and set its counts back to zero (cache_clear()).

    Computations under way are forgotten, as cache_clear() forgets them. Raises an
    ExceptionGroup of what the clears raised, after trying every function.
    """
    errors: list[Exception | None] = []
    for memoized in everything():
        if is_synchronous(memoized):
            errors.append(_clear(memoized.cache_clear))
        else:
            try:
                await memoized.acache_clear()
            except Exception as exc:  # one failing cache must not spare the others
                errors.append(exc)
    _raise_all(errors)


def _clear(clear: Callable[[], object]) -> Exception | None:
    try:
        clear()
    except Exception as exc:  # one failing cache must not spare the others
        return exc
    return None


def _raise_all(outcomes: list[Exception | None]) -> None:
    errors = [e for e in outcomes if e is not None]
    if errors:
        raise ExceptionGroup("wq_memo: some caches failed to clear", errors)
