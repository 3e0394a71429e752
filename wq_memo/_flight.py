"""The in-flight table: every state change of an item being computed happens here.

An item in flight is, in order:

- WAITING: in the line for one of ``maxsize`` slots. The first ``maxsize`` items in line are
  accepted; the callers of the others wait for room, and a close refuses them.
- RUNNING: its computation task runs, in a slot of its own or in the slot of a computation of
  the same queue that is suspended waiting for it (a nested call).
- FINISHED: its outcome is delivered and it has left the table.

Callers never wake up for room: each one awaits a future of its own, which the computation's
task completes directly with the result or the exception. A slot that frees up goes to the
first item in line, so computations start in the order their first callers arrived. Calls are
counted when their item starts (as a miss for its first caller, joins for the others); the first
caller of an item that waited in line is counted once its key has been looked up again, as a
hit or a miss, so that no count is ever taken back. The table belongs to one event loop;
WorkerQueue makes a new one when the loop changes.

Background refreshes (nobody waits for them) never take a slot a caller could use: one starts
only in a *spare* slot, while fewer than ``maxsize`` computations run in all and no caller waits
for a slot, and the callers' computations do not count the spare slots against ``maxsize``. So a
miss never waits behind a refresh; at most ``maxsize`` refreshes and ``maxsize`` computations for
callers run at once (``2 * maxsize``), and refreshes alone never go past ``maxsize``.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import sys
from asyncio import Future, Task
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, Generic, TypeVar

from . import _listeners
from ._errors import QueueShutDown, ShutdownTimeout

__all__ = ("Counts", "Flight", "FlightTable", "Lookup", "Status")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")

_current: Final[contextvars.ContextVar[Flight[Any, Any] | None]] = contextvars.ContextVar(
    "wq_memo_current_flight", default=None
)
"""The computation whose task the running code belongs to (None outside any computation)."""

_NO_KWARGS: Final[dict[str, Any]] = {}

_EAGER_START: Final = sys.version_info >= (3, 12)
"""Whether tasks can run their first step eagerly (Task(..., eager_start=True), Python 3.12+)."""


class NotAsync(TypeError):
    """A cache function that must be async returned something that cannot be awaited."""


class Status(enum.Enum):
    """Where an item is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# Module-level names: reading an Enum member through its class is slow on the hot path.
_WAITING: Final = Status.WAITING
_RUNNING: Final = Status.RUNNING
_FINISHED: Final = Status.FINISHED


class Counts:
    """Calls answered by the cache, calls that started a computation, calls that joined one;
    background refreshes started, and those that failed; calls that bypassed the cache.
    ``name``: the memoized function's name that listeners are told (None: nobody is told).

    The counts are those since the last ``clear()``; ``before`` keeps what was counted before
    it, so that ``total()`` never goes down.
    """

    __slots__ = (
        "before",
        "bypassed",
        "clears",
        "dropped",
        "hits",
        "joined",
        "misses",
        "name",
        "refresh_failures",
        "refreshes",
    )

    FIELDS: Final = (
        "hits",
        "misses",
        "joined",
        "refreshes",
        "refresh_failures",
        "dropped",
        "bypassed",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.before: dict[str, int] = dict.fromkeys(self.FIELDS, 0)
        self.clears = 0
        """Odd while a clear() moves the counts: a reader in another thread (metrics
        collection) reads again until it is even and unchanged across its reads."""
        self._zero()

    def clear(self, hits: int = 0, then: Callable[[], None] | None = None) -> None:
        """Count afresh from now on (cache_clear()), keeping what was counted in ``before``.

        ``hits``: hits counted elsewhere until now (an in-process cache's hit path), kept too;
        ``then()`` sets that count back to zero, within the same step for readers.
        """
        self.clears += 1
        try:
            before = self.before
            for field in self.FIELDS:
                before[field] += getattr(self, field)
            before["hits"] += hits
            self._zero()
            if then is not None:
                then()
        finally:
            self.clears += 1

    def total(self, field: str) -> int:
        """A count since the start, clears or not (hits of an in-process hit path left out)."""
        return self.before[field] + getattr(self, field)  # type: ignore[no-any-return]

    def _zero(self) -> None:
        self.hits = 0
        self.misses = 0
        self.joined = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.dropped = 0
        """Items counted as misses that never started: every caller left while they waited."""
        self.bypassed = 0


class Flight(Generic[K, R]):
    """One item in flight: its key, its arguments, its callers' futures and its state."""

    __slots__ = (
        "args",
        "asking",
        "awaiting",
        "background",
        "borrowed",
        "borrowers",
        "computing",
        "context",
        "forgotten",
        "joiners",
        "key",
        "kwargs",
        "lender",
        "nested",
        "outcome",
        "parent",
        "refresh",
        "spare",
        "status",
        "storing",
        "task",
        "uncounted",
        "waited",
        "waiter",
    )

    def __init__(
        self,
        key: K,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        waiter: asyncio.Future[R] | None,
        parent: Flight[Any, Any] | None,
    ) -> None:
        self.key = key
        self.args = args
        self.kwargs = kwargs
        self.waiter: asyncio.Future[R] | None = waiter
        """The first caller's future (None once the outcome is delivered)."""
        self.joiners: list[asyncio.Future[R]] | None = None
        """The futures of the callers who joined it."""
        self.parent = parent
        self.status = _RUNNING
        self.task: asyncio.Task[None] | None = None
        self.context: contextvars.Context | None = None
        self.outcome: tuple[bool, Any] | None = None
        """(True, value) or (False, exception) once delivered."""
        self.awaiting: list[tuple[Flight[Any, Any], asyncio.Future[Any]]] | None = None
        """Flights this one's computation awaits, each with the future it waits on: an edge
        of the graph cycles live in while that future is pending."""
        self.borrowed = False
        """Runs without a slot of its own: in its lender's, or (slotless) taking one to compute."""
        self.lender: Flight[Any, Any] | None = None
        """The computation of this table whose slot it runs in (it awaits this one)."""
        self.borrowers: list[Flight[Any, Any]] | None = None
        """The computations running in this one's slot."""
        self.refresh = False
        """Computed whatever the cache holds (a refresh): not looked up again at its start."""
        self.background = False
        """A refresh nobody called for: its failure is reported, not delivered."""
        self.computing = False
        """Whether its computation has begun (with ``slotless``, once it has a slot)."""
        self.forgotten = False
        self.uncounted = 0
        """Callers who joined it while it waited in line, counted when it starts."""
        self.spare = False
        """Holds a spare slot (a background refresh): callers' computations do not count it."""
        self.waited = False
        """Waited in line before it started."""
        self.asking: asyncio.Future[bool] | None = None
        self.nested: list[tuple[Flight[Any, Any], asyncio.Future[Any]]] | None = None
        """With ``slotless``: computations of this table that joined it (each with the future
        it waits on) before it asked for a slot; ``slot()`` borrows the slot of one still
        waiting rather than wait for a slot it may hold."""
        """With ``slotless``: its computation's wait for a slot (see ``slot()``), which a nested
        caller holding a slot may end by lending it that slot (see ``join()``)."""
        self.storing = False
        """Its value is being stored before it is delivered (a background refresh through a
        cache that cannot fence it): an invalidation waits for that store, as for one sent
        after delivery."""

    def __repr__(self) -> str:
        return f"<Flight {self.key!r} {self.status.value} callers={self.callers}>"

    @property
    def callers(self) -> int:
        """How many callers still await the outcome."""
        return sum(not w.done() for w in self.futures())

    def futures(self) -> list[asyncio.Future[R]]:
        """Every caller's future."""
        first = [] if self.waiter is None else [self.waiter]
        return first + self.joiners if self.joiners else first

    def wanted(self) -> bool:
        """Whether a caller still awaits the outcome (a background refresh is always wanted)."""
        if self.background:
            return True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            return True
        return any(not joiner.done() for joiner in self.joiners or ())


class Lookup:
    """A cache lookup under way, which callers asking for the same item meanwhile share.

    Its answer is ``(True, value)`` when the value was found, ``(False, flight)`` once the
    looking caller has joined or started the item's computation, or None when that caller
    left without either (the others then start over).
    """

    __slots__ = ("answer",)

    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[bool, Any] | None] | None = None


def _reaches(start: Flight[Any, Any], target: Flight[Any, Any]) -> bool:
    """Whether start's computation awaits target, directly or through other computations."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        flight = stack.pop()
        if flight is target:
            return True
        if id(flight) in seen or flight.status is _FINISHED:
            continue
        seen.add(id(flight))
        if flight.awaiting:
            stack.extend(f for f, waiter in flight.awaiting if not waiter.done())
    return False


class FlightTable(Generic[K, R]):
    """The items one queue has in flight on one event loop, and the slots they run in.

    ``func(*flight.args, **flight.kwargs)`` is the computation, unless ``compute(flight)`` is
    given. The cache is reached either synchronously (``lookup_now(key, miss)``/``store_now``,
    for in-process mappings: no coroutine, no suspension) or through coroutines
    (``lookup``/``store``). Lookups return ``miss`` for a miss. With
    ``slotless``, computations start at once and ``compute`` itself takes a slot with ``slot()``
    (for a cache that may wait on another process before computing).

    Nothing here refers back to the WorkerQueue, so that a queue its owner drops can be
    garbage-collected.
    """

    __slots__ = (
        "_drained",
        "_forgotten",
        "_line",
        "_refresh_line",
        "_slot_waiters",
        "_starting",
        "borrowed",
        "closing",
        "computations",
        "compute",
        "counts",
        "flights",
        "func",
        "live",
        "lookup",
        "lookup_now",
        "lookups",
        "loop",
        "maxsize",
        "miss",
        "on_refresh_failed",
        "plain",
        "running",
        "slotless",
        "spare",
        "store",
        "store_now",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        func: Callable[..., Awaitable[R]],
        maxsize: int,
        counts: Counts,
        *,
        miss: object,
        compute: Callable[[Flight[K, R]], Awaitable[R]] | None = None,
        lookup_now: Callable[[K, object], Any] | None = None,
        store_now: Callable[[K, R], None] | None = None,
        lookup: Callable[[K], Awaitable[Any]] | None = None,
        store: Callable[[K, R], Awaitable[None]] | None = None,
        slotless: bool = False,
        on_refresh_failed: Callable[[K, BaseException], None] | None = None,
    ) -> None:
        self.loop = loop
        self.func = func
        self.compute = compute
        self.maxsize = maxsize
        self.counts = counts
        self.miss = miss
        self.lookup_now = lookup_now
        self.store_now = store_now
        self.lookup = lookup
        self.store = store
        self.slotless = slotless
        self.on_refresh_failed = on_refresh_failed
        self.flights: dict[K, Flight[K, R]] = {}
        self.lookups: dict[K, Lookup] = {}
        self.running = 0
        """Slots taken (computations running in a slot of their own), spare ones included."""
        self.spare = 0
        """Spare slots taken (background refreshes, which callers' computations do not count)."""
        self.borrowed = 0
        """Computations running in the slot of a computation that awaits them (with
        ``slotless``: flights started without a slot)."""
        self.computations = 0
        """With ``slotless``: the computations running now (see ``counted()``)."""
        self.live = 0
        """Flights not yet finished, forgotten ones included."""
        self.closing = False
        self._line: deque[Flight[K, R]] = deque()
        self._refresh_line: deque[Flight[K, R]] = deque()
        """Background refreshes waiting for a spare slot."""
        self._slot_waiters: deque[asyncio.Future[bool]] = deque()
        self._forgotten: set[Flight[K, R]] = set()
        self._starting = False
        self._drained: asyncio.Future[None] | None = None
        # Futures and tasks are made directly when the loop makes plain ones (asyncio's and
        # uvloop's loops, with no task factory set): a Python-level method call less for each.
        probe = loop.create_future()
        self.plain = type(probe) is asyncio.Future
        probe.cancel()

    # -- accepting ------------------------------------------------------------------------------

    def call(
        self,
        key: K,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] = _NO_KWARGS,
        lookup: Lookup | None = None,
        refresh: bool = False,
    ) -> asyncio.Future[R]:
        """Return a future for key's outcome: join its computation, or start or queue one.

        The caller has already found no cached value, or (``refresh``) wants it computed anew
        whatever the cache holds; those sharing its ``lookup`` are told of the computation
        before it starts. Raises QueueShutDown while closing, and RecursionError when the
        calling computation would end up awaiting itself.
        """
        if self.closing:
            raise _refused()
        flight = self.flights.get(key)
        if flight is not None:
            if lookup is not None:
                self.answer(key, lookup, (False, flight))
            if refresh and flight.status is _WAITING:
                flight.refresh = True  # computed when its turn comes, not looked up again
            return self.join(flight)
        waiter: asyncio.Future[R] = (
            Future(loop=self.loop) if self.plain else self.loop.create_future()
        )
        parent = _current.get()
        flight = Flight(key, args, kwargs, waiter, parent)
        flight.refresh = refresh
        self.flights[key] = flight
        self.live += 1
        if lookup is not None:
            self.answer(key, lookup, (False, flight))
        if parent is not None:
            _awaits(parent, flight, waiter)
        self._enter(flight, parent)
        # A computation that fails within its first, eager, step (3.12 and newer) keeps the
        # frames that started it in its traceback, as their f_back: this call, _enter and
        # _start (or _release_slot). Left holding the flight or the waiter, they would make a
        # cycle through the exception, which only the garbage collector frees.
        del flight
        try:
            return waiter
        finally:
            del waiter

    def refresh_in_background(self, key: K, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Compute key anew for the cache, with no caller waiting; False if one is under way.

        Bounded and deduplicated like any computation, in a copy of the current context.
        """
        if self.closing or key in self.flights:
            return False
        # No parent: nothing awaits it, so it never runs in another computation's slot.
        flight: Flight[K, R] = Flight(key, args, kwargs, None, None)
        flight.refresh = flight.background = True
        self.flights[key] = flight
        self.live += 1
        self._enter(flight, flight.parent)
        del flight  # see call()
        return True

    def _enter(self, flight: Flight[K, R], parent: Flight[Any, Any] | None) -> None:
        """Start a new flight, or put it in line (a background refresh in a line of its own)."""
        if flight.background:
            if self._spare_free() and not self._refresh_line:
                self._start(flight, False, spare=True)
            else:
                flight.status = _WAITING
                flight.context = contextvars.copy_context()
                self._refresh_line.append(flight)
        elif self.slotless or (self.running - self.spare < self.maxsize and not self._line):
            self._start(flight, False, borrowed=self.slotless)
        elif parent is not None and (lender := self.lender_of(parent)) is not None:
            self._start(flight, False, lender=lender)
        else:
            flight.status = _WAITING
            flight.context = contextvars.copy_context()
            self._line.append(flight)
        del flight  # see call()

    def _spare_free(self) -> bool:
        """Whether a background refresh may start now: a slot is free and no caller waits."""
        return self.running < self.maxsize and not self._line and not self._slot_waiters

    def join(self, flight: Flight[K, R]) -> asyncio.Future[R]:
        """Return a future for flight's outcome (the caller joins it)."""
        waiter: asyncio.Future[R] = (
            Future(loop=self.loop) if self.plain else self.loop.create_future()
        )
        parent = _current.get()
        if parent is not None:
            if flight is parent or _reaches(flight, parent):
                raise RecursionError(
                    f"computing {parent.key!r} requires {flight.key!r}, whose computation "
                    f"is waiting for it: a memoized call depends on itself"
                )
            _awaits(parent, flight, waiter)
            if flight.status is _WAITING and (lender := self.lender_of(parent)) is not None:
                # Its callers' computations hold the slots it waits for: run it in theirs.
                self._take_from_line(flight)
                self._start(flight, True, lender=lender)
            elif (
                (asking := flight.asking) is not None
                and not asking.done()
                and (lender := self.lender_of(parent)) is not None
            ):
                # Under way (slotless), its computation waits for a slot a caller holds: the same.
                self._lend(flight, lender)
                asking.set_result(False)
            elif self.slotless and not flight.computing and flight.status is _RUNNING:
                # Under way (slotless), its computation has not asked for a slot yet: it will
                # borrow the caller's rather than wait for it (see slot()).
                if flight.nested is None:
                    flight.nested = [(parent, waiter)]
                else:
                    flight.nested.append((parent, waiter))
        if flight.status is _WAITING and flight.background and not flight.uncounted:
            self._promote(flight)
        outcome = flight.outcome
        if outcome is not None:  # delivered already (being stored, or ended in an eager step)
            self.counts.joined += 1
            if _listeners.active:
                _listeners.joined(self.counts.name)
            if outcome[0]:
                waiter.set_result(outcome[1])
            elif isinstance(outcome[1], asyncio.CancelledError):
                waiter.cancel()
            else:
                waiter.set_exception(outcome[1])
                waiter.exception()  # retrieved: see _fail
            return waiter
        if flight.status is _WAITING:
            flight.uncounted += 1
        else:
            self.counts.joined += 1
            if _listeners.active:
                _listeners.joined(self.counts.name)
        if flight.joiners is None:
            flight.joiners = [waiter]
        else:
            flight.joiners.append(waiter)
        return waiter

    def _promote(self, flight: Flight[K, R]) -> None:
        """A caller joins a refresh waiting for a spare slot (its entry expired): the refresh
        takes its turn among the callers' computations now."""
        self._refresh_line.remove(flight)
        if self.slotless:
            self._start(flight, True, borrowed=True)
        elif self.running - self.spare < self.maxsize and not self._line:
            self._start(flight, True)
        else:
            self._line.append(flight)

    def lender_of(self, parent: Flight[Any, Any]) -> Flight[Any, Any] | None:
        """The computation of this table, holding a slot, inside which the caller runs (the
        nearest of parent and its own callers), or None."""
        flight: Flight[Any, Any] | None = parent
        while flight is not None:
            if (
                flight.status is _RUNNING
                and flight.computing
                and (self.flights.get(flight.key) is flight or flight in self._forgotten)
            ):
                return flight
            flight = flight.parent
        return None

    def answer(self, key: K, lookup: Lookup, answer: tuple[bool, Any] | None) -> None:
        """End lookup, telling those who share it; a lookup already answered is left alone."""
        if self.lookups.get(key) is lookup:
            del self.lookups[key]
        if lookup.answer is not None and not lookup.answer.done():
            lookup.answer.set_result(answer)

    # -- invalidation ---------------------------------------------------------------------------

    def forget(self, key: K) -> list[Flight[K, R]]:
        """Make later calls of key start afresh; key's computation under way stores nothing.

        Callers already joined still get its outcome. Returns every forgotten computation of
        key still running, this one's and earlier invalidations' alike: a store of theirs may
        be on its way, which the caller may have to wait for.
        """
        # A lookup under way may read what is being invalidated: those sharing it asked before
        # the invalidation and keep it; newcomers look up afresh.
        self.lookups.pop(key, None)
        flight = self.flights.get(key)
        if flight is not None and flight.computing:  # else not started: it reads fresh data
            del self.flights[key]
            flight.forgotten = True
            self._forgotten.add(flight)
        return [f for f in self._forgotten if f.key == key] if self._forgotten else []

    def forget_all(self) -> list[Flight[K, R]]:
        """forget() every key."""
        self.lookups.clear()
        for key in list(self.flights):
            self.forget(key)
        return list(self._forgotten)

    def abandon(self) -> None:
        """The queue leaves this table behind, its loop stopped: should that loop run again,
        its computations (those waiting in line too) deliver to their callers, store nothing."""
        self.lookups.clear()
        for flight in self.flights.values():
            flight.forgotten = True
            self._forgotten.add(flight)
        self.flights.clear()

    def forget_lookups(self, key: K | None = None) -> None:
        """Newcomers look key (None: every key) up afresh, not sharing a lookup under way:
        one that began during an invalidation may have read what it removed."""
        if key is None:
            self.lookups.clear()
        else:
            self.lookups.pop(key, None)

    # -- running --------------------------------------------------------------------------------

    def _start(
        self,
        flight: Flight[K, R],
        waited: bool,
        *,
        borrowed: bool = False,
        lender: Flight[Any, Any] | None = None,
        spare: bool = False,
    ) -> None:
        """Run flight's computation in a task of its own, in its first caller's context.

        ``waited``: it waited in line, so its key is looked up again first (unless it is a
        refresh). ``lender``: it runs in that computation's slot; ``borrowed``: it runs without
        a slot (slotless tables); ``spare``: it takes a spare slot (a background refresh).
        """
        flight.status = _RUNNING
        flight.waited = waited
        flight.computing = spare or not self.slotless
        self._count(flight, waited and not flight.refresh)
        if lender is not None:
            self._lend(flight, lender)
            borrowed = True
        if borrowed:
            flight.borrowed = True
            self.borrowed += 1
        else:
            self.running += 1
            if spare:
                flight.spare = True
                self.spare += 1
        context, flight.context = flight.context, None
        coro = self._run(flight, waited and not flight.refresh)
        if self.plain and flight.parent is not None:
            # A nested call: never eager (not even through the loop's task factory), or the
            # steps of a deep recursion would pile up on the stack of their callers.
            task = Task(coro, loop=self.loop, context=context)
        elif not self.plain or self.loop.get_task_factory() is not None:
            task = self.loop.create_task(coro, context=context)
        elif _EAGER_START:
            # Its first step runs now, up to its first suspension: a turn of the loop sooner.
            task = Task(coro, loop=self.loop, context=context, eager_start=True)  # type: ignore[call-arg]
        else:
            task = Task(coro, loop=self.loop, context=context)
        if flight.status is not _FINISHED:  # else it ended within its first, eager, step
            flight.task = task
        del flight, task, context, coro  # see call()

    def _count(self, flight: Flight[K, R], looks_again: bool = False) -> None:
        """Count a flight's calls as it starts: a miss for its first caller, joins for the rest.

        ``looks_again``: its key is looked up again first, and its first caller is counted only
        then (``_count_first``), as a hit or a miss.
        """
        counts = self.counts
        if flight.background:
            counts.refreshes += 1
        elif not looks_again:
            counts.misses += 1
        if _listeners.active:
            if flight.background:
                _listeners.refresh(counts.name)
            elif not looks_again:
                _listeners.miss(counts.name)
            _listeners.joined(counts.name, flight.uncounted)
        if flight.uncounted:
            counts.joined += flight.uncounted
            flight.uncounted = 0

    def _count_first(self, hit: bool) -> None:
        """Count the first caller of an item that waited in line, once it was looked up again."""
        counts = self.counts
        if hit:
            counts.hits += 1
            if _listeners.active:
                _listeners.hit(counts.name)
        else:
            counts.misses += 1
            if _listeners.active:
                _listeners.miss(counts.name)

    async def _run(self, flight: Flight[K, R], waited: bool) -> None:
        # Few locals: this frame lives as long as the computation (a call in flight's memory).
        _current.set(flight)
        started: float | None = None  # set while listeners are told of computations
        try:
            if waited:
                # The value may have been stored while it waited.
                try:
                    if self.lookup_now is not None:
                        result = self.lookup_now(flight.key, self.miss)
                    else:
                        result = await self._look_up_again(flight.key)
                except BaseException:
                    self._count_first(False)  # its callers get this outcome
                    raise
                if result is not self.miss:
                    self._count_first(True)
                    self._deliver(flight, result)
                    return
                self._count_first(False)
            if _listeners.active:
                started = _listeners.clock()
            if self.compute is not None:
                result = await self.compute(flight)
            elif flight.kwargs:
                result = await self.func(*flight.args, **flight.kwargs)
            else:  # no empty keyword dict copied for the call
                result = await self.func(*flight.args)
        except asyncio.CancelledError:
            if started is not None:
                _listeners.computed(self.counts.name, started, asyncio.CancelledError)
            self._cancelled(flight)
            raise
        except BaseException as exc:
            if started is not None:
                _listeners.computed(self.counts.name, started, type(exc))
            if self._raised(flight, exc):
                raise
        else:
            if started is not None:
                _listeners.computed(self.counts.name, started, None)
            if self.store_now is not None:
                if not flight.forgotten:
                    self._store_now(flight, result)
                self._deliver(flight, result)
            else:
                self._deliver(flight, result)
                if self.store is not None and not flight.forgotten:
                    await self._store(flight, result)
        finally:
            self._finish(flight)
            # A failure's traceback keeps this frame: without flight in it, no cycle
            # (exception -> traceback -> frame -> flight -> outcome -> exception) outlives it.
            del flight

    def _cancelled(self, flight: Flight[K, R]) -> None:
        """The computation ended with CancelledError: its callers are cancelled."""
        task = asyncio.current_task(self.loop)
        if task is not None and task.cancelling():
            # Cancelled from outside the queue (a shutdown, or its loop cancelling every task
            # as asyncio.run() does on its way out): starting waiting items now would make
            # tasks nobody cancels; drop them instead.
            self._cancel_waiting()
        else:
            logger.warning(
                "the worker raised CancelledError for %r without being cancelled; "
                "its callers are cancelled too",
                flight.key,
            )
        self._cancel(flight)

    def _raised(self, flight: Flight[K, R], exc: BaseException) -> bool:
        """The computation raised exc: deliver it; return whether it must propagate."""
        if isinstance(exc, GeneratorExit) and (
            self.loop.is_closed()
            or (flight.task is not None and asyncio.current_task(self.loop) is not flight.task)
        ):
            # Thrown in because the task is being destroyed (outside any step of it): nobody
            # is left to tell. Raised by the worker itself, it reaches the callers.
            return True
        self._fail(flight, exc)
        return isinstance(exc, KeyboardInterrupt | SystemExit)

    def _store_now(self, flight: Flight[K, R], result: R) -> None:
        assert self.store_now is not None
        try:
            self.store_now(flight.key, result)
        except Exception:
            logger.exception("storing %r failed; the result was returned uncached", flight.key)

    async def _store(self, flight: Flight[K, R], result: R) -> None:
        """Store result with the async cache (callers have it already: see _stores_done)."""
        assert self.store is not None
        try:
            await self.store(flight.key, result)
        except NotAsync as exc:
            logger.error("%s; no result is stored until it is", exc)
        except Exception:
            logger.exception(
                "cache_set failed for %r; the result was returned uncached", flight.key
            )

    async def _look_up_again(self, key: K) -> Any:
        if self.lookup is None:
            return self.miss
        try:
            return await self.lookup(key)
        except NotAsync:
            raise
        except Exception:
            logger.exception("cache_get failed for %r; treating it as a miss", key)
            return self.miss

    def _deliver(self, flight: Flight[K, R], value: R) -> None:
        if flight.outcome is not None:  # failed already by a shutdown
            return
        flight.outcome = (True, value)
        waiter = flight.waiter
        if waiter is not None:
            flight.waiter = None
            if not waiter.done():
                waiter.set_result(value)
        joiners = flight.joiners
        if joiners is not None:
            flight.joiners = None
            for waiter in joiners:
                if not waiter.done():
                    waiter.set_result(value)

    def _fail(self, flight: Flight[K, R], exc: BaseException) -> None:
        """Deliver exc to every caller of flight; log it if nobody is left to receive it."""
        if flight.outcome is not None:
            return
        flight.outcome = (False, exc)
        received = False
        for waiter in flight.futures():
            if not waiter.done():
                waiter.set_exception(exc)
                # Marked retrieved: a caller cancelled before it resumes would leave it unread.
                waiter.exception()
                received = True
        flight.waiter = flight.joiners = None
        if flight.background:
            self.counts.refresh_failures += 1
            if self.on_refresh_failed is not None:
                self.on_refresh_failed(flight.key, exc)
        elif not received:
            logger.error(
                "computing %r failed and no caller was left to receive the error",
                flight.key,
                exc_info=exc,
            )

    def _cancel(self, flight: Flight[K, R]) -> None:
        if flight.outcome is not None:
            return
        flight.outcome = (False, asyncio.CancelledError())
        for waiter in flight.futures():
            waiter.cancel()
        flight.waiter = flight.joiners = None

    def _take_from_line(self, flight: Flight[K, R]) -> None:
        if flight in self._refresh_line:
            self._refresh_line.remove(flight)
        else:
            self._line.remove(flight)

    def _cancel_waiting(self) -> None:
        for line in (self._line, self._refresh_line):
            while line:
                flight = line.popleft()
                self._count_unstarted(flight)
                self._cancel(flight)
                self._finish(flight)

    def _count_unstarted(self, flight: Flight[K, R]) -> None:
        """Count the calls of a flight that ends without starting: a miss and joins."""
        counts = self.counts
        if not flight.background:
            counts.misses += 1
            counts.dropped += 1
            if _listeners.active:
                _listeners.miss(counts.name)
        if _listeners.active:
            _listeners.joined(counts.name, flight.uncounted)
        counts.joined += flight.uncounted
        flight.uncounted = 0

    def _finish(self, flight: Flight[K, R]) -> None:
        """Take flight out of the table, free its slot and start the next item in line."""
        status = flight.status
        if status is _FINISHED:
            return
        flight.status = _FINISHED
        # The task's context refers back to the flight: break the cycle, so that reference
        # counting frees them at once, without waiting for the garbage collector.
        flight.task = flight.awaiting = None
        self.live -= 1
        if flight.forgotten:
            self._forgotten.discard(flight)
        else:  # a flight not forgotten is the one its key maps to until it finishes
            try:
                del self.flights[flight.key]
            except KeyError:
                self._unmap(flight)
        if status is not _RUNNING:
            pass
        elif flight.borrowed:
            self.borrowed -= 1
            lender = flight.lender
            if lender is not None and lender.borrowers and flight in lender.borrowers:
                lender.borrowers.remove(flight)
            if flight.borrowers is not None:
                # Its own slot, if it took one to compute (slotless), is given back already.
                self._hand_over(flight, lender, held=False)
        else:
            if flight.spare:  # a computation it hands its slot to is a caller's: not spare
                flight.spare = False
                self.spare -= 1
            if flight.borrowers is None or not self._hand_over(flight, None, held=True):
                self._release_slot()
        if not self.live and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _unmap(self, flight: Flight[K, R]) -> None:
        """Remove flight, whose key no longer hashes as it did (the worker changed it)."""
        kept = [(k, f) for k, f in self.flights.items() if f is not flight]
        self.flights.clear()
        self.flights.update(kept)

    @staticmethod
    def _lend(flight: Flight[K, R], lender: Flight[Any, Any]) -> None:
        """flight computes in lender's slot (lender awaits it)."""
        flight.lender = lender
        if lender.borrowers is None:
            lender.borrowers = [flight]
        else:
            lender.borrowers.append(flight)

    def _hand_over(
        self, flight: Flight[K, R], lender: Flight[Any, Any] | None, *, held: bool
    ) -> bool:
        """Computations still running in flight's slot, which it no longer needs: they move to
        flight's own lender, or they take slots of their own, over the bound until they end:
        the first takes flight's slot over if flight still ``held`` it (a ``slotless`` flight
        gave back the slot it computed in as its computation ended). Whether any was left."""
        borrowers = flight.borrowers
        flight.borrowers = None
        live = [b for b in borrowers or () if b.status is _RUNNING]
        if not live:
            return False
        for borrower in live:
            borrower.lender = lender
            if lender is not None:
                if lender.borrowers is None:
                    lender.borrowers = [borrower]
                else:
                    lender.borrowers.append(borrower)
            else:
                borrower.borrowed = False
                self.borrowed -= 1
                self.running += 1
        if lender is None and held:
            self.running -= 1  # flight's own slot, taken over by the first
        return True

    # -- slots ----------------------------------------------------------------------------------

    def _release_slot(self) -> None:
        """Give a freed slot to the first in line (an item, or a computation asking for one),
        or, with no caller waiting, to the first background refresh as a spare slot."""
        self.running -= 1
        if self._starting or not (self._line or self._slot_waiters or self._refresh_line):
            return  # nobody in line, or the loop below fills it (an eager task ended in it)
        if self.loop.is_closed():
            return  # destroyed with its loop: nothing can start now
        self._starting = True
        try:
            line = self._line
            while True:
                if self.running - self.spare < self.maxsize and (line or self._slot_waiters):
                    if line:
                        flight = line.popleft()
                        waiter = flight.waiter
                        if (waiter is None or waiter.done()) and not flight.wanted():
                            self._drop(flight)  # every caller left before it started
                            continue
                        self._start(flight, True)
                        del flight, waiter  # see call()
                    else:
                        asking = self._slot_waiters.popleft()
                        if not asking.done():
                            self.running += 1
                            asking.set_result(True)
                elif self._refresh_line and self._spare_free():
                    self._start(self._refresh_line.popleft(), True, spare=True)
                else:
                    break
        finally:
            self._starting = False

    def _drop(self, flight: Flight[K, R]) -> None:
        """Forget a flight that never started, counting its calls."""
        flight.status = _FINISHED
        self._count_unstarted(flight)
        self.live -= 1
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        if not self.live and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def slot(self, flight: Flight[K, R] | None = None) -> bool:
        """Wait for a slot (``slotless`` tables): True once taken, and the caller must
        ``release()`` it after; False if flight is lent one (``join()``: a caller of it holds
        a slot and awaits it, having joined before or while it waits), which it then computes
        in without taking its own."""
        if self.running - self.spare < self.maxsize and not self._slot_waiters:
            self.running += 1
            return True
        if flight is not None and (nested := flight.nested) is not None:
            flight.nested = None
            for parent, joined in nested:
                if not joined.done() and (lender := self.lender_of(parent)) is not None:
                    self._lend(flight, lender)
                    return False
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._slot_waiters.append(waiter)
        if flight is not None:
            flight.asking = waiter
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._release_slot()  # given the slot, then cancelled: pass it on
            else:
                waiter.cancel()  # skipped when its turn comes
            raise
        finally:
            if flight is not None:
                flight.asking = None

    def release(self) -> None:
        """Give back a slot taken with ``slot()``."""
        self._release_slot()

    def computing(self) -> int:
        """How many computations run now: in a slot of their own, or in the slot of a
        computation that awaits them. (A ``slotless`` table's flights hold no slot while they
        wait for another process, so there only those in ``counted()`` are.)"""
        return self.computations if self.slotless else self.running + self.borrowed

    async def counted(self, work: Callable[[], Awaitable[R]]) -> R:
        """Run work(), a ``slotless`` table's computation proper, counted in ``computing()``."""
        self.computations += 1
        try:
            return await work()
        finally:
            self.computations -= 1

    async def hold(self, flight: Flight[K, R]) -> None:
        """Wait for a slot for flight, started without one (``slotless``), and make it flight's
        own: it is given back when flight ends, or with ``give_back()``."""
        if not flight.borrowed or flight.lender is not None:
            return
        await self.slot()
        flight.borrowed = False
        self.borrowed -= 1
        flight.computing = True

    def give_back(self, flight: Flight[K, R]) -> None:
        """flight, holding a slot of its own (``slotless``), goes on without one: to wait for
        another process. Its computation takes one again with ``slot()`` if it must."""
        if flight.status is not _RUNNING or flight.borrowed or flight.borrowers:
            return
        flight.borrowed = True
        self.borrowed += 1
        if flight.spare:
            flight.spare = False
            self.spare -= 1
        self._release_slot()

    def accepted(self) -> list[Flight[K, R]]:
        """The items in line that are accepted: their callers wait for a slot.

        Items whose callers all left hold no place: they are dropped when their turn comes.
        """
        return [f for f in self._line if f.wanted()][: self.maxsize]

    def outside(self) -> list[Flight[K, R]]:
        """The items in line beyond the accepted: their callers wait for room."""
        return [f for f in self._line if f.wanted()][self.maxsize :]

    # -- shutting down --------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new work: callers of items still waiting for room get QueueShutDown."""
        self.closing = True
        for flight in [f for f in self._line if not f.wanted()]:
            self._line.remove(flight)
            self._drop(flight)
        while self._refresh_line:  # nobody waits for them: they are dropped
            self._drop(self._refresh_line.popleft())
        line = self._line
        while len(line) > self.maxsize:
            flight = line.pop()
            exc = QueueShutDown("the queue was closed while waiting for room")
            for waiter in flight.futures():
                if not waiter.done():
                    waiter.set_exception(exc)
                    waiter.exception()
            flight.waiter = flight.joiners = None
            flight.outcome = (False, exc)
            flight.status = _FINISHED
            self.live -= 1
            if self.flights.get(flight.key) is flight:
                del self.flights[flight.key]

    async def wait_drained(self) -> None:
        """Wait until every accepted item has finished."""
        if self.live:
            self._drained = self.loop.create_future()
            await self._drained

    async def abort(self, grace: float) -> None:
        """Fail every unfinished item with ShutdownTimeout, cancel its task, await the task.

        Cancelled tasks get ``grace`` seconds (at least one turn of the loop) to end.
        """
        tasks: list[asyncio.Task[None]] = []
        unfinished = [*self.flights.values(), *self._forgotten]
        self._line.clear()
        self._refresh_line.clear()
        for flight in unfinished:
            if flight.status is _WAITING:  # accepted, never started: its callers get an outcome
                self._count(flight)
            self._fail(
                flight,
                ShutdownTimeout(f"{flight.key!r} did not finish within finish_timeout={grace}s"),
            )
            if flight.task is not None and not flight.task.done():
                flight.task.cancel()
                tasks.append(flight.task)
            else:
                self._finish(flight)
        if not tasks:
            return
        await asyncio.sleep(0)
        done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("a cancelled computation failed", exc_info=task.exception())
        if pending:
            logger.warning(
                "%d computation(s) ignored cancellation at shutdown and are still running",
                len(pending),
            )


def _awaits(
    parent: Flight[Any, Any], flight: Flight[Any, Any], waiter: asyncio.Future[Any]
) -> None:
    """Record that parent's computation awaits flight through waiter. A wait that has ended
    (waiter done, even cancelled a moment ago) is no edge, whatever happens to flight later."""
    awaiting = parent.awaiting
    if awaiting is None:
        parent.awaiting = [(flight, waiter)]
        return
    if len(awaiting) >= 64:
        awaiting[:] = [(f, w) for f, w in awaiting if not w.done() and f.status is not _FINISHED]
    awaiting.append((flight, waiter))


def _refused() -> QueueShutDown:
    return QueueShutDown("the queue is shutting down; require() again once aclose() ends")
