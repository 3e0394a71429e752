"""The in-flight table: every state change of an item being computed happens here.

An item in flight is WAITING (accepted, no slot to run in yet), RUNNING (its computation task
holds one of ``maxsize`` slots) or FINISHED (its outcome is set and it has left the table). The
table belongs to one event loop; WorkerQueue makes a new one when the loop changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from ._errors import QueueShutDown, ShutdownTimeout

T = TypeVar("T", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")


def _relay(waiter: asyncio.Future[R], future: asyncio.Future[R]) -> None:
    """Pass future's outcome on to one caller's waiter, unless that caller has left."""
    if waiter.done():
        return
    if future.cancelled():
        waiter.cancel()
    elif (exc := future.exception()) is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(future.result())


class Status(enum.Enum):
    """Where an item is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Flight(Generic[T, R]):
    """One item in flight: its shared future, its status and how many callers await it."""

    __slots__ = ("callers", "future", "item", "status", "task")

    def __init__(self, item: T, future: asyncio.Future[R]) -> None:
        self.item = item
        self.future = future
        self.status = Status.WAITING
        self.callers = 0
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Flight {self.item!r} {self.status.value} callers={self.callers}>"


class Lookup:
    """A cache lookup under way, which callers asking for the same item meanwhile share.

    Its answer is ``(True, value)`` when the value was found, ``(False, flight)`` once the
    looking caller has joined or started the item's computation, or None when that caller
    left without either (the others then start over).
    """

    __slots__ = ("answer",)

    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[bool, Any] | None] | None = None


class FlightTable(Generic[T, R]):
    """The items one queue has in flight on one event loop, and the slots they run in.

    ``maxsize`` bounds both the computations running at once and the items waiting for a slot.
    A caller that finds both full waits in ``wait_for_room``. Nothing here refers back to the
    WorkerQueue, so that a queue its owner drops can be garbage-collected.
    """

    __slots__ = (
        "_drained",
        "_room_waiters",
        "_waiting",
        "cache_set",
        "closing",
        "flights",
        "lookups",
        "loop",
        "maxsize",
        "running",
        "worker",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        worker: Callable[[T], Awaitable[R]],
        cache_set: Callable[[T, R], Awaitable[None]],
        maxsize: int,
    ) -> None:
        self.loop = loop
        self.worker = worker
        self.cache_set = cache_set
        self.maxsize = maxsize
        self.flights: dict[T, Flight[T, R]] = {}
        self.lookups: dict[T, Lookup] = {}
        self.running = 0
        self.closing = False
        self._waiting: deque[Flight[T, R]] = deque()
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._drained: asyncio.Future[None] | None = None

    # -- accepting ------------------------------------------------------------------------------

    def admit(self, item: T) -> Flight[T, R] | None:
        """Accept item and start it if a slot is free; None when running and waiting are full.

        The flight counts its admitting caller already, who must ``join(flight, counted=True)``:
        an eager task factory can run, even fail, the computation before admit() returns.
        """
        if self.running < self.maxsize:
            flight: Flight[T, R] = Flight(item, self.loop.create_future())
            flight.callers = 1
            self.flights[item] = flight
            self._start(flight)
            return flight
        if len(self._waiting) < self.maxsize:
            flight = Flight(item, self.loop.create_future())
            flight.callers = 1
            self.flights[item] = flight
            self._waiting.append(flight)
            return flight
        return None

    async def wait_for_room(self, again: bool = False) -> None:
        """Wait until a place frees up; raise QueueShutDown if the queue closes first.

        A caller woken here must either take the place with ``admit`` or hand it on with
        ``pass_room``. ``again`` puts a caller who lost its place to a newcomer first in line.
        """
        waiter: asyncio.Future[None] = self.loop.create_future()
        if again:
            self._room_waiters.appendleft(waiter)
        else:
            self._room_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Woken, then cancelled before using the room: hand the wake-up on.
                self.pass_room()
            else:
                # Leave the line. Every waiter taken out of it is completed, so no cancel()
                # is needed, which would schedule callbacks on a loop that may be closed.
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(waiter)
            raise

    def pass_room(self) -> None:
        """Wake the next caller waiting for room, if there is room."""
        if self.running < self.maxsize or len(self._waiting) < self.maxsize:
            self._wake_room_waiter()

    def _wake_room_waiter(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def answer(self, item: T, lookup: Lookup, answer: tuple[bool, Any] | None) -> None:
        """End lookup, telling those who share it; a lookup already ended is left alone."""
        if self.lookups.get(item) is not lookup:
            return
        del self.lookups[item]
        if lookup.answer is not None and not lookup.answer.done():
            lookup.answer.set_result(answer)

    async def join(self, flight: Flight[T, R], counted: bool = False) -> R:
        """Await flight's outcome without letting this caller's cancellation reach it.

        Like ``asyncio.shield``, with one future per caller relaying the shared one; lighter
        than shield, which also watches its outer future (one more callback per caller).
        """
        if not counted:
            flight.callers += 1
        try:
            future = flight.future
            if future.done():
                return future.result()
            waiter: asyncio.Future[R] = self.loop.create_future()
            relay = functools.partial(_relay, waiter)
            future.add_done_callback(relay)
            try:
                return await waiter
            except BaseException:
                # This caller leaves: take its relay off the shared future, so that nothing
                # scheduled later keeps the future (and an error it may hold) alive.
                if not future.done():
                    future.remove_done_callback(relay)
                raise
        finally:
            flight.callers -= 1

    # -- running --------------------------------------------------------------------------------

    def _start(self, flight: Flight[T, R]) -> None:
        flight.status = Status.RUNNING
        self.running += 1
        flight.task = self.loop.create_task(self._run(flight))

    async def _run(self, flight: Flight[T, R]) -> None:
        future = flight.future
        try:
            try:
                result = await self.worker(flight.item)
            except asyncio.CancelledError:
                if not future.done():
                    future.cancel()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Cancelled from outside the queue: its loop is cancelling every task, as
                    # asyncio.run() does on its way out. Starting waiting items now would make
                    # tasks it never cancels; cancel them instead.
                    self._cancel_waiting()
                else:
                    logger.warning(
                        "the worker raised CancelledError for %r without being cancelled; "
                        "its callers are cancelled too",
                        flight.item,
                    )
                raise
            except Exception as exc:
                self._fail(flight, exc)
                return
            except GeneratorExit:  # destroyed pending, its loop closed: nobody to tell
                raise
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: callers must not hang
                self._fail(flight, exc)
                raise
            if future.done():  # aborted by a shutdown while the worker was finishing
                return
            future.set_result(result)
            try:
                await self.cache_set(flight.item, result)
            except Exception:
                logger.exception(
                    "cache_set failed for %r; the result was returned uncached", flight.item
                )
        finally:
            self._finish(flight)

    def _cancel_waiting(self) -> None:
        while self._waiting:
            flight = self._waiting.popleft()
            flight.future.cancel()
            self._finish(flight)

    def _fail(self, flight: Flight[T, R], exc: BaseException) -> None:
        """Deliver exc to every caller of flight; log it if nobody is left to receive it."""
        future = flight.future
        if future.done():
            return
        future.set_exception(exc)
        # Mark it retrieved: callers receive it through their relays (see join), and asyncio
        # must not report it as "never retrieved" when none are left.
        future.exception()
        if flight.callers == 0:
            logger.error(
                "computing %r failed and no caller was left to receive the error",
                flight.item,
                exc_info=exc,
            )

    def _finish(self, flight: Flight[T, R]) -> None:
        """Take flight out of the table, free its slot and start the next waiting item."""
        if flight.status is Status.FINISHED:
            return
        was_running = flight.status is Status.RUNNING
        flight.status = Status.FINISHED
        if self.flights.get(flight.item) is flight:
            del self.flights[flight.item]
        if was_running:
            self.running -= 1
        if self.loop.is_closed():  # destroyed with its loop: nothing can start or wake now
            return
        if was_running and self._waiting:
            self._start(self._waiting.popleft())
        self._wake_room_waiter()
        if not self.flights and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- shutting down --------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new work: callers waiting for room get QueueShutDown."""
        self.closing = True
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(QueueShutDown("the queue was closed while waiting for room"))

    async def wait_drained(self) -> None:
        """Wait until every accepted item has finished."""
        if self.flights:
            self._drained = self.loop.create_future()
            await self._drained

    async def abort(self, finish_timeout: float) -> None:
        """Fail every unfinished item with ShutdownTimeout, cancel its task and await the task."""
        tasks: list[asyncio.Task[None]] = []
        for flight in list(self.flights.values()):
            self._fail(
                flight,
                ShutdownTimeout(
                    f"{flight.item!r} did not finish within finish_timeout={finish_timeout}s"
                ),
            )
            if flight.task is not None and not flight.task.done():
                flight.task.cancel()
                tasks.append(flight.task)
            else:
                self._finish(flight)
        self._waiting.clear()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=max(finish_timeout, 0.1))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("a cancelled computation failed", exc_info=task.exception())
        if pending:
            logger.warning(
                "%d computation(s) ignored cancellation at shutdown and are still running",
                len(pending),
            )
