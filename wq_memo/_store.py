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
from ._policy import SKIP, CachedError, Kept, Policy, Raised, StoredError, type_id
from .backends._protocol import MISSING as _MISSING

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
    computation may leave a remembered error or serve a stale value: ``failed_now`` for a
    mapping, ``failed`` for a plain async cache (read and written through ``read`` and
    ``write``), inside the fenced store for a RedisCache (``fenced``, ``fenced_refresh``).
    ``stored(key, seconds)`` is told the lifetime the policy gave the value (None: the cache's
    own)."""

    __slots__ = (
        "deferred",
        "mapping",
        "name",
        "policy",
        "read",
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
        read: Callable[[Any], Awaitable[Any]] | None = None,
    ) -> None:
        self.name = name
        self.read = read
        """An async cache's raw read (its entries as stored), for a failed computation's
        look at the key's expired entry (``failed``, ``fenced``)."""
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

    def _own_ttl(self) -> float | None:
        """The lifetime a single-flight cache gives an entry stored without a ttl (RedisCache's
        ``ttl``), which a stale window extends; None: unknown, or until evicted."""
        ttl = getattr(self.single_flight, "ttl", None)
        return float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) else None

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
        also appended to ``decided`` with the value's own lifetime (for ``_told``). A forgotten
        computation's value is not stored, and not put to the policy, as with any other cache
        (the cache would refuse its store anyway)."""

        def lifetime(value: Any) -> tuple[bool, float | None]:
            if flight is not None and flight.forgotten:
                decision: tuple[bool, float | None] = (False, None)
            elif type(value) is Kept:
                policy = self.policy
                assert policy is not None
                now = policy.clock()
                if value.error is not None or value.warned:
                    # A remembered error, or a stale value served again: kept in Redis until
                    # it expires, or until the end of its stale window.
                    decision = (True, max(value.until - now, 0.001))
                    # Not told to refresh-ahead as a value's write: a stale value served is
                    # not refreshed ahead before the back-off (``deferred``).
                    return decision
                else:
                    seconds = self._lifetime(key, value.value, False)
                    if seconds is SKIP:
                        decision = (False, None)
                    else:
                        if seconds is None:
                            seconds = self._own_ttl()
                        value.expires = now + (math.inf if seconds is None else seconds)
                        value.until = value.expires + (policy.stale or 0.0)
                        stale = policy.stale or 0.0
                        decision = (True, None if seconds is None else seconds + stale)
                        # Refresh-ahead dates it by its own lifetime, not by the stale window
                        # Redis keeps it for.
                        decided.append((True, seconds))
                        return decision
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
        try:
            entry, seconds = self._fallback(key, exc, mapping.get(key), policy.clock())
            if entry is not None:
                mapping[key] = entry
                if entry.error is None:
                    if self.deferred is not None:
                        self.deferred(key)  # not refreshed ahead before the next attempt
                    policy.served_stale()
                    return (True, entry.value)
                if self.stored is not None:
                    self.stored(key, seconds)
        except Exception:
            logger.exception("%s(): keeping the failure of %r failed", self.name, key)
        return (False, exc)

    def _fallback(
        self, key: K, exc: Exception, old: Any, now: float
    ) -> tuple[Kept | None, float | None]:
        """What a computation of key that raised exc leaves, its key's entry being ``old``
        (read before) under the policy: (a ``Kept`` to store, its ttl in seconds) for a stale
        value served again (``warned``) or a remembered error, or (None, None): exc goes to the
        callers, nothing stored (a fresh value is left as it is)."""
        policy = self.policy
        assert policy is not None
        if (
            policy.wrapped
            and old is not _MISSING
            and type(old) is not Kept
            and type(old) is not StoredError
        ):
            # A plain value (no stale window): the cache keeps it only while it is fresh, so
            # an explicit or background refresh failed over it; it stays.
            return None, None
        if type(old) is Kept and old.error is None:
            if now < old.expires:
                return None, None  # an explicit refresh failed: the fresh value stays
            if policy.stale is not None and now < old.until:
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
                return Kept(old.value, again, old.until, None, True), old.until - now
        seconds = policy.error_time(exc)
        if seconds is None:
            return None, None
        if self.single_flight is not None:
            # Shared with other processes: by a type they can look up in their own
            # cache_errors, with arguments JSON keeps exactly (nothing to unpickle).
            checks = getattr(self.single_flight, "can_remember", None)
            why = None
            if policy.resolve(type_id(type(exc))) is not type(exc):
                why = "its type is not found by its name among the cache_errors types"
            elif checks is None or not checks(exc.args):
                why = "its arguments cannot be stored as JSON (None, bool, int, float, str, list)"
            if why is not None:
                logger.warning("%s(): %s is not remembered: %s", self.name, type(exc).__name__, why)
                return None, None
        return Kept(None, now + seconds, now + seconds, CachedError(type(exc), exc.args)), seconds

    async def failed(
        self, key: K, exc: Exception, flight: Flight[K, R], table: FlightTable[K, R]
    ) -> tuple[bool, Any]:
        """``failed_now`` for a plain async cache: the outcome of flight, which raised exc. The
        key's entry is read, and what the policy leaves (a stale value served again, or a
        remembered error) is written through ``cache.set``, as a store is: not for a forgotten
        computation, and an invalidation waits for it."""
        policy = self.policy
        assert policy is not None
        assert self.read is not None
        assert self.write is not None
        if flight.forgotten:
            return (False, exc)
        try:
            old = await self.read(key)
        except Exception:
            logger.exception("%s(): reading %r after its computation failed", self.name, key)
            return (False, exc)
        if flight.forgotten:
            return (False, exc)
        now = policy.clock()
        entry, seconds = self._fallback(key, exc, old, now)
        if entry is None:
            return (False, exc)
        if earlier := table.forgotten(key):
            await stores_done(table, earlier)
        if flight.forgotten:
            return (False, exc)
        table.storing.add(flight)
        try:
            await self.write(key, entry, seconds)
            if entry.error is None:
                if self.deferred is not None:
                    self.deferred(key)  # not refreshed ahead before the next attempt
                policy.served_stale()
        except Exception:
            logger.exception("%s(): keeping the failure of %r failed", self.name, key)
        finally:
            table.storing.discard(flight)
        return (False, exc) if entry.error is not None else (True, entry.value)

    def _kept_compute(
        self, key: K, compute: Callable[[], Awaitable[R]], flight: Flight[K, R] | None
    ) -> tuple[Callable[[], Awaitable[Any]], list[Exception]]:
        """compute() for a RedisCache under a wrapped policy: a value comes back in a ``Kept``
        to be dated by the lifetime (with stale_if_error); a failure becomes the stale value
        served again or the remembered error (``_fallback``), which the cache stores fenced,
        or raises. The list receives the exception raised, for this process's callers."""
        policy = self.policy
        assert policy is not None
        raised: list[Exception] = []

        async def kept() -> Any:
            try:
                value = await compute()
            except _Unstored:
                raise
            except Exception as exc:
                if (
                    (flight is not None and flight.forgotten)
                    or self.read is None
                    or isinstance(exc, asyncio.CancelledError)  # also an Exception: cancellation
                    or (flight is not None and flight.background and not flight.joiners)
                ):
                    # A background refresh nobody awaits leaves the entry as it is (its
                    # failure is reported, nothing stale served or remembered).
                    raise
                old = await self.read(key)
                if flight is not None and flight.forgotten:
                    raise
                entry, _ = self._fallback(key, exc, old, policy.clock())
                if entry is None:
                    raise
                raised.append(exc)
                return entry
            if policy.stale is None:
                return value
            return Kept(value, math.nan, math.nan)  # dated by the lifetime, as it is stored

        return kept, raised

    def _unkept(
        self, key: K, value: Any, raised: list[Exception], flight: Flight[K, R] | None
    ) -> Any:
        """What a RedisCache's get_or_compute or refresh answered, for the callers: a value, a
        stale value served again (counted), or a remembered error raised (this process's own
        exception if it computed it, else rebuilt). A forgotten computation serves nothing
        stale: its exception is raised."""
        policy = self.policy
        assert policy is not None
        if raised:
            if (
                type(value) is Kept
                and value.error is None
                and not (flight is not None and flight.forgotten)
            ):
                if self.deferred is not None:
                    self.deferred(key)  # not refreshed ahead before the next attempt
                policy.served_stale()
                return value.value
            raise raised[0]
        if type(value) is Kept:
            if value.error is not None:
                raise value.error.rebuild()
            return value.value
        found = policy.unwrap(value)
        if type(found) is Raised:
            raise found.error.rebuild()
        return found

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
        entry: Any = value
        policy = self.policy
        own = seconds  # the entry's own lifetime, which refresh-ahead dates it by
        if policy is not None and policy.wrapped and policy.stale is not None:
            # Kept past its expiry for the stale window, the expiry in the entry itself.
            if seconds is None:
                seconds = self._own_ttl()
            expires = policy.clock() + (math.inf if seconds is None else seconds)
            entry = Kept(value, expires, expires + policy.stale)
            seconds = None if seconds is None else seconds + policy.stale
        try:
            if seconds is None:
                await write(key, entry)
            else:
                await write(key, entry, seconds)
            if self.stored is not None:
                self.stored(key, own)
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
        policy = self.policy
        decided: list[tuple[bool, float | None]] = []
        try:
            if policy is None:
                value = await cache.get_or_compute(key, compute)
            elif policy.wrapped:
                kept, raised = self._kept_compute(key, compute, flight)
                value = await cache.get_or_compute(  # type: ignore[call-arg]
                    key,
                    kept,
                    lifetime=self._lifetime_of(key, flight, decided),
                    usable=policy.usable,
                )
                value = self._unkept(key, value, raised, flight)
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
        policy = self.policy
        decided: list[tuple[bool, float | None]] = []
        try:
            if policy is None:
                refreshed, value = await cache.refresh(key, compute)
            elif policy.wrapped:
                kept, raised = self._kept_compute(key, compute, flight)
                refreshed, value = await cache.refresh(  # type: ignore[call-arg]
                    key, kept, lifetime=self._lifetime_of(key, flight, decided)
                )
                if refreshed:
                    value = self._unkept(key, value, raised, flight)
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
