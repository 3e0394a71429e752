"""The memoized function itself: a flat wrapper for each kind of cache and each structural variant.

The hit is the product's hot path: one key build, one lookup; no task, no future, no queue. As
cachetools does, there is one flat function per variant that differs in structure (a lookup
returning MISSING or raising KeyError, the default key or another, refresh-ahead or not), chosen
once at decoration: each test left out of the hit path is measured time. A miss goes to the
queue's flight table.
"""

from __future__ import annotations

import math
from asyncio import get_running_loop
from collections.abc import Awaitable, Callable, Coroutine, Hashable, MutableMapping
from typing import Any, Final, NamedTuple, ParamSpec, TypeVar

import cachetools.keys

from . import _listeners
from ._counts import Counts
from ._engine import Engine
from ._policy import Kept, Policy, Raised
from ._refresh import NEVER, Refresher
from ._switch import SWITCH
from .backends._protocol import MISSING

__all__ = (
    "MappingHitPath",
    "args_are_key",
    "async_cache_wrapper",
    "mapping_hit_path",
    "no_cache_wrapper",
    "refresh_starter",
    "unhashable",
)

P = ParamSpec("P")
R = TypeVar("R")

_hashkey: Final[Callable[..., Hashable]] = cachetools.keys.hashkey


def unhashable(name: str, exc: TypeError) -> TypeError:
    """The error of a call whose arguments make no cache key."""
    return TypeError(
        f"{name}(): the arguments cannot be made into a cache key ({exc}); "
        "pass key= to @worker_queue to build a hashable key from them"
    )


def args_are_key(key: Callable[..., Hashable]) -> bool:
    """Whether the positional arguments' tuple can stand in for key(*args) without keywords.

    ``hashkey(*args)`` is a tuple subclass equal to ``args`` and hashing alike, so either finds
    the other's entries; the plain tuple is already built and hashes in C, where hashkey's
    tuple is built anew and hashes through a Python method on every lookup. Only for
    in-process caches: an async cache may serialize keys, and a tuple serializes differently.
    """
    return key is cachetools.keys.hashkey


def _bypass(
    counts: Counts, func: Callable[..., Awaitable[R]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Awaitable[R]:
    """A call made with caching switched off: counted, told to listeners, run directly."""
    counts.bypassed += 1
    _listeners.bypassed(counts.name)
    return func(*args, **kwargs)


def refresh_starter(
    engine: Engine[Any, Any], refresher: Refresher
) -> Callable[[Hashable, tuple[Any, ...], dict[str, Any]], None]:
    """What a hit does once its entry is due: a background refresh through the queue."""
    table_now = engine.table_now
    clock = refresher.clock
    due_get = refresher.due.get

    def refresh_if_due(k: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if clock() >= due_get(k, NEVER):
            # First: a refresh that ends in its eager first step sets the key's next due time.
            refresher.started(k)
            table_now().refresh_in_background(k, args, kwargs)

    return refresh_if_due


class MappingHitPath(NamedTuple):
    """The wrapper over an in-process cache, and the hits it counts itself."""

    wrapper: Callable[..., Coroutine[Any, Any, Any]]
    own_hits: Callable[[], int]
    """The hits counted since the last zero_hits()."""
    zero_hits: Callable[[], None]


def mapping_hit_path(
    func: Callable[P, Awaitable[R]],
    display: str,
    cache: MutableMapping[Any, Any],
    key: Callable[..., Hashable],
    engine: Engine[Any, R],
    fast: Callable[[Hashable, object], Any] | None,
    refresher: Refresher | None,
    policy: Policy | None = None,
) -> MappingHitPath:
    """The wrapper over cache, a MutableMapping; ``fast``: a lookup that returns MISSING (None:
    the cache raises KeyError). ``policy``: entries are ``Kept`` if it is dated (see
    _policy), read on its clock; a remembered error is raised anew.

    The wrapper gets ``_instrument`` and ``_own_hits`` for _listeners.track (which must hold
    nothing referring to the cache).
    """
    counts = engine.counts
    hits = 0
    default_key = args_are_key(key)
    # What the hit paths read the cache through: _listeners.track swaps in counting ones while
    # a listener wants hits, so that without one a hit costs nothing more.
    entries: Any = cache
    find_any = find = cache.get if fast is None else fast
    # A miss: the queue's flight table on the running loop (bound to it first if need be),
    # read inline: a call fewer per miss than engine.table_now().
    bind = engine.bind

    if policy is not None and policy.dated and refresher is not None:
        # Refresh-ahead over dated entries: only a fresh value is refreshed ahead (an expired
        # entry is a miss, a remembered error is raised), on the one clock both read.
        now = policy.clock
        due_get = refresher.due.get
        refresh_if_due = refresh_starter(engine, refresher)

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if default_key and not kwargs else key(*args, **kwargs)
            try:
                entry = find_any(k, MISSING)
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            if entry is not MISSING:
                t = now()
                if t < entry.expires:
                    hits += 1
                    if entry.error is None:
                        if t >= due_get(k, NEVER):
                            refresh_if_due(k, args, kwargs)
                        return entry.value  # type: ignore[no-any-return]
                    raise entry.error.rebuild()
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    elif policy is not None and policy.dated:
        now = policy.clock

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if default_key and not kwargs else key(*args, **kwargs)
            try:
                entry = find_any(k, MISSING)
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            if entry is not MISSING and now() < entry.expires:
                hits += 1
                if entry.error is None:
                    return entry.value  # type: ignore[no-any-return]
                raise entry.error.rebuild()
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    elif refresher is not None:
        clock = refresher.clock
        due_get = refresher.due.get
        refresh_if_due = refresh_starter(engine, refresher)

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if default_key and not kwargs else key(*args, **kwargs)
            try:
                value = find_any(k, MISSING)
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            if value is not MISSING:
                hits += 1
                if clock() >= due_get(k, NEVER):
                    refresh_if_due(k, args, kwargs)
                return value  # type: ignore[no-any-return]
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    elif fast is not None and default_key:

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if not kwargs else _hashkey(*args, **kwargs)
            try:
                value = find(k, MISSING)
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            if value is not MISSING:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    elif fast is not None:

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = key(*args, **kwargs)
            try:
                value = find(k, MISSING)
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            if value is not MISSING:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    elif default_key:

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if not kwargs else _hashkey(*args, **kwargs)
            try:
                value = entries[k]
            except KeyError:
                pass
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            else:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    else:

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = key(*args, **kwargs)
            try:
                value = entries[k]
            except KeyError:
                pass
            except TypeError as exc:
                raise unhashable(display, exc) from exc
            else:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = engine.table
            if table is None or table.loop is not get_running_loop():
                table = bind()
            return await table.call(k, args, kwargs)

    def instrument(notify: Callable[[], None] | None) -> None:
        nonlocal entries, find, find_any
        plain = cache.get if fast is None else fast
        if notify is None:
            entries, find, find_any = cache, plain, plain
        elif policy is not None and policy.dated:
            find = find_any = _fresh_counting_lookup(plain, notify, policy.clock)
        else:
            find = find_any = _listeners.counting_lookup(plain, notify)
            entries = _listeners.CountingEntries(cache, notify)

    def own_hits() -> int:
        return hits

    def zero_hits() -> None:
        nonlocal hits
        hits = 0

    wrapper._instrument = instrument  # type: ignore[attr-defined]
    wrapper._own_hits = own_hits  # type: ignore[attr-defined]
    return MappingHitPath(wrapper, own_hits, zero_hits)


def _fresh_counting_lookup(
    find: Callable[[Hashable, object], Any], notify: Callable[[], None], now: Callable[[], float]
) -> Callable[[Hashable, object], Any]:
    """find(key, default) over dated entries, telling notify() of each fresh one found (an
    expired entry is a miss: default). The clock is read once: a fresh entry is handed on as
    one that never expires, so that the hit path, reading the clock again a moment later,
    cannot find it expired and count a miss for a call already told as a hit."""

    def find_counting(k: Hashable, default: object) -> Any:
        entry = find(k, default)
        if entry is default:
            return default
        if now() < entry.expires:
            notify()
            return Kept(entry.value, math.inf, math.inf, entry.error)
        return default

    return find_counting


def no_cache_wrapper(
    func: Callable[P, Awaitable[R]],
    display: str,
    key: Callable[..., Hashable],
    engine: Engine[Any, R],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """The wrapper without a cache: every call joins or starts a computation."""
    counts = engine.counts
    bind = engine.bind
    default_key = args_are_key(key)

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if SWITCH.watch and SWITCH.off():
            return await _bypass(counts, func, args, kwargs)
        try:
            k = args if default_key and not kwargs else key(*args, **kwargs)
            hash(k)
        except TypeError as exc:
            raise unhashable(display, exc) from exc
        table = engine.table
        if table is None or table.loop is not get_running_loop():
            table = bind()
        return await table.call(k, args, kwargs)

    return wrapper


def async_cache_wrapper(
    func: Callable[P, Awaitable[R]],
    key_of: Callable[[tuple[Any, ...], dict[str, Any]], Hashable],
    engine: Engine[Any, R],
    wrapped: bool = False,
) -> Callable[P, Coroutine[Any, Any, R]]:
    """The wrapper over an async cache: the queue looks the key up, shared among callers.
    ``wrapped``: a lookup may answer ``Raised`` (a remembered error), raised anew here."""
    counts = engine.counts
    require = engine.require

    if wrapped:

        async def raising(*args: P.args, **kwargs: P.kwargs) -> R:
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            result: Any = await require(key_of(args, kwargs), args, kwargs)
            if type(result) is Raised:
                raise result.error.rebuild()
            return result  # type: ignore[no-any-return]

        return raising

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if SWITCH.watch and SWITCH.off():
            return await _bypass(counts, func, args, kwargs)
        return await require(key_of(args, kwargs), args, kwargs)

    return wrapper
