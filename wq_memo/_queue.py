"""WorkerQueue: accepting items, deduplicating them, bounding their computations, shutting down."""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Generic, TypeVar, final

from . import _queue_registry as _registry
from ._counts import Counts, count_hit
from ._errors import QueueShutDown
from ._flight import _NO_KWARGS, Flight, FlightTable
from ._lookups import NotAsync, look_up
from ._state import FINISHED
from ._store import Store, stores_done

__all__ = ("WorkerQueue",)

T = TypeVar("T", bound=Hashable)
R = TypeVar("R")

logger = logging.getLogger("wq_memo")

_SYNC_CALLABLES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
)


def _shutting_down() -> QueueShutDown:
    return QueueShutDown("the queue is shutting down; require() again once aclose() ends")


def is_async_callable(fn: object) -> bool:
    """Whether calling fn surely returns a coroutine (async def, or an object whose __call__ is)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _async_only(name: str, fn: Any) -> Any:
    """fn itself if it is async; refuse what surely is not; check the others at each call."""
    if not callable(fn) or isinstance(fn, (*_SYNC_CALLABLES, type)):
        raise TypeError(
            f"WorkerQueue: {name} must be an async function (async def), got {fn!r}; "
            "wrap a synchronous one in an async def"
        )
    if is_async_callable(fn):
        return fn

    def checked(*args: Any) -> Awaitable[Any]:
        result = fn(*args)
        if not inspect.isawaitable(result):
            raise NotAsync(
                f"WorkerQueue: {name} {fn!r} returned {type(result).__name__}, not an "
                f"awaitable; {name} must be an async function (async def)"
            )
        return result

    return checked


@final
class WorkerQueue(Generic[T, R]):
    """An asynchronous, cache-aware worker queue.

    ``await queue.require(item)`` returns ``await cache_get(item)`` when that is not None.
    Otherwise, if the same item is already being computed, the caller joins that computation;
    if not, the item is computed with ``await worker(item)``, stored with ``cache_set`` and
    returned. At most ``maxsize`` computations run at once and at most ``maxsize`` more wait
    in line; callers of further items wait for room. Items start in the order they were
    asked for, each in a copy of the context of the caller that asked first.

    Cancellation: cancelling a caller never cancels the computation or its other callers; a
    result nobody is left to receive is still cached.

    Shutdown: ``aclose()`` refuses new requires with QueueShutDown at once, gives accepted items
    ``finish_timeout`` seconds, then fails what is left with ShutdownTimeout. The next require
    after that starts the queue again.

    The queue binds to the event loop of its first require and rebinds, keeping its cache, when
    used from a later loop (a second ``asyncio.run()``). It is not thread-safe: use it from one
    loop at a time.
    """

    __slots__ = (
        "__weakref__",
        "_closing",
        "_counts",
        "_lookup",
        "_miss",
        "_on_hit",
        "_ops",
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
        worker = _async_only("worker", worker)
        cache_get = _async_only("cache_get", cache_get)
        cache_set = _async_only("cache_set", cache_set)
        store: Store[T, R] = Store("WorkerQueue", write=cache_set)
        self._setup(worker, maxsize, finish_timeout, miss=None, lookup=cache_get, store=store)

    def _setup(
        self,
        worker: Any,
        maxsize: int,
        finish_timeout: float,
        *,
        miss: object,
        lookup: Callable[[T], Awaitable[Any]] | None = None,
        **ops: Any,
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
        self._worker = worker
        self._lookup = lookup
        self._miss = miss
        self._ops = dict(ops, miss=miss, lookup=lookup)
        self.maxsize = maxsize
        self.finish_timeout = float(finish_timeout)
        self._table: FlightTable[T, R] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._counts = Counts()
        self._on_hit: Callable[[T, tuple[Any, ...], dict[str, Any]], None] | None = None
        """Told of each hit of _require (the decorator's refresh-ahead)."""

    @classmethod
    def _internal(
        cls, func: Any, maxsize: int, finish_timeout: float, **ops: Any
    ) -> WorkerQueue[T, R]:
        """A queue for @worker_queue: func(*args, **kwargs) computes; cache operations and the
        rest as FlightTable takes them."""
        queue: WorkerQueue[T, R] = cls.__new__(cls)
        queue._setup(func, maxsize, finish_timeout, **ops)
        return queue

    def __repr__(self) -> str:
        table = self._table
        inflight = table.live if table is not None else 0
        return (
            f"<WorkerQueue worker={self._worker!r} maxsize={self.maxsize} "
            f"running={self.running} in_flight={inflight}>"
        )

    @property
    def computing(self) -> int:
        """How many computations run now (on the current event loop)."""
        table = self._table
        return 0 if table is None else table.computing()

    @property
    def waiting(self) -> int:
        """How many items wait in line for a slot (their callers wait for room or a slot).

        Metrics collection may read it from another thread: the lines are copied first, in one
        step, since the loop may change them meanwhile.
        """
        table = self._table
        return 0 if table is None else table.waiting()

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
        item finished, RecursionError if a computation requires its own item. Waits for room
        when ``maxsize`` items run and ``maxsize`` more wait.
        """
        table = self._table
        if table is not None and table.closing:
            raise _shutting_down()
        return await self._require(item, (item,))

    async def _require(
        self, key: T, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
    ) -> R:
        """Look key up (sharing a lookup under way), then join or start its computation.

        Hits are served while the queue closes; a miss then raises QueueShutDown. While a
        refresh of key is under way, the entry it replaces is served (looked up once).
        """
        looked = False
        # One table for the whole call: a call that starts over once the queue has closed (the
        # lookup it shared ended without an answer) is refused, as the caller it shared with
        # was; it does not start the queue again after aclose() has returned.
        table = self._table_now()
        while True:
            flight = table.flights.get(key)
            if flight is not None:
                if table.closing:
                    raise _shutting_down()
                if flight.refresh and not looked:
                    looked = True
                    value = await look_up(self._lookup, key, self._miss)
                    if value is not self._miss:
                        # A refresh of key is under way already: no need to start one.
                        count_hit(self._counts)
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
                    count_hit(self._counts)
                    if self._on_hit is not None:
                        self._on_hit(key, args, kwargs or _NO_KWARGS)
                    return what  # type: ignore[no-any-return]
                if what.state is not FINISHED or what.outcome is not None:
                    return await table.join(what)
                # Its computation ended with nobody to tell (every caller left): start over.
            # Otherwise that caller left without an answer (cancelled, refused): start over.

    async def _look_up_then_call(
        self,
        table: FlightTable[T, R],
        key: T,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None,
    ) -> R:
        lookup = table.lookups.begin(key)
        try:
            value = await look_up(self._lookup, key, self._miss)
            if value is not self._miss:
                count_hit(self._counts)
                table.answer(key, lookup, (True, value))
                if self._on_hit is not None:
                    self._on_hit(key, args, kwargs or _NO_KWARGS)
                return value  # type: ignore[no-any-return]
            # aclose() may have run while we looked: table.call refuses then, so that the
            # queue does not start again.
            return await table.call(key, args, kwargs or _NO_KWARGS, lookup)
        finally:
            table.answer(key, lookup, None)  # if not answered yet: those sharing start over

    def _call(self, key: T, args: tuple[Any, ...], kwargs: dict[str, Any]) -> asyncio.Future[R]:
        """Join or start key's computation, for a caller that found no cached value."""
        table = self._table
        if table is None or table.loop is not asyncio.get_running_loop():
            table = self._bind()
        return table.call(key, args, kwargs)

    def _table_now(self) -> FlightTable[T, R]:
        table = self._table
        if table is None or table.loop is not asyncio.get_running_loop():
            table = self._bind()
        return table

    # -- invalidation ---------------------------------------------------------------------------

    def _forget(self, key: T) -> list[Flight[T, R]]:
        """Make later calls of key start afresh; the computations under way will store nothing.
        Returns the forgotten computations of key still running (see _stores_done)."""
        table = self._table
        return [] if table is None else table.forget(key)

    def _forget_all(self) -> list[Flight[T, R]]:
        table = self._table
        return [] if table is None else table.forget_all()

    def _forget_lookups(self, key: T | None = None) -> None:
        """After an invalidation's last await: newcomers no longer share a lookup that began
        during it."""
        table = self._table
        if table is not None:
            table.forget_lookups(key)

    async def _stores_done(self, flights: list[Flight[T, R]]) -> None:
        """Wait until the stores already on their way of these forgotten computations end."""
        await stores_done(flights)

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
            # The old loop has stopped: its computations finish only if it runs again, and
            # must not store then what may be stale. Forget them; the cache is kept.
            logger.debug("WorkerQueue moving to a new event loop; %d item(s) left behind", old.live)
            old.abandon()
            self._closing = None
        elif old is not None:
            return old
        table: FlightTable[T, R] = FlightTable(
            loop, self._worker, self.maxsize, self._counts, **self._ops
        )
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
        ``finish_timeout`` seconds to finish; their callers get their results as usual. Items
        still unfinished then are cancelled and their callers get ShutdownTimeout at once; the
        cancelled computations get up to ``finish_timeout`` more seconds to end, so aclose()
        returns within ``2 * finish_timeout`` seconds. Returns None and never re-raises errors
        already delivered to callers. Idempotent, safe to call concurrently, a no-op on a queue
        never started. Cancelling the caller of aclose() does not stop the shutdown.
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
            # Its loop has stopped: nothing there finishes unless it runs again, and what
            # finishes then stores nothing.
            table.abandon()
            self._table = None
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
                    table.live,
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
        table = self._table_now()
        if table.closing:
            raise _shutting_down()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
