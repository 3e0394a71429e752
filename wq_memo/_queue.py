"""WorkerQueue: the public face of an Engine (_engine), which accepts items, deduplicates them,
bounds their computations and shuts down; here, the checks of what a user passes in."""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Generic, TypeVar, final

from . import _queue_registry as _registry
from ._engine import Engine, shutting_down
from ._lookups import NotAsync
from ._store import Store

__all__ = ("WorkerQueue", "facade", "is_async_callable")

T = TypeVar("T", bound=Hashable)
R = TypeVar("R")

_SYNC_CALLABLES = (
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
)


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

    __slots__ = ("__weakref__", "_engine")

    _engine: Engine[T, R]

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
        _front(
            self,
            Engine(
                worker,
                maxsize,
                finish_timeout,
                miss=None,
                lookup=cache_get,
                store=Store("WorkerQueue", write=cache_set),
            ),
        )

    def __repr__(self) -> str:
        engine = self._engine
        return (
            f"<WorkerQueue worker={engine.func!r} maxsize={engine.maxsize} "
            f"running={self.running} in_flight={engine.live}>"
        )

    @property
    def maxsize(self) -> int:
        """How many computations run at once, at most (and how many more may wait in line)."""
        return self._engine.maxsize

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        self._engine.maxsize = value

    @property
    def finish_timeout(self) -> float:
        """How many seconds aclose() gives accepted items to finish."""
        return self._engine.finish_timeout

    @finish_timeout.setter
    def finish_timeout(self, value: float) -> None:
        self._engine.finish_timeout = value

    @property
    def computing(self) -> int:
        """How many computations run now (on the current event loop)."""
        table = self._engine.table
        return 0 if table is None else table.computing()

    @property
    def waiting(self) -> int:
        """How many items wait in line for a slot (their callers wait for room or a slot).

        Metrics collection may read it from another thread: the lines are copied first, in one
        step, since the loop may change them meanwhile.
        """
        table = self._engine.table
        return 0 if table is None else table.waiting()

    @property
    def running(self) -> bool:
        """Whether the queue is started and accepting work (False from the start of aclose)."""
        table = self._engine.table
        return table is not None and not table.closing

    # -- requiring ------------------------------------------------------------------------------

    async def require(self, item: T) -> R:
        """Return item's result: from the cache, from a computation under way, or computed now.

        Raises what the worker raised (the same exception to every caller of the item),
        QueueShutDown if the queue is closing, ShutdownTimeout if the queue closed before the
        item finished, RecursionError if a computation requires its own item. Waits for room
        when ``maxsize`` items run and ``maxsize`` more wait.
        """
        engine = self._engine
        table = engine.table
        if table is not None and table.closing:
            raise shutting_down()
        return await engine.require(item, (item,))

    # -- what the registry of started queues asks ------------------------------------------------

    def _started(self) -> bool:
        """Whether the queue has been started and not yet fully closed (it may be closing)."""
        return self._engine.started()

    def _bound_elsewhere(self) -> bool:
        """Whether the queue's computations belong to another event loop that is still running."""
        return self._engine.bound_elsewhere()

    def _bound_here(self) -> bool:
        """Whether the queue is started on the running event loop."""
        return self._engine.bound_here()

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
        await self._engine.aclose()

    async def _aclose_at_once(self) -> None:
        """aclose() without the grace (see ``Engine.aclose_at_once``): the pytest plugin's
        isolation ends a test with it."""
        await self._engine.aclose_at_once()

    @classmethod
    async def aclose_all(cls) -> None:
        """Close every running queue, hidden ones behind @worker_queue included."""
        await _registry.aclose_all()

    async def __aenter__(self) -> WorkerQueue[T, R]:
        table = self._engine.table_now()
        if table.closing:
            raise shutting_down()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def facade(engine: Engine[T, R]) -> WorkerQueue[T, R]:
    """The WorkerQueue in front of engine (the hidden queue of a memoized function)."""
    queue: WorkerQueue[T, R] = WorkerQueue.__new__(WorkerQueue)
    _front(queue, engine)
    return queue


def _front(queue: WorkerQueue[T, R], engine: Engine[T, R]) -> None:
    """Put queue in front of engine: the one way a WorkerQueue is made."""
    queue._engine = engine
    # Weakly: a queue its owner drops is garbage-collected, started or not.
    engine.serve(weakref.ref(queue))
