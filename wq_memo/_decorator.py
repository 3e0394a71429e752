"""worker_queue(): memoize an async function through a hidden WorkerQueue.

The options and their validation, and the dispatch on the kind of cache: each kind gets its queue,
its flat wrapper (_hitpath) and its controls (_controls).
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping, MutableMapping, Sequence
from typing import (
    Any,
    Final,
    NamedTuple,
    ParamSpec,
    TypeVar,
    final,
    overload,
)

import cachetools
import cachetools.keys

from . import _listeners, _memo_registry, _naming
from ._batch import BatchDecorator, Batched, BatchOptions
from ._controls import AsyncCacheKind, MappingKind, Memoized, NoCacheKind, attach, kind_of
from ._engine import Engine
from ._flight import Flight, FlightTable
from ._hitpath import (
    async_cache_wrapper,
    mapping_hit_path,
    no_cache_wrapper,
    refresh_starter,
    unhashable,
)
from ._methods import InstanceKeys, MemoizedClassMethod, MemoizedMethod, MethodState
from ._policy import Kept, Policy, Raised, make_policy
from ._queue import WorkerQueue, facade, is_async_callable
from ._refresh import RefreshDeferred, Refresher, check_freshness_options, check_refresh_options
from ._store import Store
from ._ttl_lookup import fast_lookup, raw_timer
from .backends._protocol import (
    MISSING,
    AsyncCache,
    BatchFlightCache,
    CallKey,
    RefreshingCache,
    SingleFlightCache,
)

__all__ = ("worker_queue",)

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger("wq_memo")


class _Default:
    """The default cache: a fresh LRUCache(maxsize=128) for each decorated function."""

    def __repr__(self) -> str:
        return "LRUCache(maxsize=128)"


_DEFAULT_CACHE: Final = _Default()

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
    cache_if: Callable[[Any], object] | None = None
    ttl: float | Callable[[Any], object] | None = None
    cache_errors: dict[type[Exception], float] | None = None
    stale_if_error: float | None = None

    def policy_asked(self) -> bool:
        """Whether any of cache_if, ttl, cache_errors or stale_if_error was given."""
        return (
            self.cache_if is not None
            or self.ttl is not None
            or bool(self.cache_errors)
            or self.stale_if_error is not None
        )


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
    _check_policy_cache(options, cache)
    if cache is None:
        memoized = _dedup_only(func, display, key, options)
    elif isinstance(cache, MutableMapping):
        memoized = _with_mapping(func, display, cache, key, options, instances, refresher)
    else:
        shared = _naming.shared_name(func, options.name)
        memoized = _with_async_cache(func, display, cache, key, shared, options, refresher)
        _naming.claim(cache, shared, memoized)
    functools.update_wrapper(memoized, func)
    _memo_registry.register(memoized)
    memoized._refresher = refresher  # type: ignore[attr-defined]  # its due times, for tests
    if not isinstance(getattr(func, "__qualname__", None), str):
        memoized.__name__ = memoized.__qualname__ = display
    _listeners.track(memoized, kind_of(memoized).engine.counts, options.name or display)
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
    reference, what = _reference_lifetime(options, cache)
    after, backoff, jitter = check_refresh_options(
        options.refresh_after, options.refresh_backoff, options.jitter, reference, what
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
    return Refresher(after, backoff, jitter, clock, display, contains, dated, reference)


def _reference_lifetime(
    options: _Options, cache: MutableMapping[Any, Any] | AsyncCache
) -> tuple[float | None, str]:
    """The lifetime an entry gets unless its own ttl says otherwise, which refresh_after must be
    below and is a part of (see Refresher.delay), and how to name it: a numeric ttl= (the
    shorter of it and a TTLCache's ttl), else the cache's ttl; None if neither is known."""
    own = getattr(cache, "ttl", None)
    if isinstance(own, bool) or not isinstance(own, int | float):
        own = None
    ttl = options.ttl
    if isinstance(ttl, int | float) and not isinstance(ttl, bool):
        if own is not None and isinstance(cache, MutableMapping) and own < ttl:
            return float(own), "the cache's ttl"
        return float(ttl), "ttl"
    return (None if own is None else float(own)), "the cache's ttl"


_POLICY_OPTIONS: Final = "cache_if, ttl, cache_errors and stale_if_error"


def _check_policy_cache(
    options: _Options, cache: MutableMapping[Any, Any] | AsyncCache | None
) -> None:
    """Refuse the policy options with a cache, or an option, they do not work with (yet)."""
    if not options.policy_asked():
        return
    if cache is None:
        raise ValueError(
            f"@worker_queue: {_POLICY_OPTIONS} need a cache to keep results in; pass cache= "
            "(a cachetools cache, a dict or an async cache)"
        )
    if isinstance(cache, SingleFlightCache) and not _takes_lifetime(cache):
        raise ValueError(
            f"@worker_queue: {_POLICY_OPTIONS} are not supported with {type(cache).__name__}, "
            "whose get_or_compute stores values itself; use an in-process cache, a plain async "
            "cache or a RedisCache for them"
        )
    if (
        isinstance(cache, MutableMapping)
        and options.stale_if_error is not None
        and isinstance(cache, cachetools.TTLCache | cachetools.TLRUCache)
    ):
        raise ValueError(
            "@worker_queue: stale_if_error needs expired entries kept, which a "
            f"{type(cache).__name__} drops; use an LRUCache (or a dict) with ttl= instead"
        )
    dates = (
        options.ttl is not None or bool(options.cache_errors) or options.stale_if_error is not None
    )
    if (
        dates
        and isinstance(cache, cachetools.Cache)
        and cache.getsizeof is not cachetools.Cache.getsizeof
    ):
        raise ValueError(
            f"@worker_queue: ttl, cache_errors and stale_if_error are not supported with a "
            f"{type(cache).__name__} that sizes its values (getsizeof=): it would be handed "
            "wq_memo's dated entries, not the results; use one that counts entries, or "
            "cache_if alone"
        )
    if isinstance(cache, cachetools.TLRUCache) and (
        options.ttl is not None or options.cache_errors
    ):
        raise ValueError(
            "@worker_queue: ttl and cache_errors are not supported with a TLRUCache: its "
            "ttu(key, value, now) would be handed wq_memo's dated entries, not the results; "
            "use ttl= (a function of the result) with an LRUCache or a TTLCache instead"
        )


def _takes_lifetime(cache: object) -> bool:
    """Whether cache is a RedisCache, whose get_or_compute and refresh take ``lifetime=``
    (imported only if redis is, so that a cache of another kind needs no redis installed)."""
    module = sys.modules.get("wq_memo.backends.redis")
    return module is not None and isinstance(cache, module.RedisCache)


def _policy(
    options: _Options, display: str, cache: MutableMapping[Any, Any] | AsyncCache
) -> Policy | None:
    """The per-result policy asked for (None: none of its options)."""
    if not options.policy_asked():
        return None
    dated = isinstance(cache, MutableMapping) and (
        options.ttl is not None or bool(options.cache_errors) or options.stale_if_error is not None
    )
    # An async cache's entries carry their expiry (a remembered error, a value kept for the
    # stale window): on the wall clock by default, which every process and host shares.
    wrapped = not isinstance(cache, MutableMapping) and (
        bool(options.cache_errors) or options.stale_if_error is not None
    )
    clock = options.timer
    if clock is None and isinstance(cache, MutableMapping):
        clock = raw_timer(cache)  # a TTLCache's own clock: its expiry and the entries' agree
    if clock is None:
        timer = getattr(cache, "timer", None)
        clock = timer if callable(timer) else time.time if wrapped else time.monotonic
    return Policy(
        display,
        options.cache_if,
        options.ttl,
        options.cache_errors or {},
        options.stale_if_error,
        clock,
        options.refresh_backoff,
        dated,
        wrapped,
    )


def _dated_lookup(
    find: Callable[[Hashable, object], Any], clock: Callable[[], float]
) -> Callable[[Hashable, object], Any]:
    """find(key, miss) for a dated mapping: a fresh entry's value, else miss (a computation
    that waited in line looks its key up again through it)."""

    def lookup(k: Hashable, miss: object) -> Any:
        entry = find(k, miss)
        if type(entry) is not Kept or entry.error is not None or clock() >= entry.expires:
            return miss
        return entry.value

    return lookup


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
            raise unhashable(display, exc) from exc
        return k

    return key_of


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

    stored = _bookkeeping(instances, refresher)
    policy = _policy(options, display, cache)
    store: Store[Hashable, R] = Store(display, mapping=cache, stored=stored, policy=policy)
    if refresher is not None:
        store.deferred = refresher.started  # a stale value served is not refreshed ahead sooner
    lookup_now: Callable[[Hashable, object], Any] = cache.get if fast is None else fast
    if policy is not None and policy.dated:
        lookup_now = _dated_lookup(lookup_now, policy.clock)
    engine: Engine[Any, R] = Engine(
        func,
        options.maxsize,
        options.finish_timeout,
        miss=MISSING,
        lookup_now=lookup_now,
        store=store,
        on_refresh_failed=None if refresher is None else refresher.failed,
    )
    store.tables = _tables(engine)
    if policy is not None:
        policy.count_in(engine.counts)
    hit_path = mapping_hit_path(func, display, cache, key, engine, fast, refresher, policy)
    kind = MappingKind(
        engine,
        _key_builder(key, display),
        cache,
        store,
        instances,
        refresher,
        hit_path.own_hits,
        hit_path.zero_hits,
    )
    return attach(hit_path.wrapper, facade(engine), cache, kind)


def _dedup_only(
    func: Callable[P, Awaitable[R]],
    display: str,
    key: Callable[..., Hashable],
    options: _Options,
) -> Memoized[P, R]:
    engine: Engine[Any, R] = Engine(func, options.maxsize, options.finish_timeout, miss=MISSING)
    wrapper = no_cache_wrapper(func, display, key, engine)
    kind = NoCacheKind(engine, _key_builder(key, display))
    return attach(wrapper, facade(engine), None, kind)


def _with_async_cache(
    func: Callable[P, Awaitable[R]],
    display: str,
    cache: AsyncCache,
    key: Callable[..., Hashable],
    name: str,
    options: _Options,
    refresher: Refresher | None,
) -> Memoized[P, R]:
    engine: Engine[Any, R]
    on_refresh_failed = None if refresher is None else refresher.failed
    policy = _policy(options, display, cache)
    store: Store[Hashable, R] = Store(
        display,
        write=cache.set,
        single_flight=cache if isinstance(cache, SingleFlightCache) else None,
        stored=(
            None
            if refresher is None
            # Told only of its own writes under a policy, which the fence may refuse.
            else refresher.stored_fenced
            if isinstance(cache, RefreshingCache) and policy is not None
            else refresher.stored
        ),
        policy=policy,
        read=getattr(cache, "peek_kept", None) or getattr(cache, "peek", None) or cache.get,
    )
    wrapped = policy is not None and policy.wrapped
    if wrapped and refresher is not None:
        store.deferred = refresher.started  # a stale value served is not refreshed ahead sooner
    # The entries as kept (RedisCache's get answers a policy's entries as plain values).
    get_kept: Callable[[Hashable], Awaitable[Any]] = cache.get
    if wrapped and _takes_lifetime(cache):
        assert policy is not None
        # An entry past its expiry counts as a miss in the cache's stats(), as it is one here.
        get_kept = functools.partial(cache.get_kept, usable=policy.usable)  # type: ignore[attr-defined]
    if isinstance(cache, SingleFlightCache):
        single_flight = cache
        dating = (
            _dating(cache, refresher, policy)
            if refresher is not None and isinstance(cache, RefreshingCache)
            else None
        )

        def compute_single_flight(flight: Flight[Any, R]) -> Awaitable[R]:
            table = engine.table_now()

            async def compute() -> R:
                # Waiting for another process holds no slot: only computing here does. It runs
                # in a slot of its own (see _refresh_across) or its lender's, or, made inside a
                # computation of this queue, in that one's; else it takes one, unless a caller
                # of it that holds a slot lends it that one meanwhile (slot() is then False).
                if flight.background and not flight.callers and table.needs_slot(flight):
                    # A refresh nobody waits for, computing here after all (another process
                    # gave the key up): in a spare slot, or not now, so that no caller's miss
                    # waits behind it.
                    if not table.take_spare(flight):
                        raise RefreshDeferred(f"{display}(): no spare slot to refresh in now")
                    took = False  # its spare slot is given back when it ends
                else:
                    took = table.needs_slot(flight) and await table.slot(flight)
                table.computes(flight)
                try:
                    return await table.counted(lambda: func(*flight.args, **flight.kwargs))
                finally:
                    if took:
                        table.release()

            if flight.background and not isinstance(single_flight, RefreshingCache):
                return _refresh_beside(store, table, flight, compute)  # stored through store()
            # The cache stores what compute() returns: not if this table was left behind.
            checked = store.unless_abandoned(compute, table)
            if flight.refresh and isinstance(single_flight, RefreshingCache):
                return _refresh_across(
                    single_flight, store, table, flight, checked, refresher, dating
                )
            if flight.refresh:
                return _refresh_through(single_flight, store, flight.key, checked)
            return store.fenced(flight.key, checked, flight)

        lookup: Callable[[Hashable], Awaitable[Any]] = cache.get
        if dating is not None:  # unwraps kept entries too, under a wrapped policy
            lookup = dating
        elif wrapped:
            assert policy is not None
            lookup = _unwrapping(get_kept, policy, refresher)

        engine = Engine(
            func,
            options.maxsize,
            options.finish_timeout,
            miss=MISSING,
            compute=compute_single_flight,
            lookup=lookup,
            store=store,
            slotless=True,
            on_refresh_failed=on_refresh_failed,
        )
    else:
        engine = Engine(
            func,
            options.maxsize,
            options.finish_timeout,
            miss=MISSING,
            lookup=(
                _unwrapping(get_kept, policy, refresher)
                if wrapped and policy is not None
                else cache.get
            ),
            store=store,
            on_refresh_failed=on_refresh_failed,
        )
    store.tables = _tables(engine)
    if policy is not None:
        policy.count_in(engine.counts)
    if refresher is not None:
        engine.on_hit = refresh_starter(engine, refresher)
    key_of = _key_builder(key, display, name)
    wrapper = async_cache_wrapper(func, key_of, engine, wrapped)
    kind = AsyncCacheKind(engine, key_of, cache, store, refresher, display)
    return attach(wrapper, facade(engine), cache, kind)


def _unwrapping(
    get: Callable[[Hashable], Awaitable[Any]], policy: Policy, refresher: Refresher | None = None
) -> Callable[[Hashable], Awaitable[Any]]:
    """An async cache's get under a wrapped policy: a fresh entry's value, ``Raised`` for a
    fresh remembered error (the wrapper raises it), else MISSING. With ``refresher`` (a plain
    async cache, whose entries are dated by this process's own writes): what each entry read
    means for its refresh-ahead (``_date_kept``)."""
    unwrap = policy.unwrap
    if refresher is None:

        async def lookup(k: Hashable) -> Any:
            return unwrap(await get(k))

        return lookup

    async def lookup_dating(k: Hashable) -> Any:
        entry = await get(k)
        found = unwrap(entry)
        if found is not MISSING:
            _date_kept(refresher, policy, k, entry, found, None, None)
        return found

    return lookup_dating


def _date_kept(
    refresher: Refresher,
    policy: Policy,
    k: Hashable,
    entry: Any,
    found: Any,
    age: float | None,
    lifetime: float | None,
) -> None:
    """Tell refresher what an entry read under a wrapped policy means for its refresh-ahead
    (``found``: what it answers, not MISSING). A remembered error has no due time (it is raised
    until it expires, never refreshed ahead); a stale value served again (``warned``) is not
    refreshed ahead before its expiry, the next attempt after the back-off; a ``Kept`` value
    is dated by the expiry it carries (not by its Redis key's, which includes the stale
    window); a plain value by ``lifetime``. ``age``: seconds since it was written (None: not
    known; a plain async cache's entries are then dated by this process's writes alone)."""
    if type(found) is Raised:
        refresher.forget(k)
        return
    if type(entry) is Kept:
        left = entry.expires - policy.clock()
        if entry.warned:
            refresher.held(k, left, age)
        elif age is not None:
            refresher.written(k, age, age + left if math.isfinite(left) else None)
        return
    if age is not None:
        refresher.written(k, age, lifetime)


def _dating(
    cache: RefreshingCache, refresher: Refresher, policy: Policy | None
) -> Callable[[Hashable], Awaitable[Any]]:
    """A lookup of cache that tells refresher each entry's age (``written``), and, with a ttl
    function (entries' lifetimes differ), its lifetime read with it (``get_with_lifetime``).
    Under a wrapped policy it unwraps the entries as kept (``get_kept_with_lifetime``): a
    remembered error raised, a fresh value returned, an expired one a miss, each dated by
    ``_date_kept``."""
    kept_with_lifetime = getattr(cache, "get_kept_with_lifetime", None)
    if policy is not None and policy.wrapped and kept_with_lifetime is not None:
        unwrap = policy.unwrap
        lifetimes = policy.ttl_of is not None

        usable = policy.usable

        async def lookup_kept(k: Hashable) -> Any:
            entry, age, lifetime = await kept_with_lifetime(k, usable)
            found = unwrap(entry)
            if found is not MISSING:
                _date_kept(refresher, policy, k, entry, found, age, lifetime if lifetimes else None)
            return found

        return lookup_kept
    with_lifetime = getattr(cache, "get_with_lifetime", None)
    if policy is not None and policy.ttl_of is not None and with_lifetime is not None:

        async def lookup_with_lifetime(k: Hashable) -> Any:
            value, age, lifetime = await with_lifetime(k)
            if value is not MISSING and age is not None:
                refresher.written(k, age, lifetime)
            return value

        return lookup_with_lifetime

    async def lookup_with_age(k: Hashable) -> Any:
        value, age = await cache.get_with_age(k)
        if value is not MISSING and age is not None:
            refresher.written(k, age)
        return value

    return lookup_with_age


def _bookkeeping(
    instances: InstanceKeys | None, refresher: Refresher | None
) -> Callable[[Hashable, float | None], None] | None:
    """What a write to a mapping tells the instance keys and the refresh-ahead policy (the
    entry's lifetime too, see Refresher.stored)."""
    if instances is None:
        return None if refresher is None else refresher.stored
    of_instances = instances.stored
    if refresher is None:

        def instance_stored(k: Hashable, lifetime: float | None) -> None:
            of_instances(k)

        return instance_stored
    of_refresher = refresher.stored

    def stored(k: Hashable, lifetime: float | None) -> None:
        of_instances(k)
        of_refresher(k, lifetime)

    return stored


def _tables(engine: Engine[Any, R]) -> Callable[[], FlightTable[Any, R] | None]:
    """The engine's flight table now (None: not started), whose computations a prime forgets."""

    def table() -> FlightTable[Any, R] | None:
        return engine.table

    return table


async def _refresh_across(
    cache: RefreshingCache,
    store: Store[Hashable, R],
    table: FlightTable[Any, R],
    flight: Flight[Any, R],
    compute: Callable[[], Awaitable[R]],
    refresher: Refresher | None,
    dating: Callable[[Hashable], Awaitable[Any]] | None,
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
    if flight.waited and flight.background and refresher is not None and dating is not None:
        value = await dating(k)
        if type(value) is Raised or (value is not MISSING and not refresher.entry_due(k)):
            # Refreshed meanwhile, or (another process's miss having failed after the entry
            # expired) a remembered error, which is never refreshed ahead: raised to a caller
            # who joined, nothing computed.
            return value  # type: ignore[return-value]
    refreshed, value = await store.fenced_refresh(k, compute, flight)
    if refreshed:
        return value  # type: ignore[return-value]
    # Another process refreshes (or computes) it: the entry as it is, or, if it expired meanwhile,
    # the other process's result. Waiting for it holds no slot.
    table.give_back(flight)
    return await store.fenced(k, compute, flight)


async def _refresh_through(
    cache: SingleFlightCache,
    store: Store[Hashable, R],
    k: Hashable,
    compute: Callable[[], Awaitable[R]],
) -> R:
    """Compute k anew and store it, whatever the cache holds, through get_or_compute: the one
    store of a SingleFlightCache that a delete or clear made meanwhile keeps out. The entry is
    deleted first, so that get_or_compute computes."""
    await cache.delete(k)
    return await store.fenced(k, compute)


async def _refresh_beside(
    store: Store[Hashable, R],
    table: FlightTable[Any, R],
    flight: Flight[Any, R],
    compute: Callable[[], Awaitable[R]],
) -> R:
    """A background refresh with a SingleFlightCache that offers no refresh of its own: the
    entry stays for every reader while the new value is computed, and a failure leaves it as
    it is. The value is stored as a computation's is with an async cache (through set: such a
    cache fences it against a prime or a delete, not against another process)."""
    value = await compute()
    await store(flight.key, value, flight, table)
    return value


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
        cache_if: Callable[[Any], object] | None = None,
        ttl: float | Callable[[Any], float | None] | None = None,
        cache_errors: Mapping[type[Exception], float] | None = None,
        stale_if_error: float | None = None,
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
        cache_if: Callable[[Any], object] | None = None,
        ttl: float | Callable[[Any], float | None] | None = None,
        cache_errors: Mapping[type[Exception], float] | None = None,
        stale_if_error: float | None = None,
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
        TTLCache has, else ``time.monotonic``). An entry whose ``ttl`` is shorter than the
        numeric ``ttl`` (or the cache's) is due at the same part of its own lifetime as
        refresh_after is of that ttl (at half of it with no such ttl), never later than
        refresh_after.

        What is kept, and for how long (see the README): ``cache_if(result)`` false: the
        result goes to its callers and is not stored (counted in cache_info().uncached).
        ``ttl``: seconds an entry lives, a number or a function of the result (None: the
        cache's own lifetime); with a TTLCache the shorter wins, with a dict or LRUCache
        wq_memo enforces it, with an async cache it is ``set``'s ttl. ``cache_errors``
        ({ExceptionType: seconds}): such an exception is remembered that long, and calls
        raise it anew without computing. ``stale_if_error`` seconds: a recomputation that
        fails within that long after its entry expired serves the expired value instead,
        and the next attempt waits ``refresh_backoff``. Each works with an in-process cache
        (stale_if_error: not a TTLCache), a plain async cache and a RedisCache (not with
        other single-flight caches). Each works with refresh_after, with every cache that
        takes it: a background refresh's result goes through the policy as a computation's
        does (refused: the entry stays; failing: a fresh value stays, nothing remembered over
        it), a remembered error is never refreshed ahead, a stale value served not before
        ``refresh_backoff``; an entry an async cache or a RedisCache keeps for a stale window
        is due by its own expiry, not by the window's.

        Raises TypeError at decoration time for a function that is not async, and for a
        function an async cache cannot tell from others; ValueError for a bad parameter (a
        refresh_after that is not below the numeric ttl or the cache's ttl, say).
        """
        checked_if, checked_ttl, errors, stale = make_policy(
            cache_if, ttl, cache_errors, stale_if_error
        )
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
            checked_if,
            checked_ttl,
            errors,
            stale,
        )
        if func is not None:
            return _memoize(func, cache, options)

        def decorate(f: Callable[P, Awaitable[R]]) -> Memoized[P, R]:
            return _memoize(f, cache, options)

        return decorate

    @overload
    @staticmethod
    def batch(
        func: Callable[[list[K]], Awaitable[Mapping[K, V | BaseException]]], /
    ) -> Batched[K, V]: ...

    @overload
    @staticmethod
    def batch(
        func: Callable[[list[K]], Awaitable[Sequence[V | BaseException]]], /
    ) -> Batched[K, V]: ...

    @overload
    @staticmethod
    def batch(
        func: None = None,
        /,
        *,
        maxsize: int = 3,
        cache: MutableMapping[Any, Any] | BatchFlightCache | None = ...,
        key: Callable[[Any], Hashable] | None = None,
        finish_timeout: float = 3.0,
        name: str | None = None,
        max_batch: int = 100,
        max_wait: float = 0.0,
        refresh_after: float | None = None,
        refresh_backoff: float = 1.0,
        jitter: float = 0.0,
        timer: Callable[[], float] | None = None,
        cache_if: Callable[[Any], object] | None = None,
        ttl: float | Callable[[Any], float | None] | None = None,
        cache_errors: Mapping[type[Exception], float] | None = None,
        stale_if_error: float | None = None,
    ) -> BatchDecorator: ...

    @staticmethod
    def batch(
        func: Callable[[list[Any]], Awaitable[Any]] | None = None,
        /,
        *,
        maxsize: int = 3,
        cache: MutableMapping[Any, Any] | BatchFlightCache | _Default | None = _DEFAULT_CACHE,
        key: Callable[[Any], Hashable] | None = None,
        finish_timeout: float = 3.0,
        name: str | None = None,
        max_batch: int = 100,
        max_wait: float = 0.0,
        refresh_after: float | None = None,
        refresh_backoff: float = 1.0,
        jitter: float = 0.0,
        timer: Callable[[], float] | None = None,
        cache_if: Callable[[Any], object] | None = None,
        ttl: float | Callable[[Any], float | None] | None = None,
        cache_errors: Mapping[type[Exception], float] | None = None,
        stale_if_error: float | None = None,
    ) -> Batched[Any, Any] | BatchDecorator:
        """Load keys in batches: one call of the batch function for many keys, each key cached
        and computed once at a time.

        Use bare (``@worker_queue.batch``) or called (``@worker_queue.batch(max_batch=50)``)
        on ``async def load(keys: list[K]) -> Mapping[K, V]`` (or a sequence of values aligned
        with keys). ``await load(k)`` is k's value; ``await load.many(keys)`` the list of their
        values, in order. The keys asked for in one turn of the event loop (or within
        ``max_wait`` seconds of the first) go in one call, of at most ``max_batch`` keys; at most
        ``maxsize`` calls run at once. ``cache`` (default: a new LRUCache(maxsize=128)) and
        ``key`` (a key's cache key; default: the key itself) apply per key; with a RedisCache,
        a batch's keys are looked up (and their locks taken) in one round trip, keys another
        process computes are waited for, and the values computed here are stored fenced, in one
        round trip. ``finish_timeout`` and ``name`` mean what they mean for ``worker_queue``; so
        do ``refresh_after``, ``refresh_backoff``, ``jitter`` and ``timer``: the keys found due
        are refreshed in the background, in batches that take only spare slots (not with a
        RedisCache yet). ``cache_if``, ``ttl``, ``cache_errors`` and ``stale_if_error`` too,
        per key: each key's value (or failure: an exception as its value, ``KeyError`` for a
        key missing from the answer, the batch function's own exception for every key of the
        batch) is kept, dated or remembered on its own, with an in-process cache; with
        refresh_after, each key is due by its own lifetime and its refresh goes through the
        policy as a single function's does.

        Raises TypeError at decoration time for a function that is not async, a method or an
        async cache other than RedisCache; ValueError for a bad parameter. See the README's
        "Batch loading".
        """
        chosen = cachetools.LRUCache(maxsize=128) if isinstance(cache, _Default) else cache
        check_freshness_options(refresh_backoff, jitter, timer)
        checked_if, checked_ttl, errors, stale = make_policy(
            cache_if, ttl, cache_errors, stale_if_error
        )
        options = _Options(
            maxsize,
            chosen,
            cachetools.keys.hashkey,
            finish_timeout,
            name,
            refresh_after,
            refresh_backoff,
            jitter,
            timer,
            checked_if,
            checked_ttl,
            errors,
            stale,
        )
        if options.policy_asked() and chosen is None:
            raise ValueError(
                f"@worker_queue.batch: {_POLICY_OPTIONS} need a cache to keep results in; pass "
                "cache= (a cachetools cache or a dict)"
            )
        if options.policy_asked() and not isinstance(chosen, MutableMapping):
            raise ValueError(
                f"@worker_queue.batch: {_POLICY_OPTIONS} work with an in-process cache (a "
                "cachetools cache or a dict) only for batch functions, for now"
            )
        _check_policy_cache(options, chosen)

        def refresher(cache: MutableMapping[Any, Any] | None, display: str) -> Refresher | None:
            return _refresher(options, cache, display)

        def policy(cache: MutableMapping[Any, Any] | None, display: str) -> Policy | None:
            return None if cache is None else _policy(options, display, cache)

        batch_options = BatchOptions(
            maxsize,
            chosen,
            key,
            finish_timeout,
            name,
            max_batch,
            max_wait,
            refresher,
            result_policy=policy,
            refresh_asked=refresh_after is not None,
        )
        decorate = BatchDecorator(batch_options)
        if func is not None:
            return decorate(func)
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
refresh_after=None, refresh_backoff=1.0, jitter=0.0, timer=None, cache_if=None, ttl=None,
cache_errors=None, stale_if_error=None)``."""
