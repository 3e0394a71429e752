"""worker_queue(): memoize an async function through a hidden WorkerQueue."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable, MutableMapping
from typing import (
    Any,
    Concatenate,
    Final,
    Generic,
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

from ._queue import WorkerQueue
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

    On a method, ``instance.method.cache_info()`` and the other attributes work as well; to
    invalidate one instance's entry, call ``Class.method.cache_invalidate(instance, ...)``.
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


@final
class _Call(Generic[R]):
    """One call, as the hidden queue sees it: it hashes and compares as its cache key."""

    __slots__ = ("args", "hash", "key", "kwargs")

    def __init__(self, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.key = key
        self.hash = hash(key)
        self.args = args
        self.kwargs = kwargs

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Call) and self.key == other.key)

    def __repr__(self) -> str:
        return f"<call key={self.key!r}>"


def _unhashable(func: Callable[..., Any], exc: TypeError) -> TypeError:
    return TypeError(
        f"{func.__qualname__}(): the arguments cannot be made into a cache key ({exc}); "
        "pass key= to @worker_queue to build a hashable key from them"
    )


class _Default:
    """The default cache: a fresh LRUCache(maxsize=128) for each decorated function."""

    def __repr__(self) -> str:
        return "LRUCache(maxsize=128)"


_DEFAULT_CACHE: Final = _Default()


def _memoize(
    func: Callable[P, Awaitable[R]],
    maxsize: int,
    cache: MutableMapping[Any, Any] | AsyncCache | _Default | None,
    key: Callable[..., Hashable],
    finish_timeout: float,
) -> Memoized[P, R]:
    if isinstance(func, classmethod | staticmethod):
        # @worker_queue above @classmethod: memoize the function, then rewrap it.
        inner = _memoize(func.__func__, maxsize, cache, key, finish_timeout)
        return type(func)(inner)  # type: ignore[return-value]
    if not (
        inspect.iscoroutinefunction(func)
        or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
    ):
        raise TypeError(
            f"@worker_queue needs an async function (async def), got {func!r}; "
            "wrap a blocking function with asyncio.to_thread first"
        )
    if not callable(key):
        raise TypeError(f"@worker_queue: key must be a function building a cache key, got {key!r}")
    if isinstance(cache, _Default):
        cache = cachetools.LRUCache(maxsize=128)
    if cache is None:
        wrapper = _dedup_only(func, key, maxsize, finish_timeout)
    elif isinstance(cache, MutableMapping):
        wrapper = _with_mapping(func, cache, key, maxsize, finish_timeout)
    elif isinstance(cache, AsyncCache):
        wrapper = _with_async_cache(func, cache, key, maxsize, finish_timeout)
    else:
        raise TypeError(
            f"@worker_queue: cache must be a MutableMapping (such as a cachetools cache), "
            f"an AsyncCache, or None; got {cache!r}"
        )
    functools.update_wrapper(wrapper, func)
    return wrapper


def _args_are_key(key: Callable[..., Hashable]) -> bool:
    """Whether the positional arguments' tuple can stand in for key(*args) without keywords.

    ``hashkey(*args)`` is a tuple subclass equal to ``args`` and hashing alike, so either finds
    the other's entries; the plain tuple is already built and hashes in C, where hashkey's
    tuple is built anew and hashes through a Python method on every lookup. Only for
    in-process caches: an async cache may serialize keys, and a tuple serializes differently.
    """
    return key is cachetools.keys.hashkey


def _call_worker(func: Callable[..., Awaitable[R]]) -> Callable[[_Call[R]], Awaitable[R]]:
    def work(call: _Call[R]) -> Awaitable[R]:
        return func(*call.args, **call.kwargs)

    return work


def _with_mapping(
    func: Callable[P, Awaitable[R]],
    cache: MutableMapping[Any, Any],
    key: Callable[..., Hashable],
    maxsize: int,
    finish_timeout: float,
) -> Memoized[P, R]:
    async def lookup(call: _Call[R]) -> Any:
        try:
            return cache[call.key]
        except KeyError:
            return MISSING

    async def store(call: _Call[R], value: R) -> None:
        try:
            cache[call.key] = value
        except ValueError as exc:  # cachetools: the value is larger than the cache's maxsize
            logger.info("%s(): result not cached: %s", func.__qualname__, exc)

    queue: WorkerQueue[_Call[R], R] = WorkerQueue(
        _call_worker(func), lookup, store, maxsize, finish_timeout
    )
    queue._miss = MISSING
    compute = queue._compute
    hits = 0
    args_are_key = _args_are_key(key)

    # The hot path: one key build, one lookup; no task, no future, no queue.
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        nonlocal hits
        k = args if args_are_key and not kwargs else key(*args, **kwargs)
        try:
            value = cache[k]
        except KeyError:
            pass
        except TypeError as exc:
            raise _unhashable(func, exc) from exc
        else:
            hits += 1
            return value  # type: ignore[no-any-return]
        return await compute(_Call(k, args, kwargs))

    def cache_info() -> CacheInfo:
        maxsize = getattr(cache, "maxsize", None)
        return CacheInfo(
            hits + queue._hits,
            queue._misses,
            queue._joined,
            maxsize if isinstance(maxsize, int) else None,
            int(getattr(cache, "currsize", len(cache))),
        )

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        try:
            del cache[key(*args, **kwargs)]
        except KeyError:
            return False
        except TypeError as exc:
            raise _unhashable(func, exc) from exc
        return True

    async def acache_clear() -> None:
        cache.clear()

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        return cache_invalidate(*args, **kwargs)

    return _attach(
        wrapper,
        queue,
        cache,
        cache_info,
        cache.clear,
        cache_invalidate,
        acache_clear,
        acache_invalidate,
    )


def _dedup_only(
    func: Callable[P, Awaitable[R]],
    key: Callable[..., Hashable],
    maxsize: int,
    finish_timeout: float,
) -> Memoized[P, R]:
    async def lookup(call: _Call[R]) -> Any:
        return MISSING

    async def store(call: _Call[R], value: R) -> None:
        pass

    queue: WorkerQueue[_Call[R], R] = WorkerQueue(
        _call_worker(func), lookup, store, maxsize, finish_timeout
    )
    queue._miss = MISSING
    compute = queue._compute
    args_are_key = _args_are_key(key)

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            k = args if args_are_key and not kwargs else key(*args, **kwargs)
            call: _Call[R] = _Call(k, args, kwargs)
        except TypeError as exc:
            raise _unhashable(func, exc) from exc
        return await compute(call)

    def cache_info() -> CacheInfo:
        return CacheInfo(queue._hits, queue._misses, queue._joined, None, 0)

    def cache_clear() -> None:
        pass

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        return False

    async def acache_clear() -> None:
        pass

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        return False

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
    cache: AsyncCache,
    key: Callable[..., Hashable],
    maxsize: int,
    finish_timeout: float,
) -> Memoized[P, R]:
    name = f"{func.__module__}.{func.__qualname__}"

    async def lookup(call: _Call[R]) -> Any:
        return await cache.get(call.key)

    work: Callable[[_Call[R]], Awaitable[R]]
    if isinstance(cache, SingleFlightCache):
        single_flight = cache

        def work_single_flight(call: _Call[R]) -> Awaitable[R]:
            return single_flight.get_or_compute(
                call.key, functools.partial(func, *call.args, **call.kwargs)
            )

        work = work_single_flight

        async def store(call: _Call[R], value: R) -> None:
            pass  # get_or_compute has stored it

    else:
        work = _call_worker(func)

        async def store(call: _Call[R], value: R) -> None:
            await cache.set(call.key, value)

    queue: WorkerQueue[_Call[R], R] = WorkerQueue(work, lookup, store, maxsize, finish_timeout)
    queue._miss = MISSING
    require = queue.require

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            call: _Call[R] = _Call(CallKey(name, key(*args, **kwargs)), args, kwargs)
        except TypeError as exc:
            raise _unhashable(func, exc) from exc
        return await require(call)

    def cache_info() -> CacheInfo:
        return CacheInfo(queue._hits, queue._misses, queue._joined, None, None)

    def cache_clear() -> None:
        raise TypeError(
            f"{func.__qualname__}.cache_clear(): the cache is asynchronous; "
            "use await .acache_clear()"
        )

    def cache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        raise TypeError(
            f"{func.__qualname__}.cache_invalidate(): the cache is asynchronous; "
            "use await .acache_invalidate(...)"
        )

    async def acache_clear() -> None:
        await cache.clear()

    async def acache_invalidate(*args: P.args, **kwargs: P.kwargs) -> bool:
        try:
            call_key = CallKey(name, key(*args, **kwargs))
            hash(call_key)
        except TypeError as exc:
            raise _unhashable(func, exc) from exc
        return await cache.delete(call_key)

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
    ) -> Memoized[P, R] | Callable[[Callable[P, Awaitable[R]]], Memoized[P, R]]:
        """Memoize an async function through a hidden WorkerQueue.

        Use bare (``@worker_queue``) or called (``@worker_queue(maxsize=8, cache=...)``).
        ``cache`` is any MutableMapping (a cachetools cache, a dict), an AsyncCache, or None
        for deduplication without caching; the default is a new LRUCache(maxsize=128).
        ``key`` builds the cache key from the call's arguments (default
        ``cachetools.keys.hashkey``). ``maxsize`` and ``finish_timeout`` are the queue's.

        Raises TypeError at decoration time for a function that is not async.
        """
        if func is not None:
            return _memoize(func, maxsize, cache, key, finish_timeout)

        def decorate(f: Callable[P, Awaitable[R]]) -> Memoized[P, R]:
            return _memoize(f, maxsize, cache, key, finish_timeout)

        return decorate

    @staticmethod
    async def aclose_all() -> None:
        """Close every running queue, hidden ones included; same as WorkerQueue.aclose_all()."""
        await WorkerQueue.aclose_all()

    def __repr__(self) -> str:
        return "<wq_memo.worker_queue>"


worker_queue: Final = _WorkerQueueDecorator()
"""Memoize an async function through a hidden WorkerQueue: ``@worker_queue`` or
``@worker_queue(maxsize=3, cache=LRUCache(128), key=hashkey, finish_timeout=3.0)``."""
