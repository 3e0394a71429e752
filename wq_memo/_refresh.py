"""Refresh-ahead: when each cached entry is due for a background refresh, and what a refresh's
end does to that."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Hashable
from typing import Any, Final

from ._errors import ShutdownTimeout

__all__ = ("RefreshDeferred", "Refresher", "check_freshness_options", "check_refresh_options")

logger = logging.getLogger("wq_memo")

NEVER: Final = math.inf
"""The due time of an entry whose write time is unknown: it is never refreshed."""

_PRUNE_AT: Final = 1024
"""Due times kept before those of entries the cache dropped are pruned (then twice as many)."""
_KEEP_UNCHECKED: Final = 100_000
"""Due times kept for a cache that cannot say what it holds (an async cache): the oldest go."""
NO_REFERENCE: Final = 0.5
"""The part of its lifetime after which an entry with a ttl of its own is due, when no lifetime
is known for refresh_after to be a part of (a ttl function with a dict or an LRUCache): half, so
that the spread of any jitter (below 1) still ends before the entry expires."""
_SAME_ENTRY: Final = 0.05
"""Seconds within which two reads' estimates of an entry's write time are taken for one entry
(ages are read in milliseconds, on another clock): capped at refresh_after / 20."""


class RefreshDeferred(Exception):
    """A background refresh that found, when it came to compute (another process having given
    up the key), no spare slot free: it does not take a slot a caller may need, and is tried
    again after the back-off. Neither logged nor counted as a failure."""


def _seconds(name: str, value: object, what_to_do: str) -> float:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        raise ValueError(
            f"@worker_queue: {name} must be a number of seconds > 0, got {value!r}; {what_to_do}"
        )
    return float(value)  # type: ignore[arg-type]


def check_freshness_options(
    refresh_backoff: object, jitter: object, timer: object
) -> tuple[float, float]:
    """Validate refresh_backoff, jitter and timer, which are checked whether or not
    refresh_after is given: a bad value is a mistake either way."""
    backoff = _seconds(
        "refresh_backoff",
        refresh_backoff,
        "pass how long to wait before a failed refresh is tried again (default 1)",
    )
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
        raise ValueError(
            f"@worker_queue: jitter must be a fraction from 0 up to 1, got {jitter!r}; pass "
            "jitter=0.1 to spread each entry's refresh_after by up to 10% either way, "
            "or 0 (the default) for no spread"
        )
    if timer is not None and not callable(timer):
        raise TypeError(
            f"@worker_queue: timer must be a function returning seconds, got {timer!r}; pass "
            "a clock such as time.monotonic, or leave it out to use the cache's own timer"
        )
    return backoff, float(jitter)


def check_refresh_options(
    refresh_after: object,
    refresh_backoff: object,
    jitter: object,
    ttl: object,
    what: str = "the cache's ttl",
) -> tuple[float, float, float]:
    """Validate refresh_after, refresh_backoff and jitter against ttl (``what``: the cache's
    ttl, or the ttl= option), if known."""
    after = _seconds(
        "refresh_after",
        refresh_after,
        "pass the age after which an entry is refreshed in the background, "
        "or None for no refresh-ahead",
    )
    backoff, jitter = check_freshness_options(refresh_backoff, jitter, None)
    if isinstance(ttl, int | float) and not isinstance(ttl, bool) and after * (1 + jitter) >= ttl:
        raise ValueError(
            f"@worker_queue: refresh_after={after}"
            + (f" (up to {after * (1 + jitter):g} with jitter={jitter})" if jitter else "")
            + f" must be below {what}={ttl}: the ttl is the hard limit, and an entry "
            "is refreshed before it; lower refresh_after, or raise the ttl"
        )
    return after, backoff, jitter


class Refresher:
    """When the entries of one memoized function are due for a refresh.

    An entry's due time is set when a value is stored (``refresh_after`` later, spread by
    ``jitter``; for an entry with a lifetime of its own, the same part of that lifetime as
    refresh_after is of ``reference``, never later than refresh_after, see ``delay``), and
    pushed ``backoff`` later when a refresh starts or fails, so that calls in between neither
    start another nor hammer a failing source. Entries this process never wrote (primed
    elsewhere, or stored by another process) have no due time and are not refreshed,
    unless the cache tells entries' ages (``dated``): then each entry, whoever wrote it, gets
    one due time, drawn when it is first seen, however often it is read.
    """

    __slots__ = (
        "after",
        "backoff",
        "clock",
        "contains",
        "due",
        "jitter",
        "name",
        "prune_at",
        "reference",
        "same",
        "writes",
    )

    def __init__(
        self,
        after: float,
        backoff: float,
        jitter: float,
        clock: Callable[[], float],
        name: str,
        contains: Callable[[Hashable], bool] | None,
        dated: bool = False,
        reference: float | None = None,
    ) -> None:
        self.after = after
        self.reference = reference
        """The lifetime refresh_after is a part of (the ttl= option's, or the cache's); None:
        none known (an entry's own lifetime is then refreshed at NO_REFERENCE of it)."""
        self.backoff = backoff
        self.jitter = jitter
        self.clock = clock
        self.name = name
        self.contains = contains
        """Whether the cache holds a key (to prune due times of entries it dropped)."""
        self.due: dict[Hashable, float] = {}
        self.prune_at = _PRUNE_AT
        self.writes: dict[Hashable, tuple[float, float]] | None = {} if dated else None
        """With a dated cache: key -> (when its newest known entry was written, on this clock;
        when that entry is due)."""
        self.same = min(_SAME_ENTRY, after / 20)

    def delay(self, lifetime: float | None = None) -> float:
        """How long after its write an entry living ``lifetime`` seconds (None: the cache's
        own lifetime) is due, before jitter: refresh_after, or for a shorter-lived entry the
        same part of its lifetime as refresh_after is of the reference lifetime (NO_REFERENCE of
        it without one), whichever comes first."""
        after = self.after
        if lifetime is None or lifetime == NEVER:
            return after
        reference = self.reference
        part = lifetime * (after / reference if reference else NO_REFERENCE)
        return part if part < after else after

    def _delay(self, lifetime: float | None = None) -> float:
        """delay(lifetime), spread by jitter: one draw."""
        delay = self.delay(lifetime)
        if self.jitter:
            return delay * (1 + self.jitter * (2 * random.random() - 1))
        return delay

    def stored(self, key: Hashable, lifetime: float | None = None) -> None:
        """A value living ``lifetime`` seconds (None: the cache's lifetime) was stored for key
        now."""
        now = self.clock()
        due_at = now + self._delay(lifetime)
        self._set_due(key, due_at)
        if self.writes is not None:
            self.writes[key] = (now, due_at)

    def stored_fenced(self, key: Hashable, lifetime: float | None = None) -> None:
        """stored(), for a write a dated cache may have refused (its fence: an invalidation
        elsewhere, after which another process may have stored an entry of another lifetime):
        the entry's due time until a read dates what the cache holds, which it then sets,
        earlier or later (see ``written``)."""
        self.stored(key, lifetime)
        if self.writes is not None:
            self.writes[key] = (-NEVER, self.due[key])

    def written(self, key: Hashable, age: float, lifetime: float | None = None) -> None:
        """The cache says key's entry was written ``age`` seconds ago (maybe by another process),
        to live ``lifetime`` seconds in all (None: the cache's lifetime, or not known).

        An entry gets one due time, drawn when it is first seen: reading it again changes
        nothing (a draw at each read, keeping the latest, would push every entry to the end of
        its jitter). The due time only moves later: a refresh starting or failing here pushed
        it back, and an entry refreshed elsewhere is younger.
        """
        at = self.clock() - age
        writes = self.writes
        known = None
        if writes is not None:
            known = writes.get(key)
            if known is not None and at <= known[0] + self.same:
                return  # the entry drawn for already (or an older one)
        due_at = at + self._delay(lifetime)
        if writes is not None:
            writes[key] = (at, due_at)
        # Earlier too after a write of this process not yet read back (stored_fenced): the
        # entry read is the one the cache holds, which that write may not have become.
        if due_at > self.due.get(key, -NEVER) or (known is not None and known[0] == -NEVER):
            self._set_due(key, due_at)

    def held(self, key: Hashable, left: float, age: float | None = None) -> None:
        """key's entry is a stale value served again (stale_if_error), fresh for ``left``
        seconds more: it is not refreshed ahead before then (its next attempt comes when it
        expires, after the back-off). ``age``: seconds since it was written, if known (a dated
        cache then takes it for the entry drawn for)."""
        now = self.clock()
        due_at = now + (left if left > 0 else 0.0)
        if self.writes is not None and age is not None:
            self.writes[key] = (now - age, due_at)
        if due_at > self.due.get(key, -NEVER):
            self._set_due(key, due_at)

    def entry_due(self, key: Hashable) -> bool:
        """Whether key's newest known entry is due (True when none is known)."""
        known = None if self.writes is None else self.writes.get(key)
        return known is None or self.clock() >= known[1]

    def started(self, key: Hashable) -> None:
        """A refresh of key started (or was under way): no other before the back-off."""
        self._set_due(key, self.clock() + self.backoff)

    def failed(self, key: Hashable, exc: BaseException) -> None:
        """A refresh of key failed: keep serving the old value, try again after the back-off."""
        self._set_due(key, self.clock() + self.backoff)
        if isinstance(exc, ShutdownTimeout | RefreshDeferred):
            return
        logger.warning(
            "%s(): refreshing %r failed; the cached value is served until it expires, and the "
            "refresh is tried again after %gs",
            self.name,
            key,
            self.backoff,
            exc_info=exc,
        )

    def _set_due(self, key: Hashable, due_at: float) -> None:
        """Set key's due time, moving it to the end of ``due``: kept in the order they were
        last set, the first are the oldest, which a prune without ``contains`` drops."""
        due = self.due
        due.pop(key, None)
        due[key] = due_at
        if len(due) > self.prune_at:
            self._prune()

    def forget(self, key: Hashable) -> None:
        self.due.pop(key, None)
        if self.writes is not None:
            self.writes.pop(key, None)

    def clear(self) -> None:
        self.due.clear()
        if self.writes is not None:
            self.writes.clear()

    def _prune(self) -> None:
        due = self.due
        contains = self.contains
        if contains is not None:
            for key in [k for k in due if not contains(k)]:
                del due[key]
                if self.writes is not None:
                    self.writes.pop(key, None)
            self.prune_at = max(_PRUNE_AT, 2 * len(due))  # amortized: O(1) per store
            return
        # An async cache: the due times set longest ago go (of entries most likely gone from
        # the cache); those entries are refreshed again once this process stores them again.
        for key in list(due)[: len(due) - _KEEP_UNCHECKED // 2]:
            del due[key]
            if self.writes is not None:
                self.writes.pop(key, None)
        self.prune_at = _KEEP_UNCHECKED

    def due_time(self, key: Any) -> float:
        return self.due.get(key, NEVER)
