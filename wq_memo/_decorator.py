"""worker_queue(): memoize an async function through a hidden WorkerQueue."""

from __future__ import annotations

import functools
import logging
import time
from asyncio import get_running_loop
from collections.abc import Awaitable, Callable, Coroutine, Hashable, MutableMapping
from typing import (
    Any,
    Concatenate,
    Final,
    NamedTuple,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    final,
    overload,
)

import cachetools
import cachetools.keys

from . import _listeners, _memos, _naming
from ._counts import Counts
from ._flight import Flight, FlightTable
from ._methods import InstanceKeys, MemoizedClassMethod, MemoizedMethod, MethodState
from ._queue import WorkerQueue, is_async_callable
from ._refresh import NEVER, Refresher, check_freshness_options, check_refresh_options
from ._switch import SWITCH
from ._ttl_lookup import fast_lookup, raw_timer
from .backends._protocol import (
    MISSING,
    AsyncCache,
    CallKey,
    Missing,
    RefreshingCache,
    SingleFlightCache,
)

__all__ = ("BoundMemoized", "CacheInfo", "Memoized", "worker_queue")

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")

logger = logging.getLogger("wq_memo")


class CacheInfo(NamedTuple):
    """What cache_info() reports; hits + misses + joined is the number of calls."""

    hits: int
    """Calls answered from the cache."""
    misses: int
    """Calls that started a computation."""
    joined: int
    """Calls that joined a computation already under way."""
    maxsize: int | None
    """The cache's maxsize (None: unbounded, no cache, or an async cache)."""
    currsize: int | None
    """The cache's current size (None for an async cache)."""
    refreshes: int = 0
    """Background refreshes started (refresh_after)."""
    refresh_failures: int = 0
    """Background refreshes that failed (the old value was kept)."""
    bypassed: int = 0
    """Calls that ran the function directly, caching switched off (wq_memo.disabled())."""


class CacheControls(Protocol):
    """The attributes a memoized function has, looked up on it or on one of its instances."""

    __name__: str
    __qualname__: str

    @property
    def queue(self) -> WorkerQueue[Any, Any]:
        """The hidden WorkerQueue that computes the misses."""
        ...

    @property
    def cache(self) -> MutableMapping[Any, Any] | AsyncCache | None:
        """The cache given to the decorator (None: deduplication only), shared by instances."""
        ...

    def cache_info(self) -> CacheInfo:
        """Hits, misses and joins since the last clear (over every instance), and the cache's
        size."""
        ...

    def cache_clear(self) -> None:
        """Empty the cache and set cache_info()'s counts back to zero (a synchronous cache
        only; otherwise await acache_clear())."""
        ...

    async def acache_clear(self) -> None:
        """Empty the cache and set cache_info()'s counts back to zero, whatever kind it is."""
        ...


class Memoized(CacheControls, Protocol[P, R]):
    """What @worker_queue returns: the function, memoized, with its queue and cache at hand.

    On a method, ``instance.method.cache_info()`` and the other attributes work as well, and
    ``instance.method.cache_invalidate(...)`` removes that instance's entry.
    """

    __wrapped__: Callable[P, Awaitable[R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]: ...

    def cache_invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the entry of the call with these arguments; return whether there was one."""
        ...

    async def acache_invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the entry of the call with these arguments, whatever kind the cache is."""
        ...

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Compute the call now through the queue (joining one under way), store it, return it."""
        ...

    def cache_prime(self, value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Store value as the result of the call (a synchronous cache only)."""
        ...

    async def acache_prime(self, value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Store value as the result of the call, whatever kind the cache is."""
        ...

    def cache_peek(self, *args: P.args, **kwargs: P.kwargs) -> R | Missing:
        """The cached result of the call, or MISSING: no computation, not counted."""
        ...

    async def acache_peek(self, *args: P.args, **kwargs: P.kwargs) -> R | Missing:
        """The cached result of the call, or MISSING, whatever kind the cache is."""
        ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(
        self: Memoized[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> BoundMemoized[P2, R]: ...


class BoundMemoized(CacheControls, Protocol[P, R]):
    """A memoized method looked up on an instance: the instance is bound as the first argument."""

    __wrapped__: Callable[..., Awaitable[R]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]: ...

    def cache_invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove this instance's entry for these arguments; return whether there was one."""
        ...

    async def acache_invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove this instance's entry for these arguments, whatever kind the cache is."""
        ...

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Compute this instance's call now, store it, return it."""
        ...

    def cache_prime(self, value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Store value as the result of this instance's call (a synchronous cache only)."""
        ...

    async def acache_prime(self, value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        """Store value as the result of this instance's call."""
        ...

    def cache_peek(self, *args: P.args, **kwargs: P.kwargs) -> R | Missing:
        """This instance's cached result of the call, or MISSING."""
        ...

    async def acache_peek(self, *args: P.args, **kwargs: P.kwargs) -> R | Missing:
        """This instance's cached result of the call, or MISSING."""
        ...


def _unhashable(name: str, exc: TypeError) -> TypeError:
    return TypeError(
        f"{name}(): the arguments cannot be made into a cache key ({exc}); "
        "pass key= to @worker_queue to build a hashable key from them"
    )


class _Default:
    """The default cache: a fresh LRUCache(maxsize=128) for each decorated function."""

    def __repr__(self) -> str:
        return "LRUCache(maxsize=128)"


_DEFAULT_CACHE: Final = _Default()

_hashkey: Final[Callable[..., Hashable]] = cachetools.keys.hashkey

_GENERIC_KEYS: Final = (cachetools.keys.hashkey, cachetools.keys.typedkey)
"""Key functions that know nothing of instances: for methods, the instance is replaced by a
stand-in that is equal only to itself."""


class _Options(NamedTuple):
    maxsize: int
    cache: MutableMapping[Any, Any] | AsyncCache | None
    key: Callable[..., Hashable]
    finish_timeout: float
    name: str | None
    refresh_after: float | None
    refresh_backoff: float
    jitter: float
    timer: Callable[[], float] | None


def _memoize(func: Any, cache: Any, options: _Options) -> Memoized[P, R]:
    if isinstance(func, staticmethod):
        # @worker_queue above @staticmethod: memoize the function, then rewrap it.
        inner: Any = _memoize(func.__func__, cache, options)
        return staticmethod(getattr(inner, "_memoized", inner))  # type: ignore[return-value]
    if not callable(options.key):
        raise TypeError(
            f"@worker_queue: key must be a function building a cache key, got {options.key!r}"
        )
    if isinstance(cache, _Default):
        cache = cachetools.LRUCache(maxsize=128)
    if not (cache is None or isinstance(cache, MutableMapping | AsyncCache)):
        raise TypeError(
            f"@worker_queue: cache must be a MutableMapping (such as a cachetools cache), "
            f"an AsyncCache, or None; got {cache!r}"
        )
    options = options._replace(cache=cache)
    if isinstance(func, classmethod):
        # @worker_queue above @classmethod: bind the class ourselves, on every Python.
        _check_async(func.__func__)
        memoized: Any = MemoizedClassMethod(_build(func.__func__, options, MethodState(True)))
    else:
        _check_async(func)
        if _naming.in_class_body(func):
            state = MethodState()
            memoized = MemoizedMethod(_build(func, options, state), state)
        else:
            memoized = _build(func, options, None)
    return memoized  # type: ignore[no-any-return]


def _check_async(func: object) -> None:
    if not is_async_callable(func):
        raise TypeError(
            f"@worker_queue needs an async function (async def), got {func!r}; "
            "wrap a blocking function with asyncio.to_thread first"
        )


def _build(func: Any, options: _Options, state: MethodState | None) -> Any:
    """The memoized function for func's kind of cache; ``state``: func may be a method."""
    cache = options.cache
    display = _naming.describe(func)
    key = options.key
    instances: InstanceKeys | None = None
    if state is not None and key in _GENERIC_KEYS:
        if cache is None or isinstance(cache, MutableMapping):
            mapping = cache

            def drop(k: Hashable) -> None:
                if mapping is not None:
                    mapping.pop(k, None)

            def contains(k: Hashable) -> bool:
                return mapping is not None and k in mapping

            instances = InstanceKeys(drop, contains)
            key = _method_key(key, state, instances)
        else:
            key = _refuse_instances(key, state, display)
    refresher = _refresher(options, cache, display)
    if cache is None:
        memoized = _dedup_only(func, display, key, options)
    elif isinstance(cache, MutableMapping):
        memoized = _with_mapping(func, display, cache, key, options, instances, refresher)
    else:
        shared = _naming.shared_name(func, options.name)
        memoized = _with_async_cache(func, display, cache, key, shared, options, refresher)
        _naming.claim(cache, shared, memoized)
    functools.update_wrapper(memoized, func)
    _memos.register(memoized)
    memoized._refresher = refresher  # type: ignore[attr-defined]  # its due times, for tests
    if not isinstance(getattr(func, "__qualname__", None), str):
        memoized.__name__ = memoized.__qualname__ = display
    _listeners.track(memoized, options.name or display)
    return memoized


def _refresher(
    options: _Options, cache: MutableMapping[Any, Any] | AsyncCache | None, display: str
) -> Refresher | None:
    """The refresh-ahead policy asked for (None without refresh_after)."""
    check_freshness_options(options.refresh_backoff, options.jitter, options.timer)
    if options.refresh_after is None:
        return None
    if cache is None:
        raise ValueError(
            "@worker_queue: refresh_after needs a cache to refresh entries in; "
            "pass cache= (a cachetools cache, a dict or an async cache)"
        )
    after, backoff, jitter = check_refresh_options(
        options.refresh_after, options.refresh_backoff, options.jitter, getattr(cache, "ttl", None)
    )
    clock = options.timer
    if clock is None and isinstance(cache, MutableMapping):
        clock = raw_timer(cache)  # a TTLCache's own clock, read without its wrapper
    if clock is None:
        # A cache's own timer, so that refreshes and expiry share one clock.
        timer = getattr(cache, "timer", None)
        clock = timer if callable(timer) else time.monotonic
    contains = cache.__contains__ if isinstance(cache, MutableMapping) else None
    dated = isinstance(cache, RefreshingCache)
    return Refresher(after, backoff, jitter, clock, display, contains, dated)


def _method_key(
    key: Callable[..., Hashable], state: MethodState, instances: InstanceKeys
) -> Callable[..., Hashable]:
    of = instances.of

    def method_key(*args: Any, **kwargs: Any) -> Hashable:
        if state.method and args:
            return key(of(args[0]), *args[1:], **kwargs)
        return key(*args, **kwargs)

    return method_key


def _refuse_instances(
    key: Callable[..., Hashable], state: MethodState, display: str
) -> Callable[..., Hashable]:
    def method_key(*args: Any, **kwargs: Any) -> Hashable:
        if state.method:
            raise TypeError(
                f"{display}() is a method memoized in an async cache, whose keys must mean the "
                "same in every process: pass key= to @worker_queue that turns the instance "
                "into a value, e.g. key=lambda self, *args: (self.id, *args)"
            )
        return key(*args, **kwargs)

    return method_key


def _args_are_key(key: Callable[..., Hashable]) -> bool:
    """Whether the positional arguments' tuple can stand in for key(*args) without keywords.

    ``hashkey(*args)`` is a tuple subclass equal to ``args`` and hashing alike, so either finds
    the other's entries; the plain tuple is already built and hashes in C, where hashkey's
    tuple is built anew and hashes through a Python method on every lookup. Only for
    in-process caches: an async cache may serialize keys, and a tuple serializes differently.
    """
    return key is cachetools.keys.hashkey


def _key_builder(
    key: Callable[..., Hashable], display: str, name: str | None = None
) -> Callable[[tuple[Any, ...], dict[str, Any]], Hashable]:
    """The cache key of a call, checked hashable (wrapped in a CallKey for an async cache)."""

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        try:
            k: Hashable = key(*args, **kwargs)
            if name is not None:
                k = CallKey(name, k)
            hash(k)
        except TypeError as exc:
            raise _unhashable(display, exc) from exc
        return k

    return key_of


def _bypass(
    counts: Counts, func: Callable[..., Awaitable[R]], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Awaitable[R]:
    """A call made with caching switched off: counted, told to listeners, run directly."""
    counts.bypassed += 1
    _listeners.bypassed(counts.name)
    return func(*args, **kwargs)


def _peek(cache: MutableMapping[Any, Any], k: Hashable) -> Any:
    """The value cache holds for k, or MISSING, leaving its order of use alone where it can."""
    if isinstance(cache, cachetools.Cache):
        # Membership checks expiry but not order; Cache.__getitem__ reads without reordering.
        return cachetools.Cache.__getitem__(cache, k) if k in cache else MISSING
    return cache.get(k, MISSING)


def _refresh_starter(
    queue: WorkerQueue[Any, Any], refresher: Refresher
) -> Callable[[Hashable, tuple[Any, ...], dict[str, Any]], None]:
    """What a hit does once its entry is due: a background refresh through the queue."""
    clock = refresher.clock
    due_get = refresher.due.get

    def refresh_if_due(k: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if clock() >= due_get(k, NEVER):
            # First: a refresh that ends in its eager first step sets the key's next due time.
            refresher.started(k)
            queue._table_now().refresh_in_background(k, args, kwargs)

    return refresh_if_due


def _with_mapping(
    func: Callable[P, Awaitable[R]],
    display: str,
    cache: MutableMapping[Any, Any],
    key: Callable[..., Hashable],
    options: _Options,
    instances: InstanceKeys | None,
    refresher: Refresher | None,
) -> Memoized[P, R]:
    # A lookup that returns MISSING rather than raising KeyError: faster for a TTLCache, and on
    # a miss no exception keeps the caller's frame object alive while it waits.
    fast: Callable[[Hashable, object], Any] | None = fast_lookup(cache)
    if fast is None and type(cache) is dict:
        fast = cache.get

    def store_now(k: Hashable, value: R) -> None:
        try:
            cache[k] = value
        except ValueError as exc:  # cachetools: the value is larger than the cache's maxsize
            logger.info("%s(): result not cached: %s", display, exc)
            return
        if instances is not None:
            instances.stored(k)
        if refresher is not None:
            refresher.stored(k)

    queue: WorkerQueue[Any, R] = WorkerQueue._internal(
        func,
        options.maxsize,
        options.finish_timeout,
        miss=MISSING,
        lookup_now=cache.get if fast is None else fast,
        store_now=store_now,
        on_refresh_failed=None if refresher is None else refresher.failed,
    )
    counts = queue._counts
    hits = 0
    args_are_key = _args_are_key(key)
    # What the hit paths read the cache through: _listeners.track swaps in counting ones while
    # a listener wants hits, so that without one a hit costs nothing more.
    entries: Any = cache
    find_any = find = cache.get if fast is None else fast

    # The hot path: one key build, one lookup; no task, no future, no queue. As cachetools
    # does, one flat function per combination (the default key or not, a lookup returning
    # MISSING or raising KeyError, refresh-ahead or not): each test left out of the hit path
    # is measured time.
    if refresher is not None:
        clock = refresher.clock
        due_get = refresher.due.get
        refresh_if_due = _refresh_starter(queue, refresher)

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if args_are_key and not kwargs else key(*args, **kwargs)
            try:
                value = find_any(k, MISSING)
            except TypeError as exc:
                raise _unhashable(display, exc) from exc
            if value is not MISSING:
                hits += 1
                if clock() >= due_get(k, NEVER):
                    refresh_if_due(k, args, kwargs)
                return value  # type: ignore[no-any-return]
            table = queue._table
            if table is None or table.loop is not get_running_loop():
                table = queue._bind()
            return await table.call(k, args, kwargs)

    elif fast is not None and args_are_key:

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
            if SWITCH.watch and SWITCH.off():
                return await _bypass(counts, func, args, kwargs)
            k = args if not kwargs else _hashkey(*args, **kwargs)
            try:
                value = find(k, MISSING)
            except TypeError as exc:
                raise _unhashable(display, exc) from exc
            if value is not MISSING:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = queue._table
            if table is None or table.loop is not get_running_loop():
                table = queue._bind()
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
                raise _unhashable(display, exc) from exc
            if value is not MISSING:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = queue._table
            if table is None or table.loop is not get_running_loop():
                table = queue._bind()
            return await table.call(k, args, kwargs)

    elif args_are_key:

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
                raise _unhashable(display, exc) from exc
            else:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = queue._table
            if table is None or table.loop is not get_running_loop():
                table = queue._bind()
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
                raise _unhashable(display, exc) from exc
            else:
                hits += 1
                return value  # type: ignore[no-any-return]
            table = queue._table
            if table is None or table.loop is not get_running_loop():
                table = queue._bind()
            return await table.call(k, args, kwargs)

    def instrument(notify: Callable[[], None] | None) -> None:
        nonlocal entries, find, find_any
        plain = cache.get if fast is None else fast
        if notify is None:
            entries, find, find_any = cache, plain, plain
        else:
            find = find_any = _listeners.counting_lookup(plain, notify)
            entries = _listeners.CountingEntries(cache, notify)

    def own_hits() -> int:
        return hits

    # For _listeners.track (which must hold nothing referring to the cache).
    wrapper._instrument = instrument  # type: ignore[attr-defined]
    wrapper._own_hits = own_hits  # type: ignore[attr-defined]
    key_of = _key_builder(key, display)

    def purge() -> None:
        if instances is not None:
            instances.purge()

    def cache_info() -> CacheInfo:
        purge()
        maxsize = getattr(cache, "maxsize", None)
        return CacheInfo(
            hits + counts.hits,
            counts.misses,
            counts.joined,
            maxsize if isinstance(maxsize, int) else None,
            int(getattr(cache, "currsize", len(cache))),
            counts.refreshes,
            counts.refresh_failures,
            counts.bypassed,
        )

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        purge()
        k = key_of(args, kwargs)
        queue._forget(k)
        if refresher is not None:
            refresher.forget(k)
        if instances is not None:
            instances.forget(k)
        try:
            del cache[k]
        except KeyError:
            return False
        return True

    def cache_clear() -> None:
        try:
            purge()
            queue._forget_all()
            if refresher is not None:
                refresher.clear()
            if instances is not None:
                instances.clear()
            cache.clear()
        finally:
            counts.clear(hits, zero_hits)

    def zero_hits() -> None:
        nonlocal hits
        hits = 0

    def cache_prime(value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        k = key_of(args, kwargs)
        queue._forget(k)  # a computation under way must not overwrite it
        store_now(k, value)

    def cache_peek(*args: P.args, **kwargs: P.kwargs) -> R | Missing:
        return _peek(cache, key_of(args, kwargs))  # type: ignore[no-any-return]

    return _attach(
        wrapper,
        queue,
        cache,
        key_of,
        cache_info=cache_info,
        cache_clear=cache_clear,
        cache_invalidate=cache_invalidate,
        cache_prime=cache_prime,
        cache_peek=cache_peek,
    )


def _dedup_only(
    func: Callable[P, Awaitable[R]],
    display: str,
    key: Callable[..., Hashable],
    options: _Options,
) -> Memoized[P, R]:
    queue: WorkerQueue[Any, R] = WorkerQueue._internal(
        func, options.maxsize, options.finish_timeout, miss=MISSING
    )
    counts = queue._counts
    args_are_key = _args_are_key(key)

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if SWITCH.watch and SWITCH.off():
            return await _bypass(counts, func, args, kwargs)
        try:
            k = args if args_are_key and not kwargs else key(*args, **kwargs)
            hash(k)
        except TypeError as exc:
            raise _unhashable(display, exc) from exc
        table = queue._table
        if table is None or table.loop is not get_running_loop():
            table = queue._bind()
        return await table.call(k, args, kwargs)

    key_of = _key_builder(key, display)

    def cache_info() -> CacheInfo:
        return CacheInfo(
            counts.hits, counts.misses, counts.joined, None, 0, bypassed=counts.bypassed
        )

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        queue._forget(key_of(args, kwargs))
        return False

    def cache_clear() -> None:
        queue._forget_all()
        counts.clear()

    def cache_prime(value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        queue._forget(key_of(args, kwargs))  # no cache to hold it; later calls compute

    def cache_peek(*args: P.args, **kwargs: P.kwargs) -> R | Missing:
        key_of(args, kwargs)
        return MISSING

    return _attach(
        wrapper,
        queue,
        None,
        key_of,
        cache_info=cache_info,
        cache_clear=cache_clear,
        cache_invalidate=cache_invalidate,
        cache_prime=cache_prime,
        cache_peek=cache_peek,
    )


def _with_async_cache(
    func: Callable[P, Awaitable[R]],
    display: str,
    cache: AsyncCache,
    key: Callable[..., Hashable],
    name: str,
    options: _Options,
    refresher: Refresher | None,
) -> Memoized[P, R]:
    queue: WorkerQueue[Any, R]
    on_refresh_failed = None if refresher is None else refresher.failed
    if isinstance(cache, SingleFlightCache):
        single_flight = cache

        def compute_single_flight(flight: Flight[Any, R]) -> Awaitable[R]:
            table = queue._table_now()

            async def compute() -> R:
                # Waiting for another process holds no slot: only computing here does. It runs
                # in a slot of its own (see _refresh_across) or its lender's, or, made inside a
                # computation of this queue, in that one's; else it takes one, unless a caller
                # of it that holds a slot lends it that one meanwhile (slot() is then False).
                took = table.needs_slot(flight) and await table.slot(flight)
                table.computes(flight)
                try:
                    return await table.counted(lambda: func(*flight.args, **flight.kwargs))
                finally:
                    if took:
                        table.release()

            if flight.refresh and isinstance(single_flight, RefreshingCache):
                return _refresh_across(single_flight, table, flight, compute, refresher)
            if flight.background:
                return _refresh_beside(single_flight, flight, compute, refresher)
            if flight.refresh:
                return _refresh_through(single_flight, flight.key, compute, refresher)
            return _get_or_compute(single_flight, flight.key, compute, refresher)

        lookup: Callable[[Hashable], Awaitable[Any]] = cache.get
        if refresher is not None and isinstance(cache, RefreshingCache):
            refreshing = cache

            async def lookup_with_age(k: Hashable) -> Any:
                value, age = await refreshing.get_with_age(k)
                if value is not MISSING and age is not None:
                    refresher.written(k, age)
                return value

            lookup = lookup_with_age

        queue = WorkerQueue._internal(
            func,
            options.maxsize,
            options.finish_timeout,
            miss=MISSING,
            compute=compute_single_flight,
            lookup=lookup,
            slotless=True,
            on_refresh_failed=on_refresh_failed,
        )
    else:

        async def store(k: Hashable, value: R) -> None:
            await cache.set(k, value)
            if refresher is not None:
                refresher.stored(k)

        queue = WorkerQueue._internal(
            func,
            options.maxsize,
            options.finish_timeout,
            miss=MISSING,
            lookup=cache.get,
            store=store,
            on_refresh_failed=on_refresh_failed,
        )
    if refresher is not None:
        queue._on_hit = _refresh_starter(queue, refresher)
    require = queue._require
    counts = queue._counts
    key_of = _key_builder(key, display, name)

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if SWITCH.watch and SWITCH.off():
            return await _bypass(counts, func, args, kwargs)
        return await require(key_of(args, kwargs), args, kwargs)

    def cache_info() -> CacheInfo:
        return CacheInfo(
            counts.hits,
            counts.misses,
            counts.joined,
            None,
            None,
            counts.refreshes,
            counts.refresh_failures,
            counts.bypassed,
        )

    def synchronous(what: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise TypeError(
                f"{display}.{what}(): the cache is asynchronous; use await .a{what}(...)"
            )

        return refuse

    async def acache_clear() -> None:
        try:
            await queue._stores_done(queue._forget_all())
            if refresher is not None:
                refresher.clear()
            await cache.clear()
            queue._forget_lookups()
        finally:
            counts.clear()  # last: what was counted while it cleared is before the clear

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        k = key_of(args, kwargs)
        await queue._stores_done(queue._forget(k))
        if refresher is not None:
            refresher.forget(k)
        deleted = await cache.delete(k)
        queue._forget_lookups(k)
        return deleted

    async def acache_prime(value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        k = key_of(args, kwargs)
        # Computations under way must not overwrite it.
        await queue._stores_done(queue._forget(k))
        await cache.set(k, value)
        queue._forget_lookups(k)
        if refresher is not None:
            refresher.stored(k)

    # A cache that can read without counting the read (RedisCache.peek) is peeked through it.
    peek: Callable[[Hashable], Awaitable[Any]] = getattr(cache, "peek", None) or cache.get

    async def acache_peek(*args: P.args, **kwargs: P.kwargs) -> R | Missing:
        return await peek(key_of(args, kwargs))  # type: ignore[no-any-return]

    return _attach(
        wrapper,
        queue,
        cache,
        key_of,
        cache_info=cache_info,
        cache_clear=synchronous("cache_clear"),
        cache_invalidate=synchronous("cache_invalidate"),
        cache_prime=synchronous("cache_prime"),
        cache_peek=synchronous("cache_peek"),
        acache_clear=acache_clear,
        acache_invalidate=acache_invalidate,
        acache_prime=acache_prime,
        acache_peek=acache_peek,
    )


async def _get_or_compute(
    cache: SingleFlightCache,
    k: Hashable,
    compute: Callable[[], Awaitable[R]],
    refresher: Refresher | None,
) -> R:
    value = await cache.get_or_compute(k, compute)
    if refresher is not None:
        refresher.stored(k)  # its write time, as near as this process knows it
    return value


async def _refresh_across(
    cache: RefreshingCache,
    table: FlightTable[Any, R],
    flight: Flight[Any, R],
    compute: Callable[[], Awaitable[R]],
    refresher: Refresher | None,
) -> R:
    """A refresh (in the background, or f.refresh()): one process refreshes k, the others go
    on serving its entry. The value is stored as a computation's is (fenced).

    The key's lock, which every process sees, is tried only once this process has a slot to
    compute in: a refresh it cannot run now is left to idle processes. A background refresh
    that waited for its slot looks at the entry again first, and gives up if it was refreshed
    meanwhile (f.refresh() computes whatever it finds).
    """
    k = flight.key
    await table.hold(flight)  # a spare slot already, unless a caller joined it in line
    if flight.waited and flight.background and refresher is not None:
        value, age = await cache.get_with_age(k)
        if value is not MISSING and age is not None:
            refresher.written(k, age)
            if not refresher.entry_due(k):
                return value  # type: ignore[no-any-return]
    refreshed, value = await cache.refresh(k, compute)
    if refreshed:
        if refresher is not None:
            refresher.stored(k)
        return value  # type: ignore[return-value]
    # Another process refreshes (or computes) it: the entry as it is, or, if it expired meanwhile,
    # the other process's result. Waiting for it holds no slot.
    table.give_back(flight)
    return await cache.get_or_compute(k, compute)


async def _refresh_through(
    cache: SingleFlightCache,
    k: Hashable,
    compute: Callable[[], Awaitable[R]],
    refresher: Refresher | None,
) -> R:
    """Compute k anew and store it, whatever the cache holds, through get_or_compute: the one
    store of a SingleFlightCache that a delete or clear made meanwhile keeps out. The entry is
    deleted first, so that get_or_compute computes."""
    await cache.delete(k)
    return await _get_or_compute(cache, k, compute, refresher)


async def _refresh_beside(
    cache: SingleFlightCache,
    flight: Flight[Any, R],
    compute: Callable[[], Awaitable[R]],
    refresher: Refresher | None,
) -> R:
    """A background refresh with a SingleFlightCache that offers no refresh of its own: the
    entry stays for every reader while the new value is computed, and a failure leaves it as
    it is. The value is stored unless the computation was forgotten meanwhile (an invalidation,
    a clear or a prime here); such a cache gives no way to fence it against another process."""
    value = await compute()
    if not flight.forgotten:
        flight.storing = True  # from here on, an invalidation waits for this store to end
        try:
            await cache.set(flight.key, value)
        finally:
            flight.storing = False
        if refresher is not None:
            refresher.stored(flight.key)
    return value


def _attach(
    wrapper: Callable[P, Coroutine[Any, Any, R]],
    queue: WorkerQueue[Any, R],
    cache: MutableMapping[Any, Any] | AsyncCache | None,
    key_of: Callable[[tuple[Any, ...], dict[str, Any]], Hashable],
    **controls: Callable[..., Any],
) -> Memoized[P, R]:
    """Give wrapper its attributes: the queue, the cache and the per-call controls.

    The async forms that controls lack are made from the synchronous ones.
    """

    async def refresh(*args: P.args, **kwargs: P.kwargs) -> R:
        return await queue._table_now().call(key_of(args, kwargs), args, kwargs, refresh=True)

    async def acache_clear() -> None:
        controls["cache_clear"]()

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        return controls["cache_invalidate"](*args, **kwargs)  # type: ignore[no-any-return]

    async def acache_prime(value: R, /, *args: P.args, **kwargs: P.kwargs) -> None:
        controls["cache_prime"](value, *args, **kwargs)

    async def acache_peek(*args: P.args, **kwargs: P.kwargs) -> R | Missing:
        return controls["cache_peek"](*args, **kwargs)  # type: ignore[no-any-return]

    w: Any = wrapper
    w.queue = queue
    w.cache = cache
    w.refresh = refresh
    w.acache_clear = acache_clear
    w.acache_invalidate = acache_invalidate
    w.acache_prime = acache_prime
    w.acache_peek = acache_peek
    for attribute, control in controls.items():
        setattr(w, attribute, control)
    return w  # type: ignore[no-any-return]


@final
class _WorkerQueueDecorator:
    """The worker_queue decorator; see its instance's docstring."""

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]], /) -> Memoized[P, R]: ...

    @overload
    def __call__(
        self,
        func: None = None,
        /,
        *,
        maxsize: int = 3,
        cache: MutableMapping[Any, Any] | AsyncCache | None = ...,
        key: Callable[..., Hashable] = ...,
        finish_timeout: float = 3.0,
        name: str | None = None,
        refresh_after: float | None = None,
        refresh_backoff: float = 1.0,
        jitter: float = 0.0,
        timer: Callable[[], float] | None = None,
    ) -> Callable[[Callable[P, Awaitable[R]]], Memoized[P, R]]: ...

    def __call__(
        self,
        func: Callable[P, Awaitable[R]] | None = None,
        /,
        *,
        maxsize: int = 3,
        cache: MutableMapping[Any, Any] | AsyncCache | _Default | None = _DEFAULT_CACHE,
        key: Callable[..., Hashable] = cachetools.keys.hashkey,
        finish_timeout: float = 3.0,
        name: str | None = None,
        refresh_after: float | None = None,
        refresh_backoff: float = 1.0,
        jitter: float = 0.0,
        timer: Callable[[], float] | None = None,
    ) -> Memoized[P, R] | Callable[[Callable[P, Awaitable[R]]], Memoized[P, R]]:
        """Memoize an async function through a hidden WorkerQueue.

        Use bare (``@worker_queue``) or called (``@worker_queue(maxsize=8, cache=...)``).
        ``cache`` is any MutableMapping (a cachetools cache, a dict), an AsyncCache, or None
        for deduplication without caching; the default is a new LRUCache(maxsize=128).
        ``key`` builds the cache key from the call's arguments (default
        ``cachetools.keys.hashkey``). ``maxsize`` and ``finish_timeout`` are the queue's.
        ``name`` names the function in an async cache's keys (default: its module and
        qualified name; required where that is not unique, as for a function a factory makes).

        Refresh-ahead: with ``refresh_after`` seconds, an entry older than that is still
        returned at once, and one background refresh of it goes through the queue, in a slot no
        caller waits for (callers' computations do not count it against ``maxsize``); a failed
        refresh keeps the old value and is tried again ``refresh_backoff`` seconds later.
        ``jitter`` (a fraction) spreads each entry's refresh_after by up to that much either
        way. ``timer`` is the clock of entry ages (default: the cache's ``timer``, as a
        TTLCache has, else ``time.monotonic``).

        Raises TypeError at decoration time for a function that is not async, and for a
        function an async cache cannot tell from others; ValueError for a bad parameter (a
        refresh_after that is not below the cache's ttl, say).
        """
        options = _Options(
            maxsize,
            None,
            key,
            finish_timeout,
            name,
            refresh_after,
            refresh_backoff,
            jitter,
            timer,
        )
        if func is not None:
            return _memoize(func, cache, options)

        def decorate(f: Callable[P, Awaitable[R]]) -> Memoized[P, R]:
            return _memoize(f, cache, options)

        return decorate

    @staticmethod
    async def aclose_all() -> None:
        """Close every running queue, hidden ones included; same as WorkerQueue.aclose_all()."""
        await WorkerQueue.aclose_all()

    def __repr__(self) -> str:
        return "<wq_memo.worker_queue>"


worker_queue: Final = _WorkerQueueDecorator()
"""Memoize an async function through a hidden WorkerQueue: ``@worker_queue`` or
``@worker_queue(maxsize=3, cache=LRUCache(128), key=hashkey, finish_timeout=3.0, name=None,
refresh_after=None, refresh_backoff=1.0, jitter=0.0, timer=None)``."""
