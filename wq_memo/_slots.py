"""Slots: at most ``maxsize`` things run at once; the others wait in line, first come first served.

Design notes
------------
One small primitive, so that every bound in the library is fair the same way (admission to the
in-flight table, and the lanes that bound a RedisCache's commands). It keeps three lines, served
in order:

- ``line``: items (not tasks) waiting for a slot. A freed slot goes to the first of them through
  the ``admit(item, spare)`` callback the owner gives, which starts it (and takes the slot with
  ``take()``) or drops it (nobody wants it any more: the slot goes to the next one).
- waiters: tasks suspended in ``acquire()``, each on a future of its own. A freed slot is handed
  to the first of them directly (the count stays taken): the woken task never races a newcomer
  for it. A waiter cancelled after it was handed a slot passes the slot on; one cancelled before
  is skipped when its turn comes (a cancelled future costs nothing to leave in the line, and
  removing it from the middle of a deque would cost a scan). Urgent waiters
  (``acquire(urgent=True)``, the Redis writes that end a computation) go ahead of the others,
  first come first served among themselves: they wait at the front of the same line, and a
  count says how many, so that a line without them costs nothing more.
- ``refresh_line``: low-priority items that only ever take a *spare* slot: one free while no
  item and no waiter waits. Spare slots are counted in ``spare`` as well as ``running``, and
  the room for the other two lines is ``running - spare < maxsize``: so low-priority work never
  holds a slot someone could use, and never runs beyond ``maxsize`` on its own.

Nobody waits for room to be noticed: the owner of a slot ``release()``s it, and the release
hands it out at once. Handing out is not re-entered: an item admitted whose work ends within the
admission (an eager task) releases into the loop already running, which then goes on.

Everything runs on one event loop's thread; nothing here is thread-safe except reading the
counters and copying the lines (``snapshot()``), which metrics collection does from elsewhere.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ("Slots",)

T = TypeVar("T")


class Slots(Generic[T]):
    """``maxsize`` slots, lines of items and of tasks waiting for one, a line of low-priority
    items that take only spare slots.

    ``admit(item, spare)`` is called for an item whose turn has come; it must ``take()`` the
    slot if it runs the item. Nothing is admitted once ``loop`` (if given) has closed: nothing
    could start on it.

    ``running``, ``spare`` and ``maxsize`` may be read freely; change them only through the
    methods.
    """

    __slots__ = (
        "_admit",
        "_handing",
        "_loop",
        "_urgent",
        "_waiters",
        "line",
        "maxsize",
        "refresh_line",
        "running",
        "spare",
    )

    def __init__(
        self,
        maxsize: int,
        admit: Callable[[T, bool], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.maxsize = maxsize
        self.running = 0
        """Slots taken, spare ones included."""
        self.spare = 0
        """Spare slots taken (low-priority items, which the other lines do not count)."""
        self.line: deque[T] = deque()
        """Items waiting for a slot (read it; change it through the methods)."""
        self.refresh_line: deque[T] = deque()
        """Low-priority items waiting for a spare slot (read it; change it through the methods)."""
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._urgent = 0
        """How many of the first waiters are urgent ones."""
        self._admit = admit
        self._loop = loop
        self._handing = False

    def __repr__(self) -> str:
        return (
            f"<Slots {self.running}/{self.maxsize} spare={self.spare} line={len(self.line)} "
            f"refreshes={len(self.refresh_line)} waiters={len(self._waiters)}>"
        )

    # -- questions ------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether an item may take a slot now, ahead of nobody."""
        return self.running - self.spare < self.maxsize and not self.line

    def spare_free(self) -> bool:
        """Whether a low-priority item may take a spare slot now: one is free, nobody waits."""
        return self.running < self.maxsize and not self.line and not self._waiters

    def waiting_tasks(self) -> int:
        """How many tasks wait in ``acquire()`` (those cancelled meanwhile left out)."""
        return sum(not w.done() for w in tuple(self._waiters))

    def snapshot(self) -> tuple[tuple[T, ...], tuple[T, ...], int]:
        """Copies of the line and the low-priority line, and the tasks waiting, read in one
        step: safe from another thread while the loop changes them."""
        line, refreshes, waiters = tuple(self.line), tuple(self.refresh_line), tuple(self._waiters)
        return line, refreshes, sum(not w.done() for w in waiters)

    # -- lines ----------------------------------------------------------------------------------

    def enqueue(self, item: T, low: bool = False) -> None:
        """Put item at the end of the line (``low``: of the low-priority line)."""
        (self.refresh_line if low else self.line).append(item)

    def remove(self, item: T) -> None:
        """Take item out of whichever line holds it (it is started or ended elsewhere)."""
        if item in self.refresh_line:
            self.refresh_line.remove(item)
        else:
            self.line.remove(item)

    def promote(self, item: T) -> None:
        """Move a low-priority item to the end of the line: someone now waits for it."""
        self.refresh_line.remove(item)
        self.line.append(item)

    # -- slots ----------------------------------------------------------------------------------

    def take(self, count: int = 1, spare: bool = False) -> None:
        """Take ``count`` slots now, room or not (the caller has checked, or goes over the bound
        on purpose until they are released)."""
        self.running += count
        if spare:
            self.spare += count

    def unspare(self) -> None:
        """A spare slot taken becomes an ordinary one (its holder now serves a caller)."""
        self.spare -= 1

    def release(self) -> None:
        """Give back an ordinary slot: it goes to the first item in line (or the first task
        waiting), else, with nobody waiting, to the first low-priority item, as a spare slot."""
        self.running -= 1
        if self._handing or not (self.line or self._waiters or self.refresh_line):
            return  # nobody waits, or the loop below fills it (an eager task ended in it)
        if self._loop is not None and self._loop.is_closed():
            return  # destroyed with its loop: nothing can start now
        self._handing = True
        try:
            line = self.line
            waiters = self._waiters
            while True:
                if self.running - self.spare < self.maxsize and (line or waiters):
                    if line:
                        self._admit(line.popleft(), False)
                    else:
                        waiter = waiters.popleft()
                        if self._urgent:
                            self._urgent -= 1
                        if not waiter.done():
                            self.running += 1
                            waiter.set_result(True)
                elif self.refresh_line and self.spare_free():
                    self._admit(self.refresh_line.popleft(), True)
                else:
                    break
        finally:
            self._handing = False

    async def acquire(
        self,
        on_wait: Callable[[asyncio.Future[bool] | None], None] | None = None,
        urgent: bool = False,
    ) -> bool:
        """Wait for a slot: True once taken, and the caller must ``release()`` it after.

        An ``urgent`` task waits ahead of the others waiting here (not of the items in line).

        A task waiting may be told False instead (``lend()``): it is to go on without a slot of
        its own. ``on_wait(future)`` is told of the wait's future when it starts, and of None
        when it ends. Cancelled while waiting, it leaves the line; cancelled just after it was
        handed a slot, it passes the slot on.
        """
        if self.running - self.spare < self.maxsize and (
            not self._waiters or (urgent and not self._urgent)
        ):
            self.running += 1
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if urgent:
            self._waiters.insert(self._urgent, waiter)
            self._urgent += 1
        else:
            self._waiters.append(waiter)
        if on_wait is not None:
            on_wait(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()  # handed the slot, then cancelled: pass it on
            else:
                waiter.cancel()  # skipped when its turn comes
            raise
        finally:
            if on_wait is not None:
                on_wait(None)

    @staticmethod
    def lend(waiter: asyncio.Future[bool]) -> bool:
        """End a wait in ``acquire()`` with False (its task goes on in a slot lent to it);
        False if that wait has ended already."""
        if waiter.done():
            return False
        waiter.set_result(False)
        return True

    def pop_last(self) -> T:
        """Take the last item out of the line (refused by a close: it was not accepted)."""
        return self.line.pop()

    def clear_line(self, low: bool = False) -> list[T]:
        """Empty the line (``low``: the low-priority line); return what it held, in order."""
        line = self.refresh_line if low else self.line
        items = list(line)
        line.clear()
        return items
