"""The in-flight table: every state change of an item being computed happens here.

An item in flight is, in order:

- WAITING: in the line for one of ``maxsize`` slots. The first ``maxsize`` items in line are
  accepted; the callers of the others wait for room, and a close refuses them.
- RUNNING: its computation task runs, in a slot of its own (RUNNING_SPARE: a background
  refresh's spare slot) or in the slot of a computation of the same queue that is suspended
  waiting for it (RUNNING_LENT: a nested call).
- FINISHED: its outcome is delivered and it has left the table.

Callers never wake up for room: each one awaits a future of its own, which the computation's
task completes directly with the result or the exception. The table belongs to one event loop;
its Engine (_engine) makes a new one when the loop changes.

The table's other jobs live in modules of their own, which it calls with explicit arguments:
the slots and the lines waiting for them in ``_slots`` (a slot that frees up goes to the first
item in line, so computations start in the order their first callers arrived; background
refreshes take only spare slots, so a miss never waits behind one), nested calls and cycles in
``_nesting``, lookups shared among callers in ``_lookups``, and counting in ``_counts``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from asyncio import Future, Task
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from . import _listeners
from ._counts import (
    Counts,
    count_first,
    count_joined,
    count_refresh_failed,
    count_started,
    count_unstarted,
)
from ._errors import QueueShutDown, ShutdownTimeout
from ._lookups import Lookup, Lookups, look_up
from ._nesting import (
    awaits,
    check_no_cycle,
    current,
    hand_over,
    leave_lender,
    lend,
    lender_of,
    on_spare,
)
from ._refresh import RefreshDeferred
from ._slots import Slots
from ._state import AWAITING_ELSEWHERE as _AWAITING_ELSEWHERE
from ._state import FINISHED as _FINISHED
from ._state import RUNNING as _RUNNING
from ._state import RUNNING_LENT as _RUNNING_LENT
from ._state import RUNNING_SPARE as _RUNNING_SPARE
from ._state import WAITING as _WAITING
from ._state import State

if TYPE_CHECKING:
    from ._store import Store

__all__ = ("Flight", "FlightTable")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")

_NO_KWARGS: Final[dict[str, Any]] = {}

_RAISED: Final = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)
"""What a computation's task raises again once its callers have the outcome."""

_EAGER_START: Final = sys.version_info >= (3, 12)
"""Whether tasks can run their first step eagerly (Task(..., eager_start=True), Python 3.12+)."""


class Flight(Generic[K, R]):
    """One item in flight: its key, its arguments, its callers' futures and its state."""

    __slots__ = (
        "args",
        "awaiting",
        "background",
        "borrowers",
        "computing",
        "context",
        "forgotten",
        "joiners",
        "key",
        "kwargs",
        "lender",
        "outcome",
        "parent",
        "refresh",
        "state",
        "task",
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
        refresh: bool = False,
    ) -> None:
        self.key = key
        self.args = args
        self.kwargs = kwargs
        self.waiter: asyncio.Future[R] | None = waiter
        """The first caller's future (None once the outcome is delivered)."""
        self.joiners: list[asyncio.Future[R]] | None = None
        """The futures of the callers who joined it."""
        self.parent = parent
        self.state: State = _WAITING
        """Where it is in its life (see _state); changed only in this module."""
        self.task: asyncio.Task[None] | None = None
        self.context: contextvars.Context | None = None
        self.outcome: tuple[bool, Any] | None = None
        """(True, value) or (False, exception) once delivered."""
        self.awaiting: list[tuple[Flight[Any, Any], asyncio.Future[Any]]] | None = None
        """Flights this one's computation awaits, each with the future it waits on: an edge
        of the graph cycles live in while that future is pending."""
        self.lender: Flight[Any, Any] | None = None
        """RUNNING_LENT: the computation of this table whose slot it runs in (which awaits it)."""
        self.borrowers: list[Flight[Any, Any]] | None = None
        """The computations running in this one's slot."""
        self.refresh = refresh
        """Computed whatever the cache holds (a refresh): not looked up again at its start."""
        self.background = False
        """A refresh nobody called for: its failure is reported, not delivered."""
        self.computing = False
        """Whether its computation proper has begun: at its start, or (AWAITING_ELSEWHERE) once
        it computes here, in a slot it took with ``slot()`` or one lent to it."""
        self.forgotten = False
        self.waited = False
        """Waited in line before it started."""

    def __repr__(self) -> str:
        return f"<Flight {self.key!r} {self.state.value} callers={self.callers}>"

    @property
    def callers(self) -> int:
        """How many callers still await the outcome."""
        return sum(not w.done() for w in self.futures())

    def futures(self) -> list[asyncio.Future[R]]:
        """Every caller's future."""
        first = [] if self.waiter is None else [self.waiter]
        return first + self.joiners if self.joiners else first

    def joined(self) -> int:
        """How many callers joined it: while it is WAITING, those not counted yet (a call that
        joins an item in line is counted when the item starts or is dropped)."""
        joiners = self.joiners
        return 0 if joiners is None else len(joiners)

    def wanted(self) -> bool:
        """Whether a caller still awaits the outcome (a background refresh is always wanted)."""
        if self.background:
            return True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            return True
        return any(not joiner.done() for joiner in self.joiners or ())


class FlightTable(Generic[K, R]):
    """The items one queue has in flight on one event loop, and the slots they run in.

    ``func(*flight.args, **flight.kwargs)`` is the computation, unless ``compute(flight)`` is
    given. The cache is read either synchronously (``lookup_now(key, miss)``, for in-process
    mappings: no coroutine, no suspension) or through a coroutine (``lookup``); lookups return
    ``miss`` for a miss. Results are written through ``store`` (see _store), the one way every
    write goes: synchronously for a mapping, after delivering for an async cache, and not here
    for a single-flight cache, whose ``compute`` writes through it. With
    ``slotless``, computations start at once and ``compute`` itself takes a slot with ``slot()``
    (for a cache that may wait on another process before computing).

    Nothing here refers back to the Engine or its WorkerQueue, so that a queue its owner drops
    can be garbage-collected.
    """

    __slots__ = (
        "_drained",
        "_forgotten",
        "asking",
        "borrowed",
        "closing",
        "computations",
        "compute",
        "counts",
        "fail_later",
        "fail_now",
        "flights",
        "func",
        "live",
        "lookup",
        "lookup_now",
        "lookups",
        "loop",
        "maxsize",
        "miss",
        "nested",
        "on_close",
        "on_refresh_failed",
        "plain",
        "slotless",
        "slots",
        "store",
        "store_now",
        "storing",
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
        lookup: Callable[[K], Awaitable[Any]] | None = None,
        store: Store[K, R] | None = None,
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
        self.lookup = lookup
        # The store of a computation's result: synchronous for a mapping, else awaited after
        # delivering; none here when compute() writes it (a single-flight cache).
        self.store_now = store.now if store is not None and store.mapping is not None else None
        self.store = None if store is None or store.write is None or compute else store
        # A failed computation's outcome under a dated policy: a remembered error, or a stale
        # value served (see Store.failed_now).
        self.fail_now = (
            store.failed_now
            if store is not None and store.policy is not None and store.policy.dated
            else None
        )
        # The same for a plain async cache under a wrapped policy: read the key's entry, write
        # what the policy leaves (see Store.failed).
        self.fail_later = (
            store.failed
            if store is not None
            and store.policy is not None
            and store.policy.wrapped
            and store.write is not None
            and compute is None
            else None
        )
        self.slotless = slotless
        self.on_refresh_failed = on_refresh_failed
        self.on_close: Callable[[], None] | None = None
        """Told when the table closes (batch functions send the keys they gather at once)."""
        self.flights: dict[K, Flight[K, R]] = {}
        self.lookups: Lookups[K] = Lookups()
        self.slots: Slots[Flight[K, R]] = Slots(maxsize, self._admit, loop)
        """The slots computations run in, and the lines of items waiting for one (background
        refreshes in a line of their own, for spare slots)."""
        self.borrowed = 0
        """Flights RUNNING_LENT or AWAITING_ELSEWHERE: running in no slot of their own."""
        self.computations = 0
        """With ``slotless``: the computations running now (see ``counted()``)."""
        self.live = 0
        """Flights not yet finished, forgotten ones included."""
        self.asking: dict[Flight[K, R], asyncio.Future[bool]] = {}
        """With ``slotless``: computations' waits for a slot (see ``slot()``), which a nested
        caller holding a slot may end by lending that slot (see ``join()``)."""
        self.nested: dict[Flight[K, R], list[tuple[Flight[Any, Any], asyncio.Future[Any]]]] = {}
        """With ``slotless``: for a flight that has not asked for a slot yet, the computations of
        this table that joined it (each with the future it waits on); ``slot()`` borrows the
        slot of one still waiting rather than wait for a slot it may hold."""
        self.storing: set[Flight[K, R]] = set()
        """Flights whose value is on its way to the cache (set by _store around the write): an
        invalidation or a prime of its key waits for that store to end."""
        self.closing = False
        self._forgotten: set[Flight[K, R]] = set()
        self._drained: asyncio.Future[None] | None = None
        # Futures and tasks are made directly when the loop makes plain ones (asyncio's and
        # uvloop's loops, with no task factory set): a Python-level method call less for each.
        probe = loop.create_future()
        self.plain = type(probe) is asyncio.Future
        probe.cancel()

    @property
    def running(self) -> int:
        """Slots taken (computations running in a slot of their own), spare ones included."""
        return self.slots.running

    @property
    def spare(self) -> int:
        """Spare slots taken (background refreshes, which callers' computations do not count)."""
        return self.slots.spare

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
            if not refresh or flight.outcome is None:
                if lookup is not None:
                    self.answer(key, lookup, (False, flight))
                if refresh and flight.state is _WAITING:
                    flight.refresh = True  # computed when its turn comes, not looked up again
                return self.join(flight)
            # Delivered, its store on its way: a refresh computes anew, and stores after it.
            self._forget(flight)
        waiter: asyncio.Future[R] = (
            Future(loop=self.loop) if self.plain else self.loop.create_future()
        )
        parent = current.get()
        flight = Flight(key, args, kwargs, waiter, parent, refresh)
        self.flights[key] = flight
        self.live += 1
        if lookup is not None:
            self.answer(key, lookup, (False, flight))
        if parent is not None:
            awaits(parent, flight, waiter)
        self._enter(flight, parent)
        # A computation that fails within its first, eager, step (3.12 and newer) keeps the
        # frames that started it in its traceback, as their f_back: this call, _enter and
        # _start (or Slots.release and _admit). Left holding the flight or the waiter, they
        # would make a cycle through the exception, which only the garbage collector frees.
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
        flight: Flight[K, R] = Flight(key, args, kwargs, None, None, True)
        flight.background = True
        self.flights[key] = flight
        self.live += 1
        self._enter(flight, flight.parent)
        del flight  # see call()
        return True

    def _enter(self, flight: Flight[K, R], parent: Flight[Any, Any] | None) -> None:
        """Start a new flight, or put it in line (a background refresh in a line of its own)."""
        slots = self.slots
        if flight.background:
            if slots.spare_free() and not slots.refresh_line:
                self._start(flight, False, spare=True)
            else:
                flight.context = contextvars.copy_context()
                slots.enqueue(flight, low=True)
        elif self.slotless:
            self._start(flight, False, borrowed=True)
        elif parent is None:
            if slots.running - slots.spare < slots.maxsize and not slots.line:
                self._start(flight, False)
            else:
                flight.context = contextvars.copy_context()
                slots.enqueue(flight)
        elif (lender := self.lender_of(parent)) is not None and (
            on_spare(lender) or not slots.has_room()
        ):
            # A nested call runs in its caller's slot when no slot is free, and always when that
            # slot is a background refresh's spare one: a slot it took would be a caller's.
            self._start(flight, False, lender=lender)
        elif slots.has_room():
            self._start(flight, False)
        else:
            flight.context = contextvars.copy_context()
            slots.enqueue(flight)
        del flight  # see call()

    def join(self, flight: Flight[K, R]) -> asyncio.Future[R]:
        """Return a future for flight's outcome (the caller joins it).

        The caller is among flight's callers before anything here starts flight: a computation
        may run its first step as it starts (an eager task, 3.12 and newer), and must see who
        waits for it (a background refresh a caller joined is no longer one nobody awaits).
        """
        waiter: asyncio.Future[R] = (
            Future(loop=self.loop) if self.plain else self.loop.create_future()
        )
        parent = current.get()
        if parent is not None:
            check_no_cycle(parent, flight)
            awaits(parent, flight, waiter)
        outcome = flight.outcome
        if outcome is not None:  # delivered already (its store on its way)
            count_joined(self.counts)
            if outcome[0]:
                waiter.set_result(outcome[1])
            elif isinstance(outcome[1], asyncio.CancelledError):
                waiter.cancel()
            else:
                waiter.set_exception(outcome[1])
                waiter.exception()  # retrieved: see _settle
            return waiter
        waiting = flight.state is _WAITING
        # The first caller of a refresh in line for a spare slot: it takes its turn among the
        # callers' computations (see _promote).
        promote = waiting and flight.background and not flight.joiners
        if not waiting:  # else counted when it starts (see _start)
            count_joined(self.counts)
        if flight.joiners is None:
            flight.joiners = [waiter]
        else:
            flight.joiners.append(waiter)
        if parent is not None:
            if waiting and (lender := self.lender_of(parent)) is not None:
                # Its callers' computations hold the slots it waits for: run it in theirs.
                self.slots.remove(flight)
                self._start(flight, True, lender=lender)
                return waiter
            if (
                (asking := self.asking.get(flight)) is not None
                and not asking.done()
                and (lender := self.lender_of(parent)) is not None
            ):
                # Under way (slotless), its computation waits for a slot a caller holds: the same.
                lend(flight, lender)
                flight.state = _RUNNING_LENT
                Slots.lend(asking)
            elif flight.state is _AWAITING_ELSEWHERE and not flight.computing:
                # Under way (slotless), its computation has not asked for a slot yet: it will
                # borrow the caller's rather than wait for it (see slot()).
                self.nested.setdefault(flight, []).append((parent, waiter))
        if promote:
            self._promote(flight)
        return waiter

    def _promote(self, flight: Flight[K, R]) -> None:
        """A caller joins a refresh waiting for a spare slot (its entry expired): the refresh
        takes its turn among the callers' computations now."""
        slots = self.slots
        if self.slotless:
            slots.remove(flight)
            self._start(flight, True, borrowed=True)
        elif slots.has_room():
            slots.remove(flight)
            self._start(flight, True)
        else:
            slots.promote(flight)

    def lender_of(self, parent: Flight[Any, Any]) -> Flight[Any, Any] | None:
        """The computation of this table, holding a slot, inside which the caller runs (the
        nearest of parent and its own callers), or None."""
        return lender_of(parent, self.flights, self._forgotten)

    def needs_slot(self, flight: Flight[K, R]) -> bool:
        """Whether flight, started without a slot (``slotless``), must take one to compute: it
        runs in no lender's slot, and in no slot of a computation of this table calling it."""
        return flight.state is _AWAITING_ELSEWHERE and (
            flight.parent is None or self.lender_of(flight.parent) is None
        )

    def computes(self, flight: Flight[K, R]) -> None:
        """flight's computation proper begins (``slotless``: it has a slot, or one lent)."""
        flight.computing = True

    def answer(self, key: K, lookup: Lookup, answer: tuple[bool, Any] | None) -> None:
        """End lookup, telling those who share it; a lookup already answered is left alone."""
        self.lookups.answer(key, lookup, answer)

    # -- invalidation ---------------------------------------------------------------------------

    def forget(self, key: K) -> list[Flight[K, R]]:
        """Make later calls of key start afresh; key's computation under way stores nothing.

        Callers already joined still get its outcome. Returns every forgotten computation of
        key still running, this one's and earlier invalidations' alike: a store of theirs may
        be on its way, which the caller may have to wait for.
        """
        # A lookup under way may read what is being invalidated: those sharing it asked before
        # the invalidation and keep it; newcomers look up afresh.
        self.lookups.forget(key)
        flight = self.flights.get(key)
        # Not started, it will read fresh data, unless it is a single-flight cache's: there it
        # may be waiting for another process's computation, which began before.
        if flight is not None and (flight.computing or self.slotless):
            self._forget(flight)
        return self.forgotten(key)

    def forgotten(self, key: K) -> list[Flight[K, R]]:
        """The forgotten computations of key still running."""
        return [f for f in self._forgotten if f.key == key] if self._forgotten else []

    def _forget(self, flight: Flight[K, R]) -> None:
        """flight, the one its key maps to, no longer is: later calls start afresh."""
        del self.flights[flight.key]
        flight.forgotten = True
        self._forgotten.add(flight)

    def forget_all(self) -> list[Flight[K, R]]:
        """forget() every key."""
        self.lookups.forget()
        for key in list(self.flights):
            self.forget(key)
        return list(self._forgotten)

    def abandon(self) -> None:
        """The queue leaves this table behind, its loop stopped: should that loop run again,
        its computations (those waiting in line too) deliver to their callers, store nothing."""
        self.lookups.forget()
        for flight in self.flights.values():
            flight.forgotten = True
            self._forgotten.add(flight)
        self.flights.clear()

    def forget_lookups(self, key: K | None = None) -> None:
        """Newcomers look key (None: every key) up afresh, not sharing a lookup under way:
        one that began during an invalidation may have read what it removed."""
        self.lookups.forget(key)

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
        flight.waited = waited
        flight.computing = spare or not self.slotless
        joiners = flight.joiners  # while it waited in line: counted now
        looks_again = waited and not flight.refresh
        count_started(self.counts, flight.background, len(joiners) if joiners else 0, looks_again)
        if lender is not None:
            lend(flight, lender)
            flight.state = _RUNNING_LENT
            self.borrowed += 1
        elif borrowed:
            flight.state = _AWAITING_ELSEWHERE
            self.borrowed += 1
        else:
            slots = self.slots
            slots.running += 1  # Slots.take(1, spare), inline: once per miss
            if spare:
                slots.spare += 1
                flight.state = _RUNNING_SPARE
            else:
                flight.state = _RUNNING
        context, flight.context = flight.context, None
        coro = self._run(flight)
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
        if flight.state is not _FINISHED:  # else it ended within its first, eager, step
            flight.task = task
        del flight, task, context, coro  # see call()

    async def _run(self, flight: Flight[K, R]) -> None:
        # Few locals and a shallow stack: this frame lives as long as the computation (a call
        # in flight's memory); the rarer steps are methods of their own.
        current.set(flight)
        started: float | None = None  # set while listeners are told of computations
        outcome: tuple[bool, Any] | None = None  # None: delivered already, or nobody to tell
        try:
            if flight.waited and not flight.refresh:  # stored while it waited?
                if self.lookup_now is not None:
                    outcome = self._look_again(flight)
                else:
                    outcome = await self._look_again_async(flight)
                if outcome is not None:
                    return
            if _listeners.active:
                started = _listeners.clock()
            if self.compute is not None:
                result = await self.compute(flight)
            elif flight.kwargs:
                result = await self.func(*flight.args, **flight.kwargs)
            else:  # no empty keyword dict copied for the call
                result = await self.func(*flight.args)
        except BaseException as exc:
            outcome = self._failed(flight, exc, started)
            if outcome is None or isinstance(exc, _RAISED):
                raise
            if (
                self.fail_later is not None
                and outcome[1] is exc
                and isinstance(exc, Exception)
                and (not flight.background or flight.joiners)
            ):
                outcome = await self.fail_later(flight.key, exc, flight, self)
        else:
            if started is not None:
                _listeners.computed(self.counts.name, started, None)
            outcome = (True, result)
            if self.store_now is not None:
                self.store_now(flight.key, result, flight)
            elif self.store is not None and not flight.forgotten:
                self._settle(flight, outcome)  # callers do not wait for the store
                await self.store(flight.key, result, flight, self)
        finally:
            self._end(flight, outcome)
            # A failure's traceback keeps this frame: without flight and outcome in it, no cycle
            # (exception -> traceback -> frame -> flight -> outcome -> exception) outlives it.
            del flight, outcome

    def _look_again(self, flight: Flight[K, R]) -> tuple[bool, Any] | None:
        """Look flight's key up again (a mapping) as it starts after waiting in line: the cached
        value as its outcome, or None to compute it. Its first caller is counted here."""
        assert self.lookup_now is not None
        try:
            result = self.lookup_now(flight.key, self.miss)
        except BaseException:
            count_first(self.counts, False)  # its callers get this outcome
            raise
        hit = result is not self.miss
        count_first(self.counts, hit)
        return (True, result) if hit else None

    async def _look_again_async(self, flight: Flight[K, R]) -> tuple[bool, Any] | None:
        """``_look_again`` for an async cache."""
        try:
            result = await look_up(self.lookup, flight.key, self.miss)
        except BaseException:
            count_first(self.counts, False)
            raise
        hit = result is not self.miss
        count_first(self.counts, hit)
        return (True, result) if hit else None

    def _failed(
        self, flight: Flight[K, R], exc: BaseException, started: float | None
    ) -> tuple[bool, Any] | None:
        """flight's computation raised exc: its outcome for the callers, or None if nobody is
        left to tell (exc was thrown in as the task is destroyed); under a dated policy, a stale
        value served instead, or exc remembered (``fail_now``). ``_run`` raises exc again if it
        is a cancellation, KeyboardInterrupt or SystemExit."""
        if started is not None:
            _listeners.computed(
                self.counts.name,
                started,
                asyncio.CancelledError if isinstance(exc, asyncio.CancelledError) else type(exc),
            )
        if isinstance(exc, asyncio.CancelledError):
            self._cancelled(flight)
            return (False, asyncio.CancelledError())
        if self._destroyed(flight, exc):
            return None
        if (
            self.fail_now is not None
            and isinstance(exc, Exception)
            and (not flight.background or flight.joiners)
        ):
            # A stale value, or exc remembered: for a background refresh too once a caller
            # joined it (its entry expired); one nobody awaits leaves the entry as it is.
            return self.fail_now(flight.key, exc, flight)
        return (False, exc)

    def _cancelled(self, flight: Flight[K, R]) -> None:
        """The computation ended with CancelledError: its callers are to be cancelled."""
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

    def _destroyed(self, flight: Flight[K, R], exc: BaseException) -> bool:
        """Whether exc was thrown in because the task is being destroyed (outside any step of
        it): nobody is left to tell. Raised by the worker itself, it reaches the callers."""
        return isinstance(exc, GeneratorExit) and (
            self.loop.is_closed()
            or (flight.task is not None and asyncio.current_task(self.loop) is not flight.task)
        )

    def _settle(self, flight: Flight[K, R], outcome: tuple[bool, Any]) -> None:
        """Deliver outcome, ``(True, value)`` or ``(False, exception)``, to every caller of
        flight, once: a later outcome (a result after a shutdown failed it) is dropped.

        A CancelledError cancels the callers. A failure nobody is left to receive is logged; a
        background refresh's is reported instead (``on_refresh_failed``).
        """
        if flight.outcome is not None:
            return
        flight.outcome = outcome
        ok, what = outcome
        if ok:
            waiter = flight.waiter
            if waiter is not None:
                flight.waiter = None
                if not waiter.done():
                    waiter.set_result(what)
            joiners = flight.joiners
            if joiners is not None:
                flight.joiners = None
                for waiter in joiners:
                    if not waiter.done():
                        waiter.set_result(what)
            return
        futures = flight.futures()
        flight.waiter = flight.joiners = None
        if isinstance(what, asyncio.CancelledError):
            for waiter in futures:
                waiter.cancel()
            return
        received = False
        for waiter in futures:
            if not waiter.done():
                waiter.set_exception(what)
                # Marked retrieved: a caller cancelled before it resumes would leave it unread.
                waiter.exception()
                received = True
        if flight.background:
            if not isinstance(what, RefreshDeferred):
                count_refresh_failed(self.counts)
            if flight.forgotten:
                # Invalidated, cleared or primed over while it ran: the key's entry and its due
                # time are now those of what replaced it, which this failure says nothing of.
                if not isinstance(what, RefreshDeferred | ShutdownTimeout):
                    logger.info(
                        "refreshing %r failed after it was invalidated; nothing of it is kept",
                        flight.key,
                        exc_info=what,
                    )
            elif self.on_refresh_failed is not None:
                self.on_refresh_failed(flight.key, what)
        elif not received:
            logger.error(
                "computing %r failed and no caller was left to receive the error",
                flight.key,
                exc_info=what,
            )

    def _cancel_waiting(self) -> None:
        for low in (False, True):
            for flight in self.slots.clear_line(low):
                self._count_unstarted(flight)
                self._end(flight, (False, asyncio.CancelledError()))

    def _count_unstarted(self, flight: Flight[K, R]) -> None:
        """Count the calls of a flight that ends without starting: a miss and joins."""
        count_unstarted(self.counts, flight.background, flight.joined())

    def _end(self, flight: Flight[K, R], outcome: tuple[bool, Any] | None) -> None:
        """The one way a flight ends, whatever ended it: deliver outcome (unless delivered
        already, or None), take flight out of the table, and give back its slot, to the next
        item in line or to the computations running in it. A flight ending while WAITING has
        been taken out of its line by the caller. Ending it again does nothing."""
        if outcome is not None and flight.outcome is None:
            if outcome[0]:  # a result, the common case: delivered here, a call less
                flight.outcome = outcome
                value = outcome[1]
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
            else:
                self._settle(flight, outcome)
        state = flight.state
        if state is _FINISHED:
            return
        flight.state = _FINISHED
        # The task's context refers back to the flight: break the cycle, so that reference
        # counting frees them at once, without waiting for the garbage collector.
        flight.task = flight.awaiting = None
        self.live -= 1
        if self.nested:  # joined by nested calls before it asked for a slot, which it never did
            self.nested.pop(flight, None)
        if flight.forgotten:
            self._forgotten.discard(flight)
        else:  # a flight not forgotten is the one its key maps to until it finishes
            try:
                del self.flights[flight.key]
            except KeyError:
                self._unmap(flight)
        if state is _RUNNING or state is _RUNNING_SPARE:
            if state is _RUNNING_SPARE:  # a computation it hands its slot to is a caller's
                self.slots.unspare()
            if flight.borrowers is None or not self._hand_over(flight, None, held=True):
                self.slots.release()
        elif state is not _WAITING:  # RUNNING_LENT or AWAITING_ELSEWHERE: no slot of its own
            self.borrowed -= 1
            leave_lender(flight)
            if flight.borrowers is not None:
                # Its own slot, if it took one to compute (slotless), is given back already.
                self._hand_over(flight, flight.lender, held=False)
        if not self.live and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _unmap(self, flight: Flight[K, R]) -> None:
        """Remove flight, whose key no longer hashes as it did (the worker changed it)."""
        kept = [(k, f) for k, f in self.flights.items() if f is not flight]
        self.flights.clear()
        self.flights.update(kept)

    def _hand_over(
        self, flight: Flight[K, R], lender: Flight[Any, Any] | None, *, held: bool
    ) -> bool:
        """Computations still running in flight's slot, which it no longer needs: they move to
        flight's own lender, or they take slots of their own, over the bound until they end:
        the first takes flight's slot over if flight still ``held`` it (a ``slotless`` flight
        gave back the slot it computed in as its computation ended). Whether any was left."""
        moved = hand_over(flight, lender)
        if not moved:
            return False
        if lender is None:
            for borrower in moved:
                borrower.state = _RUNNING
            self.borrowed -= len(moved)
            # Slots of their own, over the bound; flight's own, if it ``held`` it, is the first's.
            self.slots.take(len(moved) - 1 if held else len(moved))
        return True

    # -- slots ----------------------------------------------------------------------------------

    def _admit(self, flight: Flight[K, R], spare: bool) -> None:
        """flight's turn for a slot has come (``spare``: a background refresh's spare slot)."""
        if not spare:
            waiter = flight.waiter
            if (waiter is None or waiter.done()) and not flight.wanted():
                self._drop(flight)  # every caller left before it started
                return
            del waiter  # see call()
            self._start(flight, True)
        else:
            self._start(flight, True, spare=True)
        del flight  # see call()

    def _drop(self, flight: Flight[K, R]) -> None:
        """End a flight that never started (out of its line), counting its calls."""
        self._count_unstarted(flight)
        self._end(flight, None)

    async def slot(self, flight: Flight[K, R] | None = None) -> bool:
        """Wait for a slot (``slotless`` tables): True once taken, and the caller must
        ``release()`` it after; False if flight is lent one (``join()``: a caller of it holds
        a slot and awaits it, having joined before or while it waits), which it then computes
        in without taking its own."""
        if flight is None:
            return await self.slots.acquire()
        nested = self.nested.pop(flight, None)
        if nested is not None:
            for parent, joined in nested:
                if not joined.done() and (lender := self.lender_of(parent)) is not None:
                    lend(flight, lender)
                    flight.state = _RUNNING_LENT
                    return False

        def asking(waiter: asyncio.Future[bool] | None) -> None:
            if waiter is None:
                del self.asking[flight]
            else:
                self.asking[flight] = waiter

        return await self.slots.acquire(asking)

    def release(self) -> None:
        """Give back a slot taken with ``slot()``."""
        self.slots.release()

    def computing(self) -> int:
        """How many computations run now: in a slot of their own, or in the slot of a
        computation that awaits them. (A ``slotless`` table's flights hold no slot while they
        wait for another process, so there only those in ``counted()`` are.)"""
        return self.computations if self.slotless else self.slots.running + self.borrowed

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
        if flight.state is not _AWAITING_ELSEWHERE:
            return
        parent = flight.parent
        lender = None if parent is None else self.lender_of(parent)
        if lender is not None:
            # Made inside a computation of this table: it runs in that one's slot, as a nested
            # call does (waiting for a slot here could wait for the one its caller holds).
            lend(flight, lender)
            flight.state = _RUNNING_LENT
        elif await self.slot(flight):
            flight.state = _RUNNING
            self.borrowed -= 1
        # else: a caller of it holding a slot lent it that one while it waited (RUNNING_LENT).
        flight.computing = True

    def take_spare(self, flight: Flight[K, R]) -> bool:
        """flight, a background refresh started without a slot (``slotless``) that nobody
        waits for, takes a spare slot if one is free (True): a slot no caller needs, given back
        when it ends. Else it must not compute now (False)."""
        slots = self.slots
        if flight.state is not _AWAITING_ELSEWHERE or not slots.spare_free():
            return False
        flight.state = _RUNNING_SPARE
        self.borrowed -= 1
        slots.take(1, spare=True)
        return True

    def give_back(self, flight: Flight[K, R]) -> None:
        """flight, holding a slot of its own (``slotless``), goes on without one: to wait for
        another process. Its computation takes one again with ``slot()`` if it must."""
        state = flight.state
        if (state is not _RUNNING and state is not _RUNNING_SPARE) or flight.borrowers:
            return
        flight.state = _AWAITING_ELSEWHERE
        self.borrowed += 1
        if state is _RUNNING_SPARE:
            self.slots.unspare()
        self.slots.release()

    def check(self) -> None:
        """Assert the table's invariants; for tests, between steps of the event loop.

        Every flight not finished is either the one its key maps to or forgotten, and counted
        in ``live``; the lines hold exactly the WAITING flights (background refreshes alone in
        theirs); the slots taken are those of the RUNNING flights (a ``slotless`` table's
        computations also take slots with ``slot()``), the spare ones those of the RUNNING
        background refreshes; ``borrowed`` counts the flights running in no slot of their own;
        a flight RUNNING_LENT runs in the slot of a live lender that lists it as a borrower.
        """
        mapped = list(self.flights.values())
        flights = mapped + list(self._forgotten)
        ids = {id(f) for f in flights}
        assert len(ids) == len(flights), f"a flight is both mapped and forgotten: {flights}"
        assert self.live == len(flights), f"live={self.live}, but {len(flights)} flights"
        for flight in mapped:
            assert not flight.forgotten, f"{flight} is forgotten yet mapped"
        for flight in flights:
            assert flight.state is not _FINISHED, f"{flight} has finished yet stays"
        line, refreshes, _ = self.slots.snapshot()
        queued = [*line, *refreshes]
        assert len({id(f) for f in queued}) == len(queued), f"a flight is twice in line: {queued}"
        assert all(f.background for f in refreshes), f"not a refresh, in its line: {refreshes}"
        waiting = [f for f in flights if f.state is _WAITING]
        assert {id(f) for f in queued} == {id(f) for f in waiting}, (
            f"in line {queued}, but WAITING {waiting}"
        )
        running = [f for f in flights if f.state in (_RUNNING, _RUNNING_SPARE)]
        slots = self.slots
        if self.slotless:
            assert slots.running >= len(running), f"{slots}, but {len(running)} run: {running}"
        else:
            assert slots.running == len(running), f"{slots}, but {len(running)} run: {running}"
        spare = [f for f in flights if f.state is _RUNNING_SPARE]
        assert all(f.background for f in spare), f"not a refresh, in a spare slot: {spare}"
        assert slots.spare == len(spare), f"{slots}, but {len(spare)} in spare slots: {spare}"
        slotless = [f for f in flights if f.state in (_RUNNING_LENT, _AWAITING_ELSEWHERE)]
        assert self.borrowed == len(slotless), f"borrowed={self.borrowed}, but {slotless}"
        assert all(id(f) in ids for f in self.nested), f"ended flights in {self.nested}"
        for flight in flights:
            lender = flight.lender
            if flight.state is _RUNNING_LENT:
                assert lender is not None, f"{flight} runs in a lent slot with no lender"
                assert id(lender) in ids, f"{flight} is lent a slot by {lender}, not in flight"
                assert lender.state is not _WAITING, f"{flight} lent a slot by {lender}"
                assert lender.borrowers is not None, f"{lender} lends {flight} no slot"
                assert flight in lender.borrowers, f"{flight} not among {lender.borrowers}"
            elif flight.state is not _WAITING:
                assert lender is None, f"{flight} has a lender {lender}"
            for borrower in flight.borrowers or ():
                assert borrower.lender is flight, f"{flight} lends its slot to {borrower}"
                assert borrower.state is _RUNNING_LENT, f"{flight} lends its slot to {borrower}"
            asking = self.asking.get(flight)
            if asking is not None and not asking.done():
                assert flight.state is _AWAITING_ELSEWHERE, f"{flight} asks for a slot"

    def accepted(self) -> list[Flight[K, R]]:
        """The items in line that are accepted: their callers wait for a slot.

        Items whose callers all left hold no place: they are dropped when their turn comes.
        """
        return [f for f in self.slots.line if f.wanted()][: self.maxsize]

    def outside(self) -> list[Flight[K, R]]:
        """The items in line beyond the accepted: their callers wait for room."""
        return [f for f in self.slots.line if f.wanted()][self.maxsize :]

    def lines(self) -> tuple[int, int, int]:
        """How many wait for a slot: items in line (their callers' left or not), background
        refreshes waiting for a spare slot, computations waiting in ``slot()``."""
        line, refreshes, tasks = self.slots.snapshot()
        return len(line), len(refreshes), tasks

    def waiting(self) -> int:
        """How many items wait for a slot: in line with a caller left, background refreshes, and
        computations waiting in ``slot()``. Safe to call from another thread (metrics)."""
        line, refreshes, tasks = self.slots.snapshot()
        return sum(f.wanted() for f in line) + len(refreshes) + tasks

    # -- shutting down --------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new work: callers of items still waiting for room get QueueShutDown."""
        self.closing = True
        if self.on_close is not None:
            self.on_close()
        slots = self.slots
        for flight in [f for f in slots.line if not f.wanted()]:
            slots.remove(flight)
            self._drop(flight)
        for flight in slots.clear_line(low=True):  # nobody waits for them: they are dropped
            self._drop(flight)
        while len(slots.line) > self.maxsize:
            refused = QueueShutDown("the queue was closed while waiting for room")
            self._end(slots.pop_last(), (False, refused))

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
        self.slots.clear_line()
        self.slots.clear_line(low=True)
        for flight in unfinished:
            if flight.state is _WAITING:  # accepted, never started: its callers get an outcome
                count_started(self.counts, flight.background, flight.joined(), False)
            exc = ShutdownTimeout(f"{flight.key!r} did not finish within finish_timeout={grace}s")
            if flight.task is not None and not flight.task.done():
                self._settle(flight, (False, exc))  # at once: its task ends when it ends
                flight.task.cancel()
                tasks.append(flight.task)
            else:
                self._end(flight, (False, exc))
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


def _refused() -> QueueShutDown:
    return QueueShutDown("the queue is shutting down; require() again once aclose() ends")
