"""A faster ``cache[key]`` for cachetools' TTLCache, for the hit path.

On a hit, ``TTLCache.__getitem__`` runs four Python functions (five in 5.5):
itself, the ``timer`` property, the timer's ``__call__``, ``Cache.__getitem__`` (and a helper
that moves the key to the end of the LRU order). :func:`fast_lookup` does the same work in one
function that reads the cache's private attributes. It does so only for a cache it recognises,
checked once, when the lookup is built: exactly ``cachetools.TTLCache`` (no subclass), a
cachetools version whose ``TTLCache.__getitem__`` does what the lookup does (5.5 to 8.x), and
private attributes of the expected types. Otherwise it returns None, and the caller keeps
``cache[key]``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, Final

import cachetools

from .backends._protocol import MISSING

__all__ = ("SUPPORTED_CACHETOOLS", "fast_lookup", "raw_timer")

SUPPORTED_CACHETOOLS: Final = ((5, 5), (9, 0))
"""The cachetools versions recognised: from 5.5 up to, not including, 9.0. Each of them looks
an item up the same way; tests/test_ttl_lookup.py checks the lookup against the one installed."""


def _version(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def fast_lookup(cache: MutableMapping[Any, Any]) -> Callable[..., Any] | None:
    """A function equal to ``cache[key]`` on a TTLCache, but returning a default for a miss.

    The returned ``lookup(key, default=MISSING)`` has every effect that ``cache[key]`` has: it
    moves a key it finds to the most recently used end (even an expired one, as TTLCache
    does), compares the cache's timer with the item's expiry (an item expires when the time
    reaches it; a timer frozen with ``with cache.timer:`` is honoured), and returns the value.
    Where ``cache[key]`` raises KeyError, it returns ``default``; an unhashable key raises
    TypeError from both.

    Returns None when the cache is not a ``cachetools.TTLCache`` (subclasses included) or its
    internals are not those of a supported cachetools version (``SUPPORTED_CACHETOOLS``).
    Like ``cache[key]``, the lookup is not thread-safe.
    """
    if type(cache) is not cachetools.TTLCache:
        return None
    version = _version(getattr(cachetools, "__version__", ""))
    low, high = SUPPORTED_CACHETOOLS
    if version is None or not low <= version < high:
        return None
    state = vars(cache)
    links = state.get("_TTLCache__links")
    data = state.get("_Cache__data")
    timer = state.get("_TimedCache__timer")
    timer_class = getattr(cachetools.TTLCache, "_Timer", None)
    if (
        type(links) is not collections.OrderedDict
        or type(data) is not dict
        or timer_class is None
        or type(timer) is not timer_class
    ):
        return None
    timer_state = vars(timer)
    if "_Timer__nesting" not in timer_state or "_Timer__timer" not in timer_state:
        return None
    # These objects live as long as the cache: cachetools mutates them in place (clear()
    # included); a copy, or an unpickled cache, gets objects of its own.
    now = timer_state["_Timer__timer"]
    find_link = links.get
    to_end = links.move_to_end

    def lookup(key: Hashable, default: Any = MISSING) -> Any:
        link = find_link(key)
        if link is None:
            return data.get(key, default)
        to_end(key)
        # The timer's __call__, inlined; inside `with cache.timer:` the time is frozen. Its
        # state is read from its __dict__: the class's __getattr__ slows attribute reads.
        if (
            now() if timer_state["_Timer__nesting"] == 0 else timer_state["_Timer__time"]
        ) < link.expires:
            try:
                return data[key]
            except KeyError:  # never while cachetools keeps its links and data in step
                return default
        return default

    return lookup


def raw_timer(cache: MutableMapping[Any, Any]) -> Callable[[], float] | None:
    """The clock a TTLCache was made with, without its Python-level wrapper; None if unknown.

    Cheaper to read than ``cache.timer`` (which is what freezes under ``with cache.timer:``);
    for a clock that only has to agree with the cache's own, such as entry ages.
    """
    if fast_lookup(cache) is None:
        return None
    timer = vars(vars(cache)["_TimedCache__timer"]).get("_Timer__timer")
    return timer if callable(timer) else None
