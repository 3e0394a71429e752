"""The one way a value is written to the cache, whatever wrote it, and the rules it applies.

Every write goes through a ``Store``: a computation's result (a miss, an explicit refresh, a
background refresh) and a prime alike. A feature that writes calls it; it never writes the cache
on a path of its own (tests/test_store_path.py fails a write made outside this module). The rules:

- invalidation wins: a forgotten computation (an invalidation, a clear or a prime of its key came
  while it ran) stores nothing, and an invalidation waits for a store already on its way
  (the table's ``storing``, kept here around the write; see ``stores_done``);
- a prime wins over the computations that began before it: it forgets them first, then waits for
  their stores on their way, then writes;
- the last computation's value is the one left: a store waits for the stores of earlier
  computations of its key still on their way;
- with a SingleFlightCache, a computation's write is fenced by the cache itself, inside its
  single-flight protocol (``fenced``, ``fenced_refresh``); a write outside a computation goes
  through the cache's ``set``, which such a cache fences against computations under way.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Hashable, MutableMapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._lookups import NotAsync
from ._policy import SKIP, CachedError, Kept, Policy

if TYPE_CHECKING:
    from ._flight import Flight, FlightTable
    from .backends._protocol import Missing, RefreshingCache, SingleFlightCache

__all__ = ("Store", "stores_done")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")


def _no_table() -> FlightTable[Any, Any] | None:
    return None


class Store(Generic[K, R]):
    """Writes values to one cache: an in-process ``mapping`` (synchronously, with ``now``), or
    an async cache's ``write`` (``cache.set``, awaited); ``single_flight``: a cache whose own
    protocol stores computations' results (``fenced``). ``stored(key)`` is told of each write
    (due times of refresh-ahead, instance keys). ``tables()`` is the queue's current flight
    table, whose computations a prime forgets (None: not started). ``policy``: what is kept
    and for how long (see _policy): a result it skips is not written, a ttl goes with the write
    (a ``Kept`` entry in a dated mapping, ``cache.set``'s ttl for an async cache), and a failed
    computation of a mapping may leave a remembered error or serve a stale value
    (``failed_now``). ``stored(key, seconds)`` is told the lifetime the
    policy gave the value (None: the cache's own)."""

    __slots__ = (
        "deferred",
        "mapping",
        "name",
        "policy",
        "single_flight",
        "stored",
        "tables",
        "write",
    )

    def __init__(
        self,
        name: str,
        *,
        mapping: MutableMapping[Any, Any] | None = None,
        write: Callable[..., Awaitable[None]] | None = None,
        single_flight: SingleFlightCache | None = None,
        stored: Callable[[K, float | None], None] | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.mapping = mapping
        self.write = write
        self.single_flight = single_flight
        self.stored = stored
        self.tables: Callable[[], FlightTable[K, R] | None] = _no_table
        self.deferred: Callable[[K], None] | None = None
        """Told of a key whose next attempt is put off ``backoff`` (its stale value served):
        refresh-ahead does not try it sooner either."""

    def now(self, key: K, value: R, flight: Flight[K, R] | None = None) -> bool:
        """Write value to the mapping: flight's result (nothing if flight is forgotten; a
        failure is logged) or, with no flight, a prime (computations of key under way are
        forgotten first; a failure propagates). A value too large for the cache is not cached.
        False: the policy keeps no such value (a prime with a ttl of 0, which its caller turns
        into an invalidation of key); nothing was written or forgotten.
        """
        if flight is not None and flight.forgotten:
            return True
        entry: Any = value
        seconds: Any = None
        if self.policy is not None:
            # A prime's bad ttl raises here, before anything under way is forgotten.
            seconds = self._lifetime(key, value, flight is None)
            if seconds is SKIP:
                return False
            entry = self._entry(value, seconds)
        if flight is None:
            table = self.tables()
            if table is not None:
                table.forget(key)  # a computation under way must not overwrite it
        mapping = self.mapping
        assert mapping is not None
        try:
            mapping[key] = entry
            if self.stored is not None:
                self.stored(key, seconds)
        except ValueError as exc:  # cachetools: the value is larger than the cache's maxsize
            logger.info("%s(): result not cached: %s", self.name, exc)
        except Exception:
            if flight is None:
                raise
            logger.exception("storing %r failed; the result was returned uncached", key)
        return True

    def _lifetime(self, key: K, value: R, primed: bool) -> Any:
        """The policy's lifetime of value (seconds, None or SKIP); a failing cache_if is logged
        and the result not stored, unless it is a prime's (the failure propagates)."""
        policy = self.policy
        assert policy is not None
        try:
            return policy.lifetime(value, primed)
        except Exception:
            if primed:
                raise
            logger.exception(
                "%s(): cache_if failed for %r; the result was not cached", self.name, key
            )
            policy.skipped()
            return SKIP

    def _lifetime_of(
        self, key: K, flight: Flight[K, R] | None, decided: list[tuple[bool, float | None]]
    ) -> Callable[[Any], tuple[bool, float | None]]:
        """The policy's decision on a computed value of key, for a cache that stores it itself
        (a RedisCache, fenced): whether to store it, and for how long (None: the cache's ttl),
        also appended to ``decided``. A forgotten computation's value is not stored, and not
        put to the policy, as with any other cache (the cache would refuse its store anyway)."""

        def lifetime(value: Any) -> tuple[bool, float | None]:
            if flight is not None and flight.forgotten:
                decision: tuple[bool, float | None] = (False, None)
            else:
                seconds = self._lifetime(key, value, False)
                decision = (False, None) if seconds is SKIP else (True, seconds)
            decided.append(decision)
            return decision

        return lifetime

    def _told(self, key: K, decided: list[tuple[bool, float | None]]) -> None:
        """Tell ``stored`` of a fenced write of key: with the policy's decision if this process
        computed it (nothing if the value was not stored); without a policy, as written now
        with the cache's lifetime. A value computed elsewhere under a policy is not told: its
        lifetime is unknown here, and the next read (``get_with_age``) dates it."""
        if self.stored is None:
            return
        if self.policy is None:
            self.stored(key, None)  # its write time, as near as this process knows it
        elif decided and decided[-1][0]:
            self.stored(key, decided[-1][1])

    def _entry(self, value: R, seconds: float | None) -> Any:
        """What the mapping holds for value, to live ``seconds`` (None: the cache's lifetime)
        under the policy: value itself, or a ``Kept`` entry dated on the policy's clock."""
        policy = self.policy
        assert policy is not None
        if not policy.dated:
            return value
        expires = policy.clock() + (math.inf if seconds is None else seconds)
        return Kept(value, expires, expires + (policy.stale or 0.0))

    def failed_now(self, key: K, exc: Exception, flight: Flight[K, R]) -> tuple[bool, Any]:
        """The outcome of flight, a computation of key in the mapping that raised exc, under
        the policy: its key's expired value if ``stale_if_error`` still allows it (the next
        attempt then waits ``backoff``), else exc, remembered if ``cache_errors`` names its
        type, unless key holds a fresh value (an explicit refresh failed), which is left as it
        is. A forgotten computation leaves nothing and serves nothing stale."""
        policy = self.policy
        mapping = self.mapping
        assert policy is not None
        assert mapping is not None
        if flight.forgotten:
            return (False, exc)
        now = policy.clock()
        try:
            old = mapping.get(key)
            if type(old) is Kept and old.error is None and now < old.expires:
                # A fresh value (an explicit refresh failed): the failure is raised, the value
                # left for the calls that follow, not replaced by a remembered error.
                return (False, exc)
            if (
                policy.stale is not None
                and type(old) is Kept
                and old.error is None
                and old.expires <= now < old.until
            ):
                if not old.warned:
                    logger.warning(
                        "%s(): computing %r failed (%r); serving its value expired %.3gs "
                        "ago (stale_if_error)",
                        self.name,
                        key,
                        exc,
                        now - old.expires,
                    )
                again = min(now + policy.backoff, old.until)  # the next attempt, no sooner
                mapping[key] = Kept(old.value, again, old.until, None, True)
                if self.deferred is not None:
                    self.deferred(key)
                policy.served_stale()
                return (True, old.value)
            seconds = policy.error_time(exc)
            if seconds is not None:
                expires = now + seconds
                mapping[key] = Kept(None, expires, expires, CachedError(type(exc), exc.args))
                if self.stored is not None:
                    self.stored(key, seconds)
        except Exception:
            logger.exception("%s(): keeping the failure of %r failed", self.name, key)
        return (False, exc)

    async def __call__(
        self,
        key: K,
        value: R,
        flight: Flight[K, R] | None = None,
        table: FlightTable[K, R] | None = None,
    ) -> bool:
        """Write value with the async cache: flight's result, computed in ``table`` (nothing
        is written if flight is forgotten, before or while earlier stores of key on their way
        land; a failure is logged if its callers have the value already, else it propagates)
        or, with no flight, a prime (computations of key under way are forgotten and their
        stores on their way awaited first; a failure propagates). False: as for ``now``."""
        write = self.write
        assert write is not None
        seconds: Any = None
        if flight is None and self.policy is not None:
            seconds = self._lifetime(key, value, True)  # a bad ttl fails the prime first
            if seconds is SKIP:
                return False
        if flight is None:
            table = self.tables()
            if table is not None:
                await stores_done(table, table.forget(key))
        else:
            assert table is not None
            if earlier := table.forgotten(key):
                # Stores of earlier computations of key still on their way land first: the last
                # computation's value is the one left in the cache.
                await stores_done(table, earlier)
            if flight.forgotten:
                return True  # invalidated (or primed) meanwhile
            if self.policy is not None:
                seconds = self._lifetime(key, value, False)
                if seconds is SKIP:
                    return True
            table.storing.add(flight)  # from here on, an invalidation waits for this store to end
        try:
            if seconds is None:
                await write(key, value)
            else:
                await write(key, value, seconds)
            if self.stored is not None:
                self.stored(key, seconds)
        except NotAsync as exc:
            if flight is None or flight.outcome is None:
                raise
            logger.error("%s; no result is stored until it is", exc)
            return True
        except Exception:
            if flight is None or flight.outcome is None:
                raise  # the prime's, or the outcome of a computation not delivered yet
            logger.exception("cache_set failed for %r; the result was returned uncached", key)
            return True
        finally:
            if flight is not None and table is not None:
                table.storing.discard(flight)
        if flight is None and table is not None:
            # Newcomers no longer share a lookup that began before the prime.
            table.forget_lookups(key)
        return True

    def unless_abandoned(
        self, compute: Callable[[], Awaitable[R]], table: FlightTable[Any, R]
    ) -> Callable[[], Awaitable[R]]:
        """compute(), for a computation of table through a SingleFlightCache, which stores
        whatever compute() returns: if table was left behind meanwhile (the queue moved to
        another event loop, or closed), the value is carried past the cache, which then stores
        nothing (``fenced`` hands it to the callers all the same)."""
        tables = self.tables

        async def checked() -> R:
            value = await compute()
            if tables() is not table:
                raise _Unstored(value)
            return value

        return checked

    async def fenced(
        self, key: K, compute: Callable[[], Awaitable[R]], flight: Flight[K, R] | None = None
    ) -> R:
        """key's value from the SingleFlightCache: found, computed elsewhere, or computed with
        compute() (for ``flight``) and written by the cache itself, fenced
        (``get_or_compute``), as the policy decides."""
        cache = self.single_flight
        assert cache is not None
        decided: list[tuple[bool, float | None]] = []
        try:
            if self.policy is None:
                value = await cache.get_or_compute(key, compute)
            else:
                value = await cache.get_or_compute(  # type: ignore[call-arg]
                    key, compute, lifetime=self._lifetime_of(key, flight, decided)
                )
        except _Unstored as exc:
            return exc.value  # type: ignore[no-any-return]
        self._told(key, decided)
        return value

    async def fenced_refresh(
        self, key: K, compute: Callable[[], Awaitable[R]], flight: Flight[K, R] | None = None
    ) -> tuple[bool, R | Missing]:
        """Refresh key through the RefreshingCache (``refresh``): (True, value) once computed
        and written by the cache itself, fenced; (False, MISSING) if another process holds it."""
        cache: RefreshingCache = self.single_flight  # type: ignore[assignment]
        decided: list[tuple[bool, float | None]] = []
        try:
            if self.policy is None:
                refreshed, value = await cache.refresh(key, compute)
            else:
                refreshed, value = await cache.refresh(  # type: ignore[call-arg]
                    key, compute, lifetime=self._lifetime_of(key, flight, decided)
                )
        except _Unstored as exc:
            return True, exc.value
        if refreshed:
            self._told(key, decided)
        return refreshed, value


class _Unstored(Exception):
    """Carries the value of a computation whose table was left behind past the cache's write
    (see ``Store.unless_abandoned``)."""

    def __init__(self, value: Any) -> None:
        super().__init__("a computation of an abandoned table: not stored")
        self.value = value


async def stores_done(table: FlightTable[Any, Any], flights: list[Flight[Any, Any]]) -> None:
    """Wait until the stores on their way (``table.storing``) of these forgotten computations
    of table end."""
    if not table.storing:
        return
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    tasks = [
        f.task
        for f in flights
        if f in table.storing
        and f.task is not None
        and not f.task.done()
        and f.task is not me
        and f.task.get_loop() is loop
    ]
    if tasks:
        await asyncio.wait(tasks)
