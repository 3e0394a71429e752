"""The weak registry of memoized functions, behind the pytest plugin's isolation."""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from typing import Protocol, cast


class Resettable(Protocol):
    """What the registry needs of a memoized function."""

    @property
    def cache(self) -> object: ...

    def _reset_counts(self) -> None: ...

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


async def reset_all() -> None:
    """Empty every memoized function's cache and set its counts back to zero.

    Computations under way are forgotten, as cache_clear() forgets them. Raises an
    ExceptionGroup of what the clears raised, after trying every function.
    """
    errors: list[Exception] = []
    for memoized in everything():
        try:
            if isinstance(memoized.cache, MutableMapping) or memoized.cache is None:
                memoized.cache_clear()
            else:
                await memoized.acache_clear()
        except Exception as exc:  # one failing cache must not spare the others
            errors.append(exc)
        memoized._reset_counts()
    if errors:
        raise ExceptionGroup("wq_memo: some caches failed to clear", errors)
