"""WorkerQueue: accepting items, deduplicating them, bounding their computations, shutting down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Generic, TypeVar, final

from . import _registry
from ._errors import QueueShutDown
from ._flight import Flight, FlightTable, Lookup

__all__ = ("WorkerQueue",)

T = TypeVar("T", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")


def _shutting_down() -> QueueShutDown:
    return QueueShutDown("the queue is shutting down; require() again once aclose() ends")


@final
class WorkerQueue(Generic[T, R]):
    """An asynchronous, cache-aware worker queue.

    ``await queue.require(item)`` returns ``await cache_get(item)`` when that is not None.
    Otherwise, if the same item is already being computed, the caller joins that computation;
    if not, the item is computed with ``await worker(item)``, stored with ``cache_set`` and
    returned. At most ``maxsize`` computations run at once and at most ``maxsize`` more wait
    for a slot; a caller that finds both full waits for room.

    Cancellation: cancelling a caller never cancels the computation or its other callers; a
    result nobody is left to receive is still cached.

    Shutdown: ``aclose()`` refuses new requires with QueueShutDown at once, gives accepted items
    ``finish_timeout`` seconds in total, then fails what is left with ShutdownTimeout. The next
    require after that starts the queue again.

    The queue binds to the event loop of its first require and rebinds, keeping its cache, when
    used from a later loop (a second ``asyncio.run()``). It is not thread-safe: use it from one
    loop at a time.
    """

    __slots__ = (
        "__weakref__",
        "_cache_get",
        "_cache_set",
        "_closing",
        "_hits",
        "_joined",
        "_miss",
        "_misses",
        "_table",
        "_worker",
        "finish_timeout",
        "maxsize",
    )

    def __init__(
        self,
        worker: Callable[[T], Awaitable[R]],
        cache_get: Callable[[T], Awaitable[R | None]],
        cache_set: Callable[[T, R], Awaitable[None]],
        maxsize: int = 3,
        finish_timeout: float = 3.0,
    ) -> None:
        for name, fn in (("worker", worker), ("cache_get", cache_get), ("cache_set", cache_set)):
            if not callable(fn):
                raise TypeError(f"WorkerQueue: {name} must be an async callable, got {fn!r}")
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
        self._worker = worker
        self._cache_get: Callable[[T], Awaitable[Any]] = cache_get
        self._cache_set = cache_set
        # What cache_get returns for a miss. None for the public API; the decorator uses a
        # sentinel of its own so that None can be a cached value.
        self._miss: object = None
        self.maxsize = maxsize
        self.finish_timeout = float(finish_timeout)
        self._table: FlightTable[T, R] | None = None
        self._closing: asyncio.Task[None] | None = None
        # Calls answered by cache_get, calls that started a computation, calls that joined one.
        self._hits = 0
        self._misses = 0
        self._joined = 0

    def __repr__(self) -> str:
        table = self._table
        inflight = len(table.flights) if table is not None else 0
        return (
            f"<WorkerQueue worker={self._worker!r} maxsize={self.maxsize} "
            f"running={self.running} in_flight={inflight}>"
        )

    @property
    def running(self) -> bool:
        """Whether the queue is started and accepting work (False from the start of aclose)."""
        table = self._table
        return table is not None and not table.closing

    # -- requiring ------------------------------------------------------------------------------

    async def require(self, item: T) -> R:
        """Return item's result: from the cache, from a computation under way, or computed now.

        Raises what the worker raised (the same exception to every caller of the item),
        QueueShutDown if the queue is closing, ShutdownTimeout if the queue closed before the
        item finished. Waits for room when ``maxsize`` items run and ``maxsize`` more wait.
        """
        while True:
            table = self._table_for_call()
            flight = table.flights.get(item)
            if flight is not None:
                self._joined += 1
                return await table.join(flight)
            lookup = table.lookups.get(item)
            if lookup is None:
                return await self._look_up_then_compute(table, item)
            # Another caller is looking item up: no computation of it can start meanwhile.
            # Share what that caller finds, so as never to compute what it finds stored.
            if lookup.answer is None:
                lookup.answer = table.loop.create_future()
            answer = await asyncio.shield(lookup.answer)
            if answer is not None:
                found, what = answer
                if found:
                    self._hits += 1
                    return what  # type: ignore[no-any-return]
                self._joined += 1
                return await table.join(what)
            # That caller left without an answer (cancelled, refused): start over.

    async def _look_up_then_compute(self, table: FlightTable[T, R], item: T) -> R:
        lookup = table.lookups[item] = Lookup()
        try:
            value = await self._lookup(item)
            if value is not self._miss:
                self._hits += 1
                table.answer(item, lookup, (True, value))
                return value  # type: ignore[no-any-return]
            if table.closing:  # aclose() ran while we looked: don't start the queue again
                raise _shutting_down()
            return await self._compute(item, lookup)
        finally:
            table.answer(item, lookup, None)  # if not answered yet: those sharing start over

    async def _compute(self, item: T, lookup: Lookup | None = None) -> R:
        """Join item's computation or start one; the caller already found no cached value.

        ``lookup``: the caller's lookup of item, which others share; they are told of the
        computation this caller joins or starts, or of the value it finds after all.
        """
        table = self._table_for_call()
        flight: Flight[T, R] | None
        woken = False
        while True:
            flight = table.flights.get(item)
            if flight is not None:
                self._joined += 1
                break
            if table.closing:
                raise _shutting_down()
            flight = table.admit(item)
            if flight is not None:
                self._misses += 1
                if lookup is not None:
                    table.answer(item, lookup, (False, flight))
                return await table.join(flight, counted=True)
            await table.wait_for_room(again=woken)
            woken = True
            if table.closing:
                raise _shutting_down()
            # While we waited, the item may have been computed and cached.
            try:
                value = await self._lookup(item)
            except BaseException:
                table.pass_room()  # cancelled while holding a wake-up: hand it on
                raise
            if value is not self._miss:
                self._hits += 1
                table.pass_room()
                if lookup is not None:
                    table.answer(item, lookup, (True, value))
                return value  # type: ignore[no-any-return]
        if woken:
            table.pass_room()
        if lookup is not None:
            table.answer(item, lookup, (False, flight))
        return await table.join(flight)

    async def _lookup(self, item: T) -> Any:
        try:
            return await self._cache_get(item)
        except Exception:
            logger.exception("cache_get failed for %r; treating it as a miss", item)
            return self._miss

    def _table_for_call(self) -> FlightTable[T, R]:
        table = self._table
        if table is None or table.loop is not asyncio.get_running_loop():
            table = self._bind()
        if table.closing:
            raise _shutting_down()
        return table

    # -- the event loop -------------------------------------------------------------------------

    def _bind(self) -> FlightTable[T, R]:
        """Start the queue on the running loop, leaving behind a loop that has stopped."""
        loop = asyncio.get_running_loop()
        old = self._table
        if old is not None and old.loop is not loop:
            if old.loop.is_running():
                raise RuntimeError(
                    "WorkerQueue is in use on another running event loop; "
                    "create one queue per event loop"
                )
            # The old loop has stopped: its computations can never finish. Forget them; the
            # cache is kept.
            logger.debug(
                "WorkerQueue moving to a new event loop; %d item(s) left behind", len(old.flights)
            )
            self._closing = None
        elif old is not None:
            return old
        table: FlightTable[T, R] = FlightTable(loop, self._worker, self._cache_set, self.maxsize)
        self._table = table
        _registry.register(self)
        return table

    def _started(self) -> bool:
        """Whether the queue has been started and not yet fully closed (it may be closing)."""
        return self._table is not None

    def _bound_elsewhere(self) -> bool:
        """Whether the queue's computations belong to another event loop that is still running."""
        table = self._table
        if table is None:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return table.loop is not loop and table.loop.is_running()

    # -- shutting down --------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Shut the queue down gracefully; a later require starts it again.

        New requires raise QueueShutDown from the first moment. Accepted items get
        ``finish_timeout`` seconds in total; their callers get their results as usual. Items
        still unfinished then are cancelled and their callers get ShutdownTimeout. Returns None
        and never re-raises errors already delivered to callers. Idempotent, safe to call
        concurrently, a no-op on a queue never started. Cancelling the caller of aclose() does
        not stop the shutdown.
        """
        table = self._table
        if table is None:
            return
        loop = asyncio.get_running_loop()
        if table.loop is not loop:
            if table.loop.is_running():
                raise RuntimeError(
                    "WorkerQueue.aclose() called from another event loop than the one it runs on"
                )
            self._table = None  # its loop has stopped: nothing there can finish
            self._closing = None
            _registry.unregister(self)
            return
        closing = self._closing
        if closing is None:
            table.close()  # now, not when the shutdown task first runs
            closing = loop.create_task(self._shutdown(table))
            if self._table is table:  # else an eager task factory has run the shutdown already
                self._closing = closing
        await asyncio.shield(closing)

    async def _shutdown(self, table: FlightTable[T, R]) -> None:
        try:
            try:
                async with asyncio.timeout(self.finish_timeout):
                    await table.wait_drained()
            except TimeoutError:
                logger.warning(
                    "aclose(): %d item(s) unfinished after finish_timeout=%ss; cancelling them",
                    len(table.flights),
                    self.finish_timeout,
                )
                await table.abort(self.finish_timeout)
        finally:
            if self._table is table:
                self._table = None
                self._closing = None
                _registry.unregister(self)

    @classmethod
    async def aclose_all(cls) -> None:
        """Close every running queue, hidden ones behind @worker_queue included."""
        await _registry.aclose_all()

    async def __aenter__(self) -> WorkerQueue[T, R]:
        self._table_for_call()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
