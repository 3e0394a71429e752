"""worker_queue(): memoize an async function through a hidden WorkerQueue."""

from __future__ import annotations

import functools
import logging
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

from . import _naming
from ._flight import Flight
from ._methods import InstanceKeys, MemoizedClassMethod, MemoizedMethod, MethodState
from ._queue import WorkerQueue, is_async_callable
from ._ttl_lookup import fast_lookup
from .backends._protocol import MISSING, AsyncCache, CallKey, SingleFlightCache

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
        """Hits, misses and joins so far (over every instance), and the cache's size."""
        ...

    def cache_clear(self) -> None:
        """Empty the cache (a synchronous cache only; otherwise await acache_clear())."""
        ...

    async def acache_clear(self) -> None:
        """Empty the cache, whatever kind it is."""
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


def _memoize(
    func: Callable[P, Awaitable[R]],
    maxsize: int,
    cache: MutableMapping[Any, Any] | AsyncCache | _Default | None,
    key: Callable[..., Hashable],
    finish_timeout: float,
    name: str | None,
) -> Memoized[P, R]:
    if isinstance(func, staticmethod):
        # @worker_queue above @staticmethod: memoize the function, then rewrap it.
        inner = _memoize(func.__func__, maxsize, cache, key, finish_timeout, name)
        return staticmethod(getattr(inner, "_memoized", inner))  # type: ignore[return-value]
    if not callable(key):
        raise TypeError(f"@worker_queue: key must be a function building a cache key, got {key!r}")
    if isinstance(cache, _Default):
        cache = cachetools.LRUCache(maxsize=128)
    if not (cache is None or isinstance(cache, MutableMapping | AsyncCache)):
        raise TypeError(
            f"@worker_queue: cache must be a MutableMapping (such as a cachetools cache), "
            f"an AsyncCache, or None; got {cache!r}"
        )
    options = _Options(maxsize, cache, key, finish_timeout, name)
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

            instances = InstanceKeys(drop)
            key = _method_key(key, state, instances)
        else:
            key = _refuse_instances(key, state, display)
    if cache is None:
        memoized = _dedup_only(func, display, key, options)
    elif isinstance(cache, MutableMapping):
        memoized = _with_mapping(func, display, cache, key, options, instances)
    else:
        shared = _naming.shared_name(func, options.name)
        memoized = _with_async_cache(func, display, cache, key, shared, options)
        _naming.claim(cache, shared, memoized)
    functools.update_wrapper(memoized, func)
    if not isinstance(getattr(func, "__qualname__", None), str):
        memoized.__name__ = memoized.__qualname__ = display
    return memoized


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


def _with_mapping(
    func: Callable[P, Awaitable[R]],
    display: str,
    cache: MutableMapping[Any, Any],
    key: Callable[..., Hashable],
    options: _Options,
    instances: InstanceKeys | None,
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

    queue: WorkerQueue[Any, R] = WorkerQueue._internal(
        func,
        options.maxsize,
        options.finish_timeout,
        miss=MISSING,
        lookup_now=cache.get if fast is None else fast,
        store_now=store_now,
    )
    counts = queue._counts
    hits = 0
    args_are_key = _args_are_key(key)

    # The hot path: one key build, one lookup; no task, no future, no queue. As cachetools
    # does, one flat function per combination (the default key or not, a lookup returning
    # MISSING or raising KeyError): each test left out of the hit path is measured time.
    if fast is not None and args_are_key:
        find = fast

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
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
        find = fast

        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            nonlocal hits
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
            k = args if not kwargs else _hashkey(*args, **kwargs)
            try:
                value = cache[k]
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
            k = key(*args, **kwargs)
            try:
                value = cache[k]
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
        )

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        purge()
        try:
            k = key(*args, **kwargs)
            queue._forget(k)
            del cache[k]
        except KeyError:
            return False
        except TypeError as exc:
            raise _unhashable(display, exc) from exc
        return True

    def cache_clear() -> None:
        purge()
        queue._forget_all()
        cache.clear()

    async def acache_clear() -> None:
        cache_clear()

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        return cache_invalidate(*args, **kwargs)

    return _attach(
        wrapper,
        queue,
        cache,
        cache_info,
        cache_clear,
        cache_invalidate,
        acache_clear,
        acache_invalidate,
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
        try:
            k = args if args_are_key and not kwargs else key(*args, **kwargs)
            hash(k)
        except TypeError as exc:
            raise _unhashable(display, exc) from exc
        table = queue._table
        if table is None or table.loop is not get_running_loop():
            table = queue._bind()
        return await table.call(k, args, kwargs)

    def cache_info() -> CacheInfo:
        return CacheInfo(counts.hits, counts.misses, counts.joined, None, 0)

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        try:
            queue._forget(key(*args, **kwargs))
        except TypeError as exc:
            raise _unhashable(display, exc) from exc
        return False

    def cache_clear() -> None:
        queue._forget_all()

    async def acache_clear() -> None:
        cache_clear()

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        return cache_invalidate(*args, **kwargs)

    return _attach(
        wrapper,
        queue,
        None,
        cache_info,
        cache_clear,
        cache_invalidate,
        acache_clear,
        acache_invalidate,
    )


def _with_async_cache(
    func: Callable[P, Awaitable[R]],
    display: str,
    cache: AsyncCache,
    key: Callable[..., Hashable],
    name: str,
    options: _Options,
) -> Memoized[P, R]:
    queue: WorkerQueue[Any, R]
    if isinstance(cache, SingleFlightCache):
        single_flight = cache

        def compute_single_flight(flight: Flight[Any, R]) -> Awaitable[R]:
            table = queue._table_now()

            async def compute() -> R:
                # Waiting for another process holds no slot: only computing here does.
                await table.slot()
                flight.computing = True
                try:
                    return await func(*flight.args, **flight.kwargs)
                finally:
                    table.release()

            return single_flight.get_or_compute(flight.key, compute)

        queue = WorkerQueue._internal(
            func,
            options.maxsize,
            options.finish_timeout,
            miss=MISSING,
            compute=compute_single_flight,
            lookup=cache.get,
            slotless=True,
        )
    else:

        def store(k: Hashable, value: R) -> Awaitable[None]:
            return cache.set(k, value)

        queue = WorkerQueue._internal(
            func,
            options.maxsize,
            options.finish_timeout,
            miss=MISSING,
            lookup=cache.get,
            store=store,
        )
    require = queue._require
    counts = queue._counts

    def call_key(args: Any, kwargs: Any) -> CallKey:
        try:
            k = CallKey(name, key(*args, **kwargs))
            hash(k)
        except TypeError as exc:
            raise _unhashable(display, exc) from exc
        return k

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return await require(call_key(args, kwargs), args, kwargs)

    def cache_info() -> CacheInfo:
        return CacheInfo(counts.hits, counts.misses, counts.joined, None, None)

    def cache_clear() -> None:
        raise TypeError(
            f"{display}.cache_clear(): the cache is asynchronous; use await .acache_clear()"
        )

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        raise TypeError(
            f"{display}.cache_invalidate(): the cache is asynchronous; "
            "use await .acache_invalidate(...)"
        )

    async def acache_clear() -> None:
        await queue._stores_done(queue._forget_all())
        await cache.clear()

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        k = call_key(args, kwargs)
        flight = queue._forget(k)
        if flight is not None:
            await queue._stores_done([flight])
        return await cache.delete(k)

    return _attach(
        wrapper,
        queue,
        cache,
        cache_info,
        cache_clear,
        cache_invalidate,
        acache_clear,
        acache_invalidate,
    )


def _attach(
    wrapper: Callable[P, Coroutine[Any, Any, R]],
    queue: WorkerQueue[Any, R],
    cache: MutableMapping[Any, Any] | AsyncCache | None,
    cache_info: Callable[[], CacheInfo],
    cache_clear: Callable[[], None],
    cache_invalidate: Callable[P, bool],
    acache_clear: Callable[[], Coroutine[Any, Any, None]],
    acache_invalidate: Callable[P, Coroutine[Any, Any, bool]],
) -> Memoized[P, R]:
    w: Any = wrapper
    w.queue = queue
    w.cache = cache
    w.cache_info = cache_info
    w.cache_clear = cache_clear
    w.cache_invalidate = cache_invalidate
    w.acache_clear = acache_clear
    w.acache_invalidate = acache_invalidate
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
    ) -> Memoized[P, R] | Callable[[Callable[P, Awaitable[R]]], Memoized[P, R]]:
        """Memoize an async function through a hidden WorkerQueue.

        Use bare (``@worker_queue``) or called (``@worker_queue(maxsize=8, cache=...)``).
        ``cache`` is any MutableMapping (a cachetools cache, a dict), an AsyncCache, or None
        for deduplication without caching; the default is a new LRUCache(maxsize=128).
        ``key`` builds the cache key from the call's arguments (default
        ``cachetools.keys.hashkey``). ``maxsize`` and ``finish_timeout`` are the queue's.
        ``name`` names the function in an async cache's keys (default: its module and
        qualified name; required where that is not unique, as for a function a factory makes).

        Raises TypeError at decoration time for a function that is not async, and for a
        function an async cache cannot tell from others.
        """
        if func is not None:
            return _memoize(func, maxsize, cache, key, finish_timeout, name)

        def decorate(f: Callable[P, Awaitable[R]]) -> Memoized[P, R]:
            return _memoize(f, maxsize, cache, key, finish_timeout, name)

        return decorate

    @staticmethod
    async def aclose_all() -> None:
        """Close every running queue, hidden ones included; same as WorkerQueue.aclose_all()."""
        await WorkerQueue.aclose_all()

    def __repr__(self) -> str:
        return "<wq_memo.worker_queue>"


worker_queue: Final = _WorkerQueueDecorator()
"""Memoize an async function through a hidden WorkerQueue: ``@worker_queue`` or
``@worker_queue(maxsize=3, cache=LRUCache(128), key=hashkey, finish_timeout=3.0, name=None)``."""
