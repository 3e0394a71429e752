"""The controls of a memoized function, written once for functions, bound methods and class methods.

``cache_info()``, ``cache_clear()`` and the per-call controls (``cache_invalidate()``,
``cache_prime()``, ``cache_peek()``, their async forms, ``refresh()``): their public types, what
each kind of cache does for them (``MappingKind``, ``NoCacheKind``, ``AsyncCacheKind``), and
``Controls``, which turns a call's arguments into a request to that kind. A function's controls
pass the arguments as they are; a memoized method looked up on an instance (or a class method on
its class) is a ``BoundMethod``, whose controls put the instance first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Hashable, MutableMapping
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    NamedTuple,
    ParamSpec,
    Protocol,
    Self,
    TypeVar,
    overload,
)

import cachetools

from ._policy import CachedError, Kept, Raised
from .backends._protocol import MISSING, AsyncCache, Missing

if TYPE_CHECKING:
    from ._counts import Counts
    from ._engine import Engine
    from ._methods import InstanceKeys
    from ._queue import WorkerQueue
    from ._refresh import Refresher
    from ._store import Store

__all__ = (
    "AsyncCacheKind",
    "BoundMemoized",
    "BoundMethod",
    "CacheInfo",
    "CacheKind",
    "MappingKind",
    "Memoized",
    "NoCacheKind",
    "attach",
    "kind_of",
)

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")

KeyOf = Callable[[tuple[Any, ...], dict[str, Any]], Hashable]
"""Builds a call's cache key from its positional and keyword arguments."""


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
    uncached: int = 0
    """Results returned but not stored: ``cache_if`` was false, or ``ttl`` gave no lifetime."""
    stale: int = 0
    """Failed computations whose callers got an expired value instead (``stale_if_error``)."""


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


class PerCallControls(CacheControls, Protocol[P, R]):
    """The controls that take a call's arguments; on a method looked up on an instance, the
    call is that instance's."""

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

    def cache_peek(self, *args: P.args, **kwargs: P.kwargs) -> R | Missing | CachedError:
        """The cached result of the call, MISSING, or a CachedError for a remembered exception
        (``cache_errors``): no computation, not counted."""
        ...

    async def acache_peek(self, *args: P.args, **kwargs: P.kwargs) -> R | Missing | CachedError:
        """The cached result of the call, MISSING, or a CachedError, whatever kind the cache
        is."""
        ...


class Memoized(PerCallControls[P, R], Protocol[P, R]):
    """What @worker_queue returns: the function, memoized, with its queue and cache at hand.

    On a method, ``instance.method.cache_info()`` and the other attributes work as well, and
    ``instance.method.cache_invalidate(...)`` removes that instance's entry.
    """

    __wrapped__: Callable[P, Awaitable[R]]

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> Self: ...

    @overload
    def __get__(
        self: Memoized[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> BoundMemoized[P2, R]: ...


class BoundMemoized(PerCallControls[P, R], Protocol[P, R]):
    """A memoized method looked up on an instance: the instance is bound as the first argument."""

    __wrapped__: Callable[..., Awaitable[R]]


class CacheKind:
    """What the controls do with one kind of cache, given a call's arguments.

    The async forms run the synchronous ones unless a kind needs to await.
    """

    __slots__ = ("engine", "key_of")

    def __init__(self, engine: Engine[Any, Any], key_of: KeyOf) -> None:
        self.engine = engine
        self.key_of = key_of

    def cache_info(self) -> CacheInfo:
        raise NotImplementedError

    def cache_clear(self) -> None:
        raise NotImplementedError

    async def acache_clear(self) -> None:
        self.cache_clear()

    def invalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        raise NotImplementedError

    async def ainvalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return self.invalidate(args, kwargs)

    def prime(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    async def aprime(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.prime(value, args, kwargs)

    def peek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def apeek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.peek(args, kwargs)

    async def refresh(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        k = self.key_of(args, kwargs)
        return await self.engine.table_now().call(k, args, kwargs, refresh=True)


class MappingKind(CacheKind):
    """An in-process cache (a MutableMapping): every control is synchronous.

    ``own_hits()`` reads the hits the hit path counts itself, ``zero_hits()`` sets them back
    to zero; ``store`` is the one store of values, which a prime goes through too.
    """

    __slots__ = (
        "_counts",
        "_instances",
        "_own_hits",
        "_refresher",
        "_zero_hits",
        "cache",
        "store",
    )

    def __init__(
        self,
        engine: Engine[Any, Any],
        key_of: KeyOf,
        cache: MutableMapping[Any, Any],
        store: Store[Hashable, Any],
        instances: InstanceKeys | None,
        refresher: Refresher | None,
        own_hits: Callable[[], int],
        zero_hits: Callable[[], None],
    ) -> None:
        super().__init__(engine, key_of)
        self.cache = cache
        self.store = store
        self._counts: Counts = engine.counts
        self._instances = instances
        self._refresher = refresher
        self._own_hits = own_hits
        self._zero_hits = zero_hits

    def _purge(self) -> None:
        if self._instances is not None:
            self._instances.purge()

    def cache_info(self) -> CacheInfo:
        self._purge()
        cache, counts = self.cache, self._counts
        maxsize = getattr(cache, "maxsize", None)
        return CacheInfo(
            self._own_hits() + counts.hits,
            counts.misses,
            counts.joined,
            maxsize if isinstance(maxsize, int) else None,
            int(getattr(cache, "currsize", len(cache))),
            counts.refreshes,
            counts.refresh_failures,
            counts.bypassed,
            counts.uncached,
            counts.stale,
        )

    def cache_clear(self) -> None:
        try:
            self._purge()
            self.engine.forget_all()
            if self._refresher is not None:
                self._refresher.clear()
            if self._instances is not None:
                self._instances.clear()
            self.cache.clear()
        finally:
            self._counts.clear(self._own_hits(), self._zero_hits)

    def invalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return self._invalidate(self.key_of(args, kwargs))

    def _invalidate(self, k: Hashable) -> bool:
        self._purge()
        self.engine.forget(k)
        if self._refresher is not None:
            self._refresher.forget(k)
        if self._instances is not None:
            self._instances.forget(k)
        try:
            del self.cache[k]
        except KeyError:
            return False
        return True

    def prime(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        k = self.key_of(args, kwargs)
        if not self.store.now(k, value):
            # A value the policy keeps 0 seconds: what the key held goes, as at an
            # invalidation, rather than outlive the value primed over it.
            self._invalidate(k)

    def peek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The value held, or MISSING, leaving the cache's order of use alone where it can.
        cache, k = self.cache, self.key_of(args, kwargs)
        if isinstance(cache, cachetools.Cache):
            # Membership checks expiry but not order; Cache.__getitem__ reads without reordering.
            value = cachetools.Cache.__getitem__(cache, k) if k in cache else MISSING
        else:
            value = cache.get(k, MISSING)
        policy = self.store.policy
        if policy is None or not policy.dated or type(value) is not Kept:
            return value
        if policy.clock() >= value.expires:
            return MISSING  # expired: a stale value is served only when recomputing fails
        return value.value if value.error is None else value.error


class NoCacheKind(CacheKind):
    """No cache (deduplication only): nothing to remove, store or find."""

    __slots__ = ()

    def cache_info(self) -> CacheInfo:
        counts = self.engine.counts
        return CacheInfo(
            counts.hits, counts.misses, counts.joined, None, 0, bypassed=counts.bypassed
        )  # no cache: no policy either

    def cache_clear(self) -> None:
        self.engine.forget_all()
        self.engine.counts.clear()

    def invalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        self.engine.forget(self.key_of(args, kwargs))
        return False

    def prime(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.engine.forget(self.key_of(args, kwargs))  # no cache to hold it; later calls compute

    def peek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.key_of(args, kwargs)  # the arguments must still make a key
        return MISSING


class AsyncCacheKind(CacheKind):
    """An async cache: only the async forms work; the synchronous ones raise TypeError."""

    __slots__ = ("_display", "_peek", "_refresher", "cache", "store")

    def __init__(
        self,
        engine: Engine[Any, Any],
        key_of: KeyOf,
        cache: AsyncCache,
        store: Store[Hashable, Any],
        refresher: Refresher | None,
        display: str,
    ) -> None:
        super().__init__(engine, key_of)
        self.cache = cache
        self.store = store
        self._refresher = refresher
        self._display = display
        # A cache that can read without counting the read (RedisCache.peek) is peeked through it.
        self._peek: Callable[[Hashable], Awaitable[Any]] = getattr(cache, "peek", None) or cache.get

    def _refuse(self, what: str) -> TypeError:
        return TypeError(
            f"{self._display}.{what}(): the cache is asynchronous; use await .a{what}(...)"
        )

    def cache_info(self) -> CacheInfo:
        counts = self.engine.counts
        return CacheInfo(
            counts.hits,
            counts.misses,
            counts.joined,
            None,
            None,
            counts.refreshes,
            counts.refresh_failures,
            counts.bypassed,
            counts.uncached,
            counts.stale,
        )

    def cache_clear(self) -> None:
        raise self._refuse("cache_clear")

    async def acache_clear(self) -> None:
        engine = self.engine
        try:
            await engine.aforget_all()
            if self._refresher is not None:
                self._refresher.clear()
            await self.cache.clear()
            engine.forget_lookups()
        finally:
            engine.counts.clear()  # last: what was counted while it cleared is before the clear

    def invalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        raise self._refuse("cache_invalidate")

    async def ainvalidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return await self._ainvalidate(self.key_of(args, kwargs))

    async def _ainvalidate(self, k: Hashable) -> bool:
        engine = self.engine
        await engine.aforget(k)
        if self._refresher is not None:
            self._refresher.forget(k)
        deleted = await self.cache.delete(k)
        engine.forget_lookups(k)
        return deleted

    def prime(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise self._refuse("cache_prime")

    async def aprime(self, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        k = self.key_of(args, kwargs)
        if not await self.store(k, value):
            await self._ainvalidate(k)  # kept 0 seconds: as for a mapping's prime

    def peek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise self._refuse("cache_peek")

    async def apeek(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        policy = self.store.policy
        if policy is None or not policy.wrapped:
            return await self._peek(self.key_of(args, kwargs))
        read = self.store.read
        assert read is not None
        found = await read(self.key_of(args, kwargs))
        found = policy.unwrap(found)
        return found.error if type(found) is Raised else found


class Controls:
    """The per-call controls, once: each hands the call's arguments to the kind of cache.

    A subclass says where the kind is and what the call's arguments are (``_kind()`` and
    ``_args()``): a function's own, or a bound method's, with the instance first.
    """

    __slots__ = ()

    def _kind(self) -> CacheKind:
        raise NotImplementedError

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        raise NotImplementedError

    def cache_invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Remove the entry of the call with these arguments; return whether there was one."""
        return self._kind().invalidate(self._args(args), kwargs)

    async def acache_invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Remove the entry of the call with these arguments, whatever kind the cache is."""
        return await self._kind().ainvalidate(self._args(args), kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the call now through the queue (joining one under way), store it, return it."""
        return await self._kind().refresh(self._args(args), kwargs)

    def cache_prime(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Store value as the result of the call (a synchronous cache only)."""
        self._kind().prime(value, self._args(args), kwargs)

    async def acache_prime(self, value: Any, /, *args: Any, **kwargs: Any) -> None:
        """Store value as the result of the call, whatever kind the cache is."""
        await self._kind().aprime(value, self._args(args), kwargs)

    def cache_peek(self, *args: Any, **kwargs: Any) -> Any:
        """The cached result of the call, or MISSING: no computation, not counted."""
        return self._kind().peek(self._args(args), kwargs)

    async def acache_peek(self, *args: Any, **kwargs: Any) -> Any:
        """The cached result of the call, or MISSING, whatever kind the cache is."""
        return await self._kind().apeek(self._args(args), kwargs)


PER_CALL: tuple[str, ...] = (
    "cache_invalidate",
    "acache_invalidate",
    "refresh",
    "cache_prime",
    "acache_prime",
    "cache_peek",
    "acache_peek",
)
"""The controls Controls defines, set on a memoized function as its attributes."""


class _FunctionControls(Controls):
    """A memoized function's own controls: the call's arguments are those given."""

    __slots__ = ("_of",)

    def __init__(self, kind: CacheKind) -> None:
        self._of = kind

    def _kind(self) -> CacheKind:
        return self._of

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return args


class BoundMethod(Controls):
    """A memoized method looked up on an instance (or a class method on its class)."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Any, obj: Any) -> None:
        self.__func__ = func
        self.__self__ = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def _kind(self) -> CacheKind:
        kind: CacheKind = self.__func__._cache_kind
        return kind

    def _args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.__self__, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__func__, name)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BoundMethod)
            and self.__func__ is other.__func__
            and self.__self__ is other.__self__
        )

    def __hash__(self) -> int:
        return hash((id(self.__func__), id(self.__self__)))

    def __repr__(self) -> str:
        return f"<bound memoized method {self.__func__.__qualname__} of {self.__self__!r}>"


def attach(
    wrapper: Callable[P, Coroutine[Any, Any, R]],
    queue: WorkerQueue[Any, R],
    cache: MutableMapping[Any, Any] | AsyncCache | None,
    kind: CacheKind,
) -> Memoized[P, R]:
    """Give wrapper its attributes: the queue, the cache and the controls of kind."""
    w: Any = wrapper
    w.queue = queue
    w.cache = cache
    w._cache_kind = kind  # what a BoundMethod's controls go through
    w.cache_info = kind.cache_info
    w.cache_clear = kind.cache_clear
    w.acache_clear = kind.acache_clear
    controls = _FunctionControls(kind)
    for name in PER_CALL:
        setattr(w, name, getattr(controls, name))
    return w  # type: ignore[no-any-return]


def kind_of(memoized: Any) -> CacheKind:
    """What the controls of memoized (a function attach() was given) go through."""
    kind: CacheKind = memoized._cache_kind
    return kind
