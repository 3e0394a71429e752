"""Listeners: who is told of each call and computation, and how that costs nothing without them.

With no listener registered, ``active`` is False: the queue checks it where a computation starts
or ends, and the hit path of an in-process cache checks nothing at all. Hits there are noticed
by swapping, in every memoized function, the lookup its hit path calls for one that also tells
the listeners; that happens only while some listener overrides ``on_hit``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._counts import Counts

__all__ = (
    "COUNTED",
    "CountingEntries",
    "Listener",
    "add_listener",
    "bypassed",
    "clock",
    "computed",
    "counting_lookup",
    "hit",
    "joined",
    "listeners",
    "miss",
    "refresh",
    "remove_listener",
    "totals",
    "track",
    "tracked",
)

logger = logging.getLogger("wq_memo")

clock: Final = time.perf_counter
"""The clock of computation durations."""


class Listener:
    """Told of every call of every memoized function; override the methods you need.

    Each method receives the function's name (its ``name=``, else its qualified name). They run
    in the caller's task, synchronously, on the event loop: keep them quick and never block. An
    exception a method raises is logged on the ``wq_memo`` logger and goes no further.

    ``on_hit`` is the only method that can cost anything on the hit path, and only while a
    registered listener overrides it: leave it alone if you read hits from ``cache_info()``.
    """

    def on_hit(self, name: str) -> None:
        """A call was answered from the cache."""

    def on_miss(self, name: str) -> None:
        """A call found nothing cached and started a computation."""

    def on_joined(self, name: str) -> None:
        """A call joined a computation of the same arguments already under way."""

    def on_bypassed(self, name: str) -> None:
        """A call ran the function directly, because caching was disabled."""

    def on_refresh(self, name: str) -> None:
        """A background refresh of an entry started (``refresh_after``)."""

    def on_computed(self, name: str, seconds: float, error: type[BaseException] | None) -> None:
        """A computation ended after ``seconds``: with ``error`` raised, or None on success.

        Cancelled computations report ``asyncio.CancelledError``.
        """


listeners: tuple[Listener, ...] = ()
"""The registered listeners, in order of registration."""
active = False
"""Whether any listener is registered (read by the queue where computations start and end)."""

_hit_listeners: tuple[Listener, ...] = ()

COUNTED: Final = ("hits", "misses", "joined", "refreshes", "bypassed")
"""The fields of CacheInfo that count calls, in the order totals() gives them."""

RETIRED_NAMES: Final = 256
"""Names whose every function is gone kept in totals() at most, the oldest going first: enough
for the few names a program makes functions under again and again (a factory's), and well within
the OpenTelemetry SDK's default limit of 2000 attribute sets per instrument (400 names, at five
outcomes each), so that names gone never crowd out names alive."""

# Collection reads these tables, maybe from a thread of its own (an OpenTelemetry SDK's periodic
# reader). So they are changed and read only under _lock, and the garbage collector, which may
# run in any thread and in the middle of any of them, only appends to _gone: the next holder of
# the lock moves what it names out of _live.
_lock: Final = threading.Lock()


class _Tracked:
    """A memoized function alive: its name, and what it counts (nothing that refers to it)."""

    __slots__ = ("counts", "name", "own_hits", "ref")

    def __init__(self, name: str, counts: Any, own_hits: Callable[[], int] | None) -> None:
        self.name = name
        self.counts = counts
        self.own_hits = own_hits
        self.ref: weakref.ref[Any] | None = None

    def counted(self) -> list[int]:
        """Its counts (as in COUNTED) since it was made, those before a cache_clear() included,
        so that they never go down: plain numbers the event loop keeps, read without a call into
        its cache or its queue, so that any thread may read them."""
        counts, own_hits = self.counts, self.own_hits
        while True:
            # A clear on the loop's thread moves counts from one place to another: read again
            # if one ran meanwhile (or runs now), so that no total is read twice or missed.
            seen = counts.clears
            if seen & 1:
                time.sleep(0)
                continue
            values = [counts.total(field) for field in COUNTED]
            if own_hits is not None:
                values[0] += own_hits()
            if counts.clears == seen:
                return values


_live: dict[int, _Tracked] = {}
"""Every memoized function alive (or collected since _lock was last held), by serial number.
Nothing here may refer to one (through its cache, say), or it would never be collected."""
_live_names: dict[str, int] = {}
"""How many functions alive have each name."""
_gone: list[int] = []
"""The serial numbers of functions collected, appended by their weak references' callbacks."""
_serials = itertools.count()

_retired: dict[str, list[int]] = {}
"""The counts (as in COUNTED) of the memoized functions gone while a listener was registered, by
name, the name retired last at the end: they stay in totals(), so that what collectors read
never goes down. Without a listener nobody reads them, and nothing is kept."""


def track(memoized: Any, counts: Counts, name: str) -> None:
    """Register a new memoized function under name; counts: its queue's.

    Its ``_instrument(notify)``, if it has one, makes its hit path call notify() on each hit
    (``_instrument(None)`` undoes it); its ``_own_hits()``, the hits it counts itself, beside
    those in counts.
    """
    counts.name = name
    entry = _Tracked(name, counts, getattr(memoized, "_own_hits", None))
    serial = next(_serials)
    entry.ref = weakref.ref(memoized, lambda _ref: _gone.append(serial))
    with _lock:
        _fold()
        _live[serial] = entry
        _live_names[name] = _live_names.get(name, 0) + 1
    instrument = getattr(memoized, "_instrument", None)
    if instrument is not None and _hit_listeners:
        instrument(_notifier(name))


def _fold() -> None:
    """Move the functions collected out of _live; keep their counts while a listener may read
    them. The caller holds _lock."""
    while _gone:
        entry = _live.pop(_gone.pop(), None)
        if entry is None:
            continue
        name = entry.name
        left = _live_names.pop(name) - 1
        if left:
            _live_names[name] = left
        if active:
            gone = _retired.pop(name, None) or [0] * len(COUNTED)
            for i, count in enumerate(entry.counted()):
                gone[i] += count
            _retired[name] = gone
    if len(_retired) > RETIRED_NAMES:
        # The names retired longest ago go first; a name some function still has stays, or its
        # total would go down.
        for name in list(_retired):
            if len(_retired) <= RETIRED_NAMES:
                break
            if name not in _live_names:
                del _retired[name]


def _entries() -> list[_Tracked]:
    with _lock:
        _fold()
        return list(_live.values())


def tracked() -> list[tuple[str, Any]]:
    """Every memoized function alive, with its name; any thread may call it."""
    found = []
    for entry in _entries():
        memoized = entry.ref() if entry.ref is not None else None
        if memoized is not None:
            found.append((entry.name, memoized))
    return found


def totals() -> dict[str, list[int]]:
    """The calls of every memoized function so far, by name (COUNTED), those gone while a
    listener was registered included.

    Any thread may call it: it reads the counts the event loop keeps, never a cache (a
    cachetools cache is not thread-safe: even reading a TTLCache's size deletes entries).
    """
    with _lock:
        _fold()
        sums = {name: list(counts) for name, counts in _retired.items()}
        entries = list(_live.values())
    for entry in entries:
        counts = sums.setdefault(entry.name, [0] * len(COUNTED))
        for i, count in enumerate(entry.counted()):
            counts[i] += count
    return sums


def add_listener(listener: Listener) -> None:
    """Tell listener of every call of every memoized function from now on, until removed.

    Raises TypeError for an object that is not a Listener; adding one twice does nothing.
    """
    if not isinstance(listener, Listener):
        raise TypeError(
            f"add_listener() takes a wq_memo.metrics.Listener, got {listener!r}; "
            "subclass Listener and override the methods you need"
        )
    if listener not in listeners:
        _set((*listeners, listener))


def remove_listener(listener: Listener) -> None:
    """Stop telling listener; a listener not registered is ignored."""
    if listener in listeners:
        _set(tuple(x for x in listeners if x is not listener))


def _set(new: tuple[Listener, ...]) -> None:
    global listeners, active, _hit_listeners
    listeners = new
    active = bool(new)
    was = bool(_hit_listeners)
    _hit_listeners = tuple(x for x in new if type(x).on_hit is not Listener.on_hit)
    if bool(_hit_listeners) != was:
        for name, memoized in tracked():
            instrument = getattr(memoized, "_instrument", None)
            if instrument is not None:
                instrument(_notifier(name) if _hit_listeners else None)


def _notifier(name: str) -> Callable[[], None]:
    def notify() -> None:
        hit(name)

    return notify


def _failed(listener: Listener, event: str) -> None:
    logger.exception("metrics listener %r failed in %s()", listener, event)


# -- telling the listeners (called only while ``active``) ----------------------------------------


def hit(name: str | None) -> None:
    if name is not None:
        for listener in listeners:
            try:
                listener.on_hit(name)
            except Exception:
                _failed(listener, "on_hit")


def miss(name: str | None) -> None:
    if name is not None:
        for listener in listeners:
            try:
                listener.on_miss(name)
            except Exception:
                _failed(listener, "on_miss")


def joined(name: str | None, times: int = 1) -> None:
    if name is not None:
        for _ in range(times):
            for listener in listeners:
                try:
                    listener.on_joined(name)
                except Exception:
                    _failed(listener, "on_joined")


def refresh(name: str | None) -> None:
    if name is not None:
        for listener in listeners:
            try:
                listener.on_refresh(name)
            except Exception:
                _failed(listener, "on_refresh")


def bypassed(name: str | None) -> None:
    """A call ran the function directly while caching was disabled."""
    if name is not None and active:
        for listener in listeners:
            try:
                listener.on_bypassed(name)
            except Exception:
                _failed(listener, "on_bypassed")


def computed(name: str | None, started: float, error: type[BaseException] | None) -> None:
    if name is not None:
        seconds = clock() - started
        for listener in listeners:
            try:
                listener.on_computed(name, seconds, error)
            except Exception:
                _failed(listener, "on_computed")


def counting_lookup(
    find: Callable[[Hashable, object], Any], notify: Callable[[], None]
) -> Callable[[Hashable, object], Any]:
    """find(key, default), telling notify() of each value found."""

    def find_counting(k: Hashable, default: object) -> Any:
        value = find(k, default)
        if value is not default:
            notify()
        return value

    return find_counting


class CountingEntries:
    """``cache[key]`` for a hit path, telling notify() of each value found."""

    __slots__ = ("_cache", "_notify")

    def __init__(self, cache: Any, notify: Callable[[], None]) -> None:
        self._cache = cache
        self._notify = notify

    def __getitem__(self, k: Hashable) -> Any:
        value = self._cache[k]
        self._notify()
        return value
