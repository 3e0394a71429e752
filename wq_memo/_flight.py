"""The in-flight table: every state change of an item being computed happens here.

An item in flight is, in order:

- OUTSIDE: asked for while the line was full. Its callers wait for room; a close refuses them.
- WAITING: accepted, in the line for one of ``maxsize`` slots.
- RUNNING: its computation task runs, in a slot of its own or in the slot of a computation of
  the same queue that is suspended waiting for it (a nested call).
- FINISHED: its outcome is delivered and it has left the table.

Callers never wake up for room: each one awaits a future of its own, which the computation's
task completes directly with the result or the exception. A slot that frees up goes to the
first item in line, so computations start in the order their first callers arrived. The table
belongs to one event loop; WorkerQueue makes a new one when the loop changes.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, Generic, TypeVar

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


class Status(enum.Enum):
    """Where an item is in its life."""

    OUTSIDE = "waiting for room"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Counts:
    """Calls answered by the cache, calls that started a computation, calls that joined one."""

    __slots__ = ("hits", "joined", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.joined = 0


class Flight(Generic[K, R]):
    """One item in flight: its key, its arguments, its callers' futures and its state."""

    __slots__ = (
        "args",
        "awaiting",
        "borrowed",
        "computing",
        "context",
        "forgotten",
        "key",
        "kwargs",
        "outcome",
        "parent",
        "status",
        "storing",
        "task",
        "uncounted",
        "waited",
        "waiters",
    )

    def __init__(
        self,
        key: K,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        waiter: asyncio.Future[R],
        parent: Flight[Any, Any] | None,
    ) -> None:
        self.key = key
        self.args = args
        self.kwargs = kwargs
        self.waiters = [waiter]
        self.parent = parent
        self.status = Status.RUNNING
        self.task: asyncio.Task[None] | None = None
        self.context: contextvars.Context | None = None
        self.outcome: tuple[bool, Any] | None = None
        """(True, value) or (False, exception) once delivered."""
        self.awaiting: list[Flight[Any, Any]] | None = None
        """Flights this one's computation has awaited (for finding cycles)."""
        self.borrowed = False
        self.computing = False
        """Whether its computation has begun (with ``slotless``, once it has a slot)."""
        self.forgotten = False
        self.storing = False
        self.waited = False
        self.uncounted = 0

    def __repr__(self) -> str:
        return f"<Flight {self.key!r} {self.status.value} callers={self.callers}>"

    @property
    def callers(self) -> int:
        """How many callers still await the outcome."""
        return sum(not w.done() for w in self.waiters)


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
        if id(flight) in seen or flight.status is Status.FINISHED:
            continue
        seen.add(id(flight))
        if flight.awaiting:
            stack.extend(flight.awaiting)
    return False


class FlightTable(Generic[K, R]):
    """The items one queue has in flight on one event loop, and the slots they run in.

    ``compute(flight)`` is the computation. The cache is reached either synchronously
    (``lookup_now``/``store_now``, for in-process mappings: no coroutine, no suspension) or
    through coroutines (``lookup``/``store``). ``lookup*`` return ``miss`` for a miss. With
    ``slotless``, computations start at once and ``compute`` itself takes a slot with ``slot()``
    (for a cache that may wait on another process before computing).

    Nothing here refers back to the WorkerQueue, so that a queue its owner drops can be
    garbage-collected.
    """

    __slots__ = (
        "_drained",
        "_forgotten",
        "_overflow",
        "_slot_waiters",
        "_starting",
        "_waiting",
        "borrowed",
        "closing",
        "compute",
        "counts",
        "flights",
        "live",
        "lookup",
        "lookup_now",
        "lookups",
        "loop",
        "maxsize",
        "miss",
        "running",
        "slotless",
        "store",
        "store_now",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        compute: Callable[[Flight[K, R]], Awaitable[R]],
        maxsize: int,
        counts: Counts,
        *,
        miss: object,
        lookup_now: Callable[[K], Any] | None = None,
        store_now: Callable[[K, R], None] | None = None,
        lookup: Callable[[K], Awaitable[Any]] | None = None,
        store: Callable[[K, R], Awaitable[None]] | None = None,
        slotless: bool = False,
    ) -> None:
        self.loop = loop
        self.compute = compute
        self.maxsize = maxsize
        self.counts = counts
        self.miss = miss
        self.lookup_now = lookup_now
        self.store_now = store_now
        self.lookup = lookup
        self.store = store
        self.slotless = slotless
        self.flights: dict[K, Flight[K, R]] = {}
        self.lookups: dict[K, Lookup] = {}
        self.running = 0
        """Slots taken (computations running in a slot of their own)."""
        self.borrowed = 0
        """Computations running in the slot of a computation that awaits them."""
        self.live = 0
        """Flights not yet finished, forgotten ones included."""
        self.closing = False
        self._waiting: deque[Flight[K, R]] = deque()
        self._overflow: deque[Flight[K, R]] = deque()
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._forgotten: set[Flight[K, R]] = set()
        self._starting = False
        self._drained: asyncio.Future[None] | None = None

    # -- accepting ------------------------------------------------------------------------------

    def call(
        self, key: K, args: tuple[Any, ...], kwargs: dict[str, Any] = _NO_KWARGS
    ) -> asyncio.Future[R]:
        """Return a future for key's outcome: join its computation, or start or queue one.

        The caller has already found no cached value. Raises QueueShutDown while closing, and
        RecursionError when the calling computation would end up awaiting itself.
        """
        if self.closing:
            raise _refused()
        flight = self.flights.get(key)
        if flight is not None:
            return self.join(flight)
        waiter: asyncio.Future[R] = self.loop.create_future()
        parent = _current.get()
        flight = Flight(key, args, kwargs, waiter, parent)
        self.flights[key] = flight
        self.live += 1
        if parent is not None:
            _awaits(parent, flight)
        if self.slotless or (self.running < self.maxsize and not self._waiting):
            self.counts.misses += 1
            self._start(flight, borrowed=self.slotless)
        elif parent is not None and self._inside(parent):
            self.counts.misses += 1
            self._start(flight, borrowed=True)
        else:
            flight.waited = True
            flight.context = contextvars.copy_context()
            if len(self._waiting) < self.maxsize:
                self.counts.misses += 1
                flight.status = Status.WAITING
                self._waiting.append(flight)
            else:
                flight.status = Status.OUTSIDE
                flight.uncounted = 1
                self._overflow.append(flight)
        return waiter

    def join(self, flight: Flight[K, R]) -> asyncio.Future[R]:
        """Return a future for flight's outcome (the caller joins it)."""
        waiter: asyncio.Future[R] = self.loop.create_future()
        parent = _current.get()
        if parent is not None:
            if flight is parent or _reaches(flight, parent):
                raise RecursionError(
                    f"computing {parent.key!r} requires {flight.key!r}, whose computation "
                    f"is waiting for it: a memoized call depends on itself"
                )
            _awaits(parent, flight)
            if flight.status in (Status.WAITING, Status.OUTSIDE) and self._inside(parent):
                # Its callers' computations hold the slots it waits for: run it in theirs.
                if flight.status is Status.OUTSIDE:
                    self.counts.misses += 1
                    self.counts.joined += flight.uncounted - 1
                    flight.uncounted = 0
                self._remove_from_line(flight)
                self._start(flight, borrowed=True)
        outcome = flight.outcome
        if outcome is not None:  # delivered already (it is being stored)
            self.counts.joined += 1
            if outcome[0]:
                waiter.set_result(outcome[1])
            else:
                waiter.set_exception(outcome[1])
            return waiter
        if flight.status is Status.OUTSIDE:
            flight.uncounted += 1
        else:
            self.counts.joined += 1
        flight.waiters.append(waiter)
        return waiter

    def _inside(self, parent: Flight[Any, Any]) -> bool:
        """Whether the caller runs inside a running computation of this table."""
        flight: Flight[Any, Any] | None = parent
        while flight is not None:
            if flight.status is Status.RUNNING and self.flights.get(flight.key) is flight:
                return True
            if flight.status is Status.RUNNING and flight in self._forgotten:
                return True
            flight = flight.parent
        return False

    def answer(self, key: K, lookup: Lookup, answer: tuple[bool, Any] | None) -> None:
        """End lookup, telling those who share it; a lookup already answered is left alone."""
        if self.lookups.get(key) is lookup:
            del self.lookups[key]
        if lookup.answer is not None and not lookup.answer.done():
            lookup.answer.set_result(answer)

    # -- invalidation ---------------------------------------------------------------------------

    def forget(self, key: K) -> Flight[K, R] | None:
        """Make later calls of key start afresh; key's computation under way stores nothing.

        Callers already joined still get its outcome. Returns that computation if one was
        running (the caller may have to wait for a store already on its way).
        """
        # A lookup under way may read what is being invalidated: those sharing it asked before
        # the invalidation and keep it; newcomers look up afresh.
        self.lookups.pop(key, None)
        flight = self.flights.get(key)
        if flight is None or not flight.computing:
            return None  # not started yet: it will compute from fresh data
        del self.flights[key]
        flight.forgotten = True
        self._forgotten.add(flight)
        return flight

    def forget_all(self) -> list[Flight[K, R]]:
        """forget() every key."""
        self.lookups.clear()
        return [f for f in (self.forget(k) for k in list(self.flights)) if f is not None]

    # -- running --------------------------------------------------------------------------------

    def _start(self, flight: Flight[K, R], *, borrowed: bool = False) -> None:
        flight.status = Status.RUNNING
        flight.computing = not self.slotless
        if borrowed:
            flight.borrowed = True
            self.borrowed += 1
        else:
            self.running += 1
        flight.task = self.loop.create_task(self._run(flight), context=flight.context)
        flight.context = None

    async def _run(self, flight: Flight[K, R]) -> None:
        _current.set(flight)
        me = asyncio.current_task()
        try:
            if flight.waited and await self._found_meanwhile(flight):
                return
            result = await self.compute(flight)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled from outside the queue (a shutdown, or its loop cancelling every
                # task as asyncio.run() does on its way out): starting waiting items now would
                # make tasks nobody cancels; drop them instead.
                self._cancel_waiting()
            else:
                logger.warning(
                    "the worker raised CancelledError for %r without being cancelled; "
                    "its callers are cancelled too",
                    flight.key,
                )
            self._cancel(flight)
            raise
        except (KeyboardInterrupt, SystemExit) as exc:
            self._fail(flight, exc)
            raise
        except BaseException as exc:
            # GeneratorExit included: raised by the worker, it reaches the callers. Thrown in
            # because the task is being destroyed (outside any step of it), it must go on.
            if self.loop.is_closed() or asyncio.current_task(self.loop) is not me:
                raise
            self._fail(flight, exc)
        else:
            if self.store_now is not None:
                if not flight.forgotten:
                    try:
                        self.store_now(flight.key, result)
                    except Exception:
                        logger.exception(
                            "storing %r failed; the result was returned uncached", flight.key
                        )
                self._deliver(flight, result)
            else:
                self._deliver(flight, result)
                if self.store is not None and not flight.forgotten:
                    flight.storing = True
                    try:
                        await self.store(flight.key, result)
                    except Exception:
                        logger.exception(
                            "cache_set failed for %r; the result was returned uncached",
                            flight.key,
                        )
        finally:
            self._finish(flight)

    async def _found_meanwhile(self, flight: Flight[K, R]) -> bool:
        """Look key up again after waiting; deliver and return True if it was found."""
        if self.lookup_now is not None:
            value = self.lookup_now(flight.key)
        elif self.lookup is not None:
            try:
                value = await self.lookup(flight.key)
            except Exception:
                logger.exception("cache_get failed for %r; treating it as a miss", flight.key)
                return False
        else:
            return False
        if value is self.miss:
            return False
        self.counts.misses -= 1
        self.counts.hits += 1
        self._deliver(flight, value)
        return True

    def _deliver(self, flight: Flight[K, R], value: R) -> None:
        if flight.outcome is not None:  # failed already by a shutdown
            return
        flight.outcome = (True, value)
        for waiter in flight.waiters:
            if not waiter.done():
                waiter.set_result(value)
        flight.waiters = []

    def _fail(self, flight: Flight[K, R], exc: BaseException) -> None:
        """Deliver exc to every caller of flight; log it if nobody is left to receive it."""
        if flight.outcome is not None:
            return
        flight.outcome = (False, exc)
        received = False
        for waiter in flight.waiters:
            if not waiter.done():
                waiter.set_exception(exc)
                # Marked retrieved: a caller cancelled before it resumes would leave it unread.
                waiter.exception()
                received = True
        flight.waiters = []
        if not received:
            logger.error(
                "computing %r failed and no caller was left to receive the error",
                flight.key,
                exc_info=exc,
            )

    def _cancel(self, flight: Flight[K, R]) -> None:
        if flight.outcome is not None:
            return
        flight.outcome = (False, asyncio.CancelledError())
        for waiter in flight.waiters:
            waiter.cancel()
        flight.waiters = []

    def _cancel_waiting(self) -> None:
        for line in (self._waiting, self._overflow):
            while line:
                flight = line.popleft()
                self._cancel(flight)
                self._finish(flight)

    def _finish(self, flight: Flight[K, R]) -> None:
        """Take flight out of the table, free its slot and start the next item in line."""
        status = flight.status
        if status is Status.FINISHED:
            return
        flight.status = Status.FINISHED
        flight.awaiting = None
        self.live -= 1
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        self._forgotten.discard(flight)
        if status is Status.RUNNING:
            if flight.borrowed:
                self.borrowed -= 1
            else:
                self._release_slot()
        if not self.live and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- slots ----------------------------------------------------------------------------------

    def _release_slot(self) -> None:
        """Give a freed slot to the first in line (an item, or a computation asking for one)."""
        self.running -= 1
        if self._starting or self.loop.is_closed():
            return  # the loop below fills it (an eager task finished within _start)
        self._starting = True
        try:
            while self.running < self.maxsize:
                if self._waiting:
                    flight = self._waiting.popleft()
                    self._admit_from_overflow()
                    if flight.waiters and not any(not w.done() for w in flight.waiters):
                        self._drop(flight)  # every caller left before it started
                        continue
                    self._start(flight)
                elif self._slot_waiters:
                    waiter = self._slot_waiters.popleft()
                    if not waiter.done():
                        self.running += 1
                        waiter.set_result(None)
                else:
                    break
        finally:
            self._starting = False

    def _admit_from_overflow(self) -> None:
        """Move items waiting for room into the line while it has room."""
        while self._overflow and len(self._waiting) < self.maxsize:
            flight = self._overflow.popleft()
            if not any(not w.done() for w in flight.waiters):
                self._drop(flight)  # every caller left before it was accepted
                continue
            flight.status = Status.WAITING
            self.counts.misses += 1
            self.counts.joined += flight.uncounted - 1
            flight.uncounted = 0
            self._waiting.append(flight)

    def _drop(self, flight: Flight[K, R]) -> None:
        """Forget a flight that never started."""
        if flight.status is Status.WAITING:
            self.counts.misses -= 1  # it never started a computation after all
        flight.status = Status.FINISHED
        self.live -= 1
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        if not self.live and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _remove_from_line(self, flight: Flight[K, R]) -> None:
        if flight.status is Status.WAITING:
            self._waiting.remove(flight)
            self._admit_from_overflow()
        else:
            self._overflow.remove(flight)

    async def slot(self) -> None:
        """Wait for a slot (``slotless`` tables); the caller must ``release()`` it after."""
        if self.running < self.maxsize and not self._slot_waiters:
            self.running += 1
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # given the slot, then cancelled: pass it on
            else:
                waiter.cancel()  # skipped when its turn comes
            raise

    def release(self) -> None:
        """Give back a slot taken with ``slot()``."""
        self._release_slot()

    # -- shutting down --------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new work: callers of items still waiting for room get QueueShutDown."""
        self.closing = True
        while self._overflow:
            flight = self._overflow.popleft()
            exc = QueueShutDown("the queue was closed while waiting for room")
            for waiter in flight.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
                    waiter.exception()
            flight.waiters = []
            flight.outcome = (False, exc)
            flight.status = Status.FINISHED
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
        self._waiting.clear()
        for flight in unfinished:
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


def _awaits(parent: Flight[Any, Any], flight: Flight[Any, Any]) -> None:
    """Record that parent's computation awaits flight (an edge of the graph cycles live in)."""
    awaiting = parent.awaiting
    if awaiting is None:
        parent.awaiting = [flight]
        return
    if len(awaiting) >= 64:
        awaiting[:] = [f for f in awaiting if f.status is not Status.FINISHED]
    awaiting.append(flight)


def _refused() -> QueueShutDown:
    return QueueShutDown("the queue is shutting down; require() again once aclose() ends")
