"""Counting calls: each count goes together with the listener call that reports it.

A call is counted once, as a hit, a miss or a join, when its outcome's source is known: a hit
once the value is found, a miss when its computation starts, a join when it joins one. The first
caller of an item that waited in line is counted once its key was looked up again (a hit or a
miss), so that no count is ever taken back. The hit paths of in-process caches keep their own
count inline (see _decorator), as measured faster there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from . import _listeners

__all__ = (
    "Counts",
    "count_first",
    "count_hit",
    "count_joined",
    "count_refresh_failed",
    "count_started",
    "count_unstarted",
)


class Counts:
    """Calls answered by the cache, calls that started a computation, calls that joined one;
    background refreshes started, and those that failed; calls that bypassed the cache.
    ``name``: the memoized function's name that listeners are told (None: nobody is told).

    The counts are those since the last ``clear()``; ``before`` keeps what was counted before
    it, so that ``total()`` never goes down.
    """

    __slots__ = (
        "before",
        "bypassed",
        "clears",
        "dropped",
        "hits",
        "joined",
        "misses",
        "name",
        "refresh_failures",
        "refreshes",
        "stale",
        "uncached",
    )

    FIELDS: Final = (
        "hits",
        "misses",
        "joined",
        "refreshes",
        "refresh_failures",
        "dropped",
        "bypassed",
        "uncached",
        "stale",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.before: dict[str, int] = dict.fromkeys(self.FIELDS, 0)
        self.clears = 0
        """Odd while a clear() moves the counts: a reader in another thread (metrics
        collection) reads again until it is even and unchanged across its reads."""
        self._zero()

    def clear(self, hits: int = 0, then: Callable[[], None] | None = None) -> None:
        """Count afresh from now on (cache_clear()), keeping what was counted in ``before``.

        ``hits``: hits counted elsewhere until now (an in-process cache's hit path), kept too;
        ``then()`` sets that count back to zero, within the same step for readers.
        """
        self.clears += 1
        try:
            before = self.before
            for field in self.FIELDS:
                before[field] += getattr(self, field)
            before["hits"] += hits
            self._zero()
            if then is not None:
                then()
        finally:
            self.clears += 1

    def total(self, field: str) -> int:
        """A count since the start, clears or not (hits of an in-process hit path left out)."""
        return self.before[field] + getattr(self, field)  # type: ignore[no-any-return]

    def _zero(self) -> None:
        self.hits = 0
        self.misses = 0
        self.joined = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.dropped = 0
        """Items counted as misses that never started: every caller left while they waited."""
        self.bypassed = 0
        self.uncached = 0
        """Results returned but not stored (cache_if false, a bad ttl)."""
        self.stale = 0
        """Failed computations whose callers got an expired value (stale_if_error)."""


def count_hit(counts: Counts) -> None:
    """A call answered by the cache."""
    counts.hits += 1
    if _listeners.active:
        _listeners.hit(counts.name)


def count_joined(counts: Counts, joined: int = 1) -> None:
    """Calls that joined a computation under way."""
    counts.joined += joined
    if _listeners.active:
        _listeners.joined(counts.name, joined)


def count_started(counts: Counts, background: bool, joined: int, looks_again: bool) -> None:
    """Count an item's calls as its computation starts: a miss for its first caller (a refresh
    for a ``background`` one, which has none), and the ``joined`` calls that joined it while it
    waited in line.

    ``looks_again``: its key is looked up again first, and its first caller is counted only
    then (``count_first``), as a hit or a miss.
    """
    if background:
        counts.refreshes += 1
    elif not looks_again:
        counts.misses += 1
    if _listeners.active:
        if background:
            _listeners.refresh(counts.name)
        elif not looks_again:
            _listeners.miss(counts.name)
        _listeners.joined(counts.name, joined)
    if joined:
        counts.joined += joined


def count_first(counts: Counts, hit: bool) -> None:
    """Count the first caller of an item that waited in line, once it was looked up again."""
    if hit:
        counts.hits += 1
        if _listeners.active:
            _listeners.hit(counts.name)
    else:
        counts.misses += 1
        if _listeners.active:
            _listeners.miss(counts.name)


def count_unstarted(counts: Counts, background: bool, joined: int) -> None:
    """Count the calls of an item that ends without starting: a miss (dropped) and joins."""
    if not background:
        counts.misses += 1
        counts.dropped += 1
        if _listeners.active:
            _listeners.miss(counts.name)
    if _listeners.active:
        _listeners.joined(counts.name, joined)
    counts.joined += joined


def count_refresh_failed(counts: Counts) -> None:
    """A background refresh that failed (its listener is the refresher's ``on_refresh_failed``)."""
    counts.refresh_failures += 1
