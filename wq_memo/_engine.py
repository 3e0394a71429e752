"""Engine: what a WorkerQueue and a memoized function share beneath them.

It holds the options a queue was built with, its counts, and its flight table on the running
event loop; it binds to that loop lazily and moves to a later one, keeping the cache; it looks
keys up (shared among callers) before joining or starting a computation; it forgets keys; it
shuts down. WorkerQueue is its public face; the decorator's hit paths and controls call it
directly, through the methods below, bound into closure locals at decoration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar, final

from . import _queue_registry as _registry
from ._counts import Counts, count_hit
from ._errors import QueueShutDown
from ._flight import _NO_KWARGS, Flight, FlightTable
from ._lookups import look_up
from ._state import FINISHED
from ._store import Store, stores_done

__all__ = ("Engine", "HitHook", "shutting_down")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")

HitHook = Callable[[Any, tuple[Any, ...], dict[str, Any]], None]
"""Told of a hit found by a lookup: the key and the call's arguments."""


def shutting_down() -> QueueShutDown:
    return QueueShutDown("the queue is shutting down; require() again once aclose() ends")


def _nobody() -> None:
    return None


@final
class Engine(Generic[K, R]):
    """The options, counts and flight table of one queue; see the module's docstring.

    ``func(*args, **kwargs)`` computes (or ``compute(flight)``, which then runs the whole
    computation itself); ``miss`` is what a lookup returns for a key it does not hold. An
    in-process cache is read with ``lookup_now``, an async one with ``lookup``; every write goes
    through ``store`` (see _store). ``slotless``: computations take their slots themselves
    (``FlightTable.slot()``), not before they start. ``on_refresh_failed`` is told of a
    background refresh that failed.
    """

    __slots__ = (
        "_closing",
        "_compute",
        "_lookup",
        "_lookup_now",
        "_miss",
        "_on_refresh_failed",
        "_owner",
        "_slotless",
        "_store",
        "counts",
        "finish_timeout",
        "func",
        "maxsize",
        "on_hit",
        "table",
    )

    def __init__(
        self,
        func: Callable[..., Awaitable[R]],
        maxsize: int,
        finish_timeout: float,
        *,
        miss: object,
        compute: Callable[[Flight[K, R]], Awaitable[R]] | None = None,
        lookup_now: Callable[[K, object], Any] | None = None,
        lookup: Callable[[K], Awaitable[Any]] | None = None,
        store: Store[K, R] | None = None,
        slotless: bool = False,
        on_refresh_failed: Callable[[K, BaseException], None] | None = None,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"WorkerQueue: maxsize must be an int of at least 1, got {maxsize!r}")
        if (
            isinstance(finish_timeout, bool)
            or not isinstance(finish_timeout, int | float)
            or not finish_timeout >= 0
        ):
            raise ValueError(
                f"WorkerQueue: finish_timeout must be a number of seconds >= 0, "
                f"got {finish_timeout!r}"
            )
        self.func = func
        self.maxsize = maxsize
        self.finish_timeout = float(finish_timeout)
        self._miss = miss
        self._compute = compute
        self._lookup_now = lookup_now
        self._lookup = lookup
        self._store = store
        self._slotless = slotless
        self._on_refresh_failed = on_refresh_failed
        self.table: FlightTable[K, R] | None = None
        """The flight table on the loop the engine runs on; None until started, once closed."""
        self._closing: asyncio.Task[None] | None = None
        self.counts = Counts()
        self.on_hit: HitHook | None = None
        """Told of each hit of require() (the decorator's refresh-ahead)."""
        self._owner: Callable[[], _registry.Closable | None] = _nobody
        """What is registered for aclose_all() while the engine is started (its WorkerQueue)."""

    def serve(self, owner: Callable[[], _registry.Closable | None]) -> None:
        """Register what owner() returns (a weak reference to the WorkerQueue in front of the
        engine) for aclose_all() whenever the engine starts."""
        self._owner = owner

    @property
    def live(self) -> int:
        """The items in flight on the table (0 when not started)."""
        table = self.table
        return table.live if table is not None else 0

    def started(self) -> bool:
        """Whether the engine has been started and not yet fully closed (it may be closing)."""
        return self.table is not None

    def bound_elsewhere(self) -> bool:
        """Whether the engine's computations belong to another event loop that is still running."""
        table = self.table
        if table is None:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return table.loop is not loop and table.loop.is_running()

    # -- requiring ------------------------------------------------------------------------------

    async def require(
        self, key: K, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> R:
        """Look key up (sharing a lookup under way), then join or start its computation.

        Hits are served while the queue closes; a miss then raises QueueShutDown. While a
        refresh of key is under way, the entry it replaces is served (looked up once).
        """
        looked = False
        # One table for the whole call: a call that starts over once the queue has closed (the
        # lookup it shared ended without an answer) is refused, as the caller it shared with
        # was; it does not start the queue again after aclose() has returned.
        table = self.table_now()
        while True:
            flight = table.flights.get(key)
            if flight is not None:
                if table.closing:
                    raise shutting_down()
                if flight.refresh and not looked:
                    looked = True
                    value = await look_up(self._lookup, key, self._miss)
                    if value is not self._miss:
                        # A refresh of key is under way already: no need to start one.
                        count_hit(self.counts)
                        return value  # type: ignore[no-any-return]
                    continue  # gone meanwhile: join the refresh, or start over if it ended
                return await table.join(flight)
            lookup = table.lookups.under_way(key)
            if lookup is None:
                return await self._look_up_then_call(table, key, args, kwargs)
            # Another caller is looking key up: no computation of it can start meanwhile.
            # Share what that caller finds, so as never to compute what it finds stored.
            answer = await lookup.shared(table.loop)
            if answer is not None:
                found, what = answer
                if found:
                    count_hit(self.counts)
                    if self.on_hit is not None:
                        self.on_hit(key, args, kwargs or _NO_KWARGS)
                    return what  # type: ignore[no-any-return]
                if what.state is not FINISHED or what.outcome is not None:
                    return await table.join(what)
                # Its computation ended with nobody to tell (every caller left): start over.
            # Otherwise that caller left without an answer (cancelled, refused): start over.

    async def _look_up_then_call(
        self,
        table: FlightTable[K, R],
        key: K,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
    ) -> R:
        lookup = table.lookups.begin(key)
        try:
            value = await look_up(self._lookup, key, self._miss)
            if value is not self._miss:
                count_hit(self.counts)
                table.answer(key, lookup, (True, value))
                if self.on_hit is not None:
                    self.on_hit(key, args, kwargs or _NO_KWARGS)
                return value  # type: ignore[no-any-return]
            # aclose() may have run while we looked: table.call refuses then, so that the
            # queue does not start again.
            return await table.call(key, args, kwargs or _NO_KWARGS, lookup)
        finally:
            table.answer(key, lookup, None)  # if not answered yet: those sharing start over

    def table_now(self) -> FlightTable[K, R]:
        """The flight table on the running loop, the engine started (or moved) there first."""
        table = self.table
        if table is None or table.loop is not asyncio.get_running_loop():
            table = self.bind()
        return table

    # -- invalidation ---------------------------------------------------------------------------

    def forget(self, key: K) -> None:
        """Make later calls of key start afresh; the computations under way will store nothing
        (the stores already on their way may still land: see ``aforget``)."""
        table = self.table
        if table is not None:
            table.forget(key)

    def forget_all(self) -> None:
        """``forget`` every key."""
        table = self.table
        if table is not None:
            table.forget_all()

    async def aforget(self, key: K) -> None:
        """``forget`` key, then wait until the stores already sent for its forgotten
        computations have ended."""
        table = self.table
        if table is not None:
            await stores_done(table, table.forget(key))

    async def aforget_all(self) -> None:
        """``aforget`` every key."""
        table = self.table
        if table is not None:
            await stores_done(table, table.forget_all())

    def forget_lookups(self, key: K | None = None) -> None:
        """After an invalidation's last await: newcomers no longer share a lookup of key (None:
        of any key) that began during it."""
        table = self.table
        if table is not None:
            table.forget_lookups(key)

    # -- the event loop -------------------------------------------------------------------------

    def bind(self) -> FlightTable[K, R]:
        """Start the engine on the running loop, leaving behind a loop that has stopped."""
        loop = asyncio.get_running_loop()
        old = self.table
        if old is not None and old.loop is not loop:
            if old.loop.is_running():
                raise RuntimeError(
                    "WorkerQueue is in use on another running event loop; "
                    "create one queue per event loop"
                )
            # The old loop has stopped: its computations finish only if it runs again, and
            # must not store then what may be stale. Forget them; the cache is kept.
            logger.debug("WorkerQueue moving to a new event loop; %d item(s) left behind", old.live)
            old.abandon()
            self._closing = None
        elif old is not None:
            return old
        table: FlightTable[K, R] = FlightTable(
            loop,
            self.func,
            self.maxsize,
            self.counts,
            miss=self._miss,
            compute=self._compute,
            lookup_now=self._lookup_now,
            lookup=self._lookup,
            store=self._store,
            slotless=self._slotless,
            on_refresh_failed=self._on_refresh_failed,
        )
        self.table = table
        owner = self._owner()
        if owner is not None:
            _registry.register(owner)
        return table

    def _unregister(self) -> None:
        owner = self._owner()
        if owner is not None:
            _registry.unregister(owner)

    # -- shutting down --------------------------------------------------------------------------

    def bound_here(self) -> bool:
        """Whether the engine is started on the running event loop."""
        table = self.table
        return table is not None and table.loop is asyncio.get_running_loop()

    async def aclose_at_once(self) -> None:
        """aclose() without the grace: every item in flight on the running loop (computing,
        waiting in line, a background refresh) is cancelled now and stores nothing; its callers
        get ShutdownTimeout, and its task gets up to ``finish_timeout`` seconds to end. A later
        require starts it again."""
        table = self.table
        if table is not None and table.loop is asyncio.get_running_loop():
            if not table.closing:
                table.close()
            table.forget_all()
            await table.abort(self.finish_timeout)
        await self.aclose()

    async def aclose(self) -> None:
        """Shut down gracefully; see WorkerQueue.aclose()."""
        table = self.table
        if table is None:
            return
        loop = asyncio.get_running_loop()
        if table.loop is not loop:
            if table.loop.is_running():
                raise RuntimeError(
                    "WorkerQueue.aclose() called from another event loop than the one it runs on"
                )
            # Its loop has stopped: nothing there finishes unless it runs again, and what
            # finishes then stores nothing.
            table.abandon()
            self.table = None
            self._closing = None
            self._unregister()
            return
        closing = self._closing
        if closing is None:
            table.close()  # now, not when the shutdown task first runs
            closing = loop.create_task(self._shutdown(table))
            if self.table is table:  # else an eager task factory has run the shutdown already
                self._closing = closing
        await asyncio.shield(closing)

    async def _shutdown(self, table: FlightTable[K, R]) -> None:
        try:
            try:
                async with asyncio.timeout(self.finish_timeout):
                    await table.wait_drained()
            except TimeoutError:
                logger.warning(
                    "aclose(): %d item(s) unfinished after finish_timeout=%ss; cancelling them",
                    table.live,
                    self.finish_timeout,
                )
                await table.abort(self.finish_timeout)
        finally:
            if self.table is table:
                self.table = None
                self._closing = None
                self._unregister()
