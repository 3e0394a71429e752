"""The contenders: wq_memo, the hand-written reference, and each peer as its users would write it.

A peer is imported when first used; when it is missing or fails to import, its rows say so and
the run goes on. Each recipe uses the peer's documented decorator with its defaults, mapping
the scenario's cache (unbounded, LRU of a size, TTL) onto the peer's nearest option.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

import cachetools
from cachetools.keys import hashkey

from wq_memo import worker_queue

AsyncFn = Callable[..., Awaitable[Any]]
CacheKind = Literal["dict", "lru", "ttl"]

TTL_SECONDS = 3600.0
"""The TTL of every TTL cache here: long enough never to expire during a run."""

UNBOUNDED = 10**9
"""A size for peers that cannot be unbounded."""


@dataclass(frozen=True)
class Setup:
    """The cache a scenario asks for, and wq_memo's concurrency bound."""

    cache: CacheKind = "dict"
    size: int = 1024
    maxsize: int = 3
    """wq_memo's maxsize (how many computations run at once); the peers have no such bound."""


def make_cache(setup: Setup) -> MutableMapping[Any, Any]:
    """A fresh cache of the kind the setup asks for."""
    if setup.cache == "lru":
        return cachetools.LRUCache(maxsize=setup.size)
    if setup.cache == "ttl":
        return cachetools.TTLCache(maxsize=setup.size, ttl=TTL_SECONDS)
    return {}


CACHE_NAMES: dict[CacheKind, str] = {"dict": "dict", "lru": "LRUCache", "ttl": "TTLCache"}


@dataclass(frozen=True)
class Contender:
    """One way to memoize an async function."""

    name: str
    module: str
    """What must import for the recipe to work."""
    distribution: str
    """The package that provides it (for its version)."""
    dedups: bool
    """Whether concurrent calls with equal arguments share one computation."""
    recipe: Callable[[Any, AsyncFn, Setup], AsyncFn]
    """(imported module, function, setup) -> the memoized function."""

    def load(self) -> Any:
        """The imported module; raises ImportError (or what the import raised) if unusable."""
        return importlib.import_module(self.module)

    def status(self) -> str | None:
        """None when usable, else why not ("not installed", "import failed: ...")."""
        try:
            self.load()
        except ModuleNotFoundError:
            return "not installed"
        except Exception as exc:
            return f"import failed: {type(exc).__name__}"
        return None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    def wrap(self, fn: AsyncFn, setup: Setup) -> AsyncFn:
        return self.recipe(self.load(), fn, setup)


# -- wq_memo and the reference -------------------------------------------------------------------


def _wq_memo(_: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    return worker_queue(maxsize=setup.maxsize, cache=make_cache(setup))(fn)


def reference_over(cache: MutableMapping[Any, Any], fn: AsyncFn) -> AsyncFn:
    """The hand-written memoizer: one key build, one lookup; no deduplication, no bounds."""

    async def memoized(*args: Any, **kwargs: Any) -> Any:
        k = hashkey(*args, **kwargs)
        try:
            return cache[k]
        except KeyError:
            pass
        value = await fn(*args, **kwargs)
        with contextlib.suppress(ValueError):  # larger than the cache
            cache[k] = value
        return value

    return memoized


def tuple_key_reference_over(cache: MutableMapping[Any, Any], fn: AsyncFn) -> AsyncFn:
    """The same, keyed by the arguments' tuple (equal to hashkey's key) when no keywords."""

    async def memoized(*args: Any, **kwargs: Any) -> Any:
        k = hashkey(*args, **kwargs) if kwargs else args
        try:
            return cache[k]
        except KeyError:
            pass
        value = await fn(*args, **kwargs)
        with contextlib.suppress(ValueError):  # larger than the cache
            cache[k] = value
        return value

    return memoized


def _reference(_: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    return reference_over(make_cache(setup), fn)


def _tuple_key_reference(_: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    return tuple_key_reference_over(make_cache(setup), fn)


# -- the peers ----------------------------------------------------------------------------------


def _async_lru(mod: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    if setup.cache == "dict":
        wrapped: AsyncFn = mod.alru_cache(maxsize=None)(fn)
    elif setup.cache == "ttl":
        wrapped = mod.alru_cache(maxsize=setup.size, ttl=TTL_SECONDS)(fn)
    else:
        wrapped = mod.alru_cache(maxsize=setup.size)(fn)
    return wrapped


def _asyncache(mod: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    wrapped: AsyncFn = mod.cached(make_cache(setup))(fn)
    return wrapped


def _cachetools_async(mod: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    wrapped: AsyncFn = mod.cached(make_cache(setup))(fn)
    return wrapped


def _aiocache(mod: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    # SimpleMemoryCache (the default) has no size bound; it does have TTLs.
    if setup.cache == "ttl":
        wrapped: AsyncFn = mod.cached(ttl=TTL_SECONDS)(fn)
    else:
        wrapped = mod.cached()(fn)
    return wrapped


def _aiocache_stampede(mod: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    # The lock's lease must outlast every computation here (the longest takes 1 s).
    if setup.cache == "ttl":
        wrapped: AsyncFn = mod.cached_stampede(lease=5, ttl=TTL_SECONDS)(fn)
    else:
        wrapped = mod.cached_stampede(lease=5)(fn)
    return wrapped


def _cashews(mod: Any, fn: AsyncFn, setup: Setup) -> AsyncFn:
    # A cache of its own per function, in memory; check_interval=0: no background expiry task.
    cache = mod.Cache()
    size = UNBOUNDED if setup.cache == "dict" else setup.size
    cache.setup("mem://", size=size, check_interval=0)
    ttl = TTL_SECONDS if setup.cache == "ttl" else None
    wrapped: AsyncFn = cache(ttl=ttl)(fn)
    return wrapped


WQ_MEMO = Contender("wq_memo", "wq_memo", "wq_memo", True, _wq_memo)
REFERENCE = Contender("hand-written", "cachetools", "cachetools", False, _reference)
TUPLE_KEY_REFERENCE = Contender(
    "hand-written, tuple key", "cachetools", "cachetools", False, _tuple_key_reference
)
ASYNC_LRU = Contender("async-lru", "async_lru", "async-lru", True, _async_lru)
PEERS: tuple[Contender, ...] = (
    ASYNC_LRU,
    Contender("cachetools-async", "cachetools_async", "cachetools-async", True, _cachetools_async),
    Contender("asyncache", "asyncache", "asyncache", False, _asyncache),
    Contender("aiocache", "aiocache", "aiocache", False, _aiocache),
    Contender("aiocache stampede", "aiocache", "aiocache", True, _aiocache_stampede),
    Contender("cashews", "cashews", "cashews", True, _cashews),
)
"""The peers, each as its documentation shows it. ``aiocache stampede`` is aiocache's
``cached_stampede`` (a lock around the computation); cashews deduplicates through its default
``protected=True``."""


def label(contender: Contender, setup: Setup | None = None) -> str:
    """A row label: the contender, with the cache it runs over when that is a choice."""
    if setup is None:
        return contender.name
    cache = CACHE_NAMES[setup.cache]
    if contender in (WQ_MEMO, REFERENCE, TUPLE_KEY_REFERENCE) or contender.module in (
        "asyncache",
        "cachetools_async",
    ):
        return f"{contender.name} ({cache})"
    if contender is ASYNC_LRU:
        return {
            "dict": "async-lru (maxsize=None)",
            "lru": "async-lru (maxsize=N)",
            "ttl": "async-lru (ttl)",
        }[setup.cache]
    return contender.name


def versions() -> dict[str, str]:
    """The version of wq_memo, cachetools, each peer and uvloop ("not installed" if absent)."""
    out = {"wq_memo": WQ_MEMO.version(), "cachetools": REFERENCE.version()}
    for peer in PEERS:
        status = peer.status()
        out[peer.distribution] = status or peer.version()
    uvloop = Contender("uvloop", "uvloop", "uvloop", False, _wq_memo)
    out["uvloop"] = uvloop.status() or uvloop.version()
    return out
