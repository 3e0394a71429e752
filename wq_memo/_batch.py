"""worker_queue.batch(): load many keys in one call of the batch function, cached per key.

Each key is an item of the hidden queue's flight table, as a call of a memoized function is:
single flight per key, its callers' counts, invalidation that wins (a forgotten item stores
nothing), the one store of values (_store), shutdown. The table is ``slotless``: an item starts
at once, and its computation (``_Batcher.compute``) puts its key in the batch being gathered
and waits for that batch's answer for it. The bound is on batches, not keys: at most
``maxsize`` batches run at once, in a ``Slots`` of their own, started in the order they were
closed (the order of their first keys).

A batch is gathered, in line, running, then done:

- gathered: open to keys until the end of the loop's turn (``max_wait=0``), or ``max_wait``
  seconds, or until it holds ``max_batch`` keys; then closed, it starts or waits in line.
- in line: keys may still leave it (their items cancelled by a shutdown).
- running: the keys whose items nobody waits for any more are left out as it starts (those
  items are forgotten: a later call starts afresh); the others are sent, each once, in a copy
  of the context of the caller whose key opened it. Its answer is split among its keys.

A running batch is a node (``_Node``) of the graph of which computation awaits which
(_nesting): its keys' items await it, and it is the parent of the calls its function makes. So
a batch function may call itself, or a memoized function that calls it (a key's value needs
other keys): a batch that a running batch awaits runs in that one's slot (``lent``), as a nested
call does, a memoized computation awaiting a batch lends its slot to that batch's calls of it,
and a call that would await itself, through any of them, raises RecursionError.

Across processes (a RedisCache, whose ``batch_flight()`` this drives): a running batch first
claims its keys in one round trip (``_claim``): the keys found are answered; the keys another
process holds are handed back to their items (``_Elsewhere``), which wait for them there and
either get that process's value or, once it gives the key up, put it in a later batch with its
lock already taken; the others are sent. Their leases are renewed while the batch runs, and its
answer is stored in one round trip, each key fenced by its own token (a key invalidated, primed
or cleared meanwhile, here or elsewhere, stores nothing). If Redis fails, the keys are computed
here and stored nowhere.

Refresh-ahead: a key found due is refreshed by a background item of the table, which joins the
batch being gathered like any key. A batch of such items only, that no caller has joined, is
low-priority: it takes only a spare slot (``Slots.refresh_line``), so that no caller's batch
waits behind it; a caller who joins one of its keys while it waits promotes it.

The result policy (cache_if, ttl, cache_errors, stale_if_error) applies per key, with nothing
of its own here: each key's item ends as any item of the table does, its value stored through
``Store.now`` and its failure (its exception value, its KeyError when missing, or the batch
function's exception) kept through ``Store.failed_now``, so that a forgotten key keeps nothing.
The hit path reads the dated entries (``_fresh``): a remembered error is raised anew. With
refresh_after too, each key is due by its own lifetime (``Refresher.stored``, told by the store),
only a fresh value is refreshed ahead (never a remembered error), a refresh's result goes
through the policy per key (refused: the entry stays; failing: the fresh value stays, nothing
remembered over it), and a stale value served is not refreshed ahead before the back-off.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Hashable,
    Iterable,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    NamedTuple,
    Protocol,
    TypeVar,
    final,
    overload,
)

from . import _listeners, _memo_registry, _naming
from ._controls import AsyncCacheKind, CacheKind, MappingKind, NoCacheKind
from ._counts import Counts, count_hit
from ._engine import Engine
from ._flight import Flight, FlightTable
from ._nesting import awaits, current, reaches
from ._policy import CachedError, Kept, Policy
from ._queue import WorkerQueue, facade, is_async_callable
from ._refresh import NEVER, Refresher
from ._slots import Slots
from ._state import FINISHED, RUNNING
from ._store import Store
from ._switch import SWITCH
from ._ttl_lookup import fast_lookup
from .backends._protocol import MISSING, AsyncCache, BatchFlightCache, CallKey, Missing

if TYPE_CHECKING:
    from .backends._redis_batch import BatchFlight, Claim, Waiting

__all__ = (
    "BatchDecorator",
    "BatchInfo",
    "BatchOptions",
    "Batched",
    "batch_decorator",
    "batches_now",
    "check",
    "holdings_now",
)

K = TypeVar("K", bound=Hashable)
K_contra = TypeVar("K_contra", bound=Hashable, contravariant=True)
V = TypeVar("V")

logger = logging.getLogger("wq_memo")

_LEFT_OUT: Final[Any] = object()
"""What the computation of a key left out of its batch returns: nobody receives it, and its
item, forgotten, stores nothing."""


class _Elsewhere(NamedTuple):
    """What a key's computation is told when another process holds the key (RedisCache): wait
    for it there, then take its value, or go in a later batch."""

    waiting: Waiting


class _Forgotten(Exception):
    """The outcome a forgotten key's holding ends with: nothing is stored (its callers get
    the batch's value all the same)."""


class BatchInfo(NamedTuple):
    """What a batch function's cache_info() reports: CacheInfo's counts, per key, and the
    calls of the batch function."""

    hits: int
    """Keys answered by the cache."""
    misses: int
    """Keys that started a load (sent in a batch, unless left out)."""
    joined: int
    """Keys that joined a load already under way."""
    maxsize: int | None
    """The cache's maxsize (None: unbounded, or no cache)."""
    currsize: int | None
    """The cache's current size."""
    refreshes: int = 0
    """Keys refreshed in the background (refresh_after)."""
    refresh_failures: int = 0
    """Background refreshes that failed."""
    bypassed: int = 0
    """Keys loaded directly, caching switched off (wq_memo.disabled())."""
    uncached: int = 0
    """Keys whose value was returned but not stored (``cache_if`` false, or no ``ttl``)."""
    stale: int = 0
    """Keys whose load failed and whose callers got the expired value (``stale_if_error``)."""
    batches: int = 0
    """Calls of the batch function."""


class Batched(Protocol[K_contra, V]):
    """What @worker_queue.batch returns: ``await f(key)`` for one key, ``await f.many(keys)``
    for many, each answered from the cache or loaded in batches; the controls of a memoized
    function, per key."""

    __name__: str
    __qualname__: str

    def __call__(self, key: K_contra, /) -> Coroutine[Any, Any, V]: ...

    async def many(self, keys: Iterable[K_contra], /) -> list[V]:
        """The values of keys, in their order (duplicates allowed); raises the failure of the
        first key, in that order, that failed."""
        ...

    @property
    def queue(self) -> WorkerQueue[Any, Any]:
        """The hidden WorkerQueue whose items are the keys being loaded (its maxsize,
        ``maxsize * max_batch``, bounds the keys refreshed in the background at once)."""
        ...

    @property
    def cache(self) -> MutableMapping[Any, Any] | AsyncCache | None:
        """The cache given to the decorator (None: deduplication and batching only)."""
        ...

    def cache_info(self) -> BatchInfo:
        """Hits, misses and joins per key, batches run, and the cache's size."""
        ...

    def cache_clear(self) -> None:
        """Empty the cache and set cache_info()'s counts back to zero."""
        ...

    async def acache_clear(self) -> None:
        """The same as cache_clear()."""
        ...

    def cache_invalidate(self, key: K_contra, /) -> bool:
        """Remove key's entry; a batch under way does not store key's value."""
        ...

    async def acache_invalidate(self, key: K_contra, /) -> bool:
        """The same as cache_invalidate()."""
        ...

    def cache_prime(self, value: V, key: K_contra, /) -> None:
        """Store value as key's; a batch under way does not overwrite it."""
        ...

    async def acache_prime(self, value: V, key: K_contra, /) -> None:
        """The same as cache_prime()."""
        ...

    def cache_peek(self, key: K_contra, /) -> V | Missing | CachedError:
        """key's cached value, MISSING, or a CachedError for a remembered exception
        (``cache_errors``): nothing loaded, nothing counted."""
        ...

    async def acache_peek(self, key: K_contra, /) -> V | Missing | CachedError:
        """The same as cache_peek()."""
        ...

    async def refresh(self, key: K_contra, /) -> V:
        """Load key anew in a batch (joining a load of it under way), store it, return it."""
        ...


class _Entry:
    """One key of a batch: the key the batch function is given, and each item waiting for its
    value (more than one only if the key was invalidated while the batch was gathered), each
    with the future its computation awaits. With a RedisCache, its Redis ``names`` and its
    ``claim`` (None: to be claimed as the batch starts; a Holding: its lock is this process's;
    Alone: computed here, stored nowhere)."""

    __slots__ = ("claim", "key", "names", "waiting")

    def __init__(self, key: Any, names: Any = None, claim: Claim | None = None) -> None:
        self.key = key
        self.names = names
        self.claim = claim
        self.waiting: list[tuple[Flight[Any, Any], asyncio.Future[Any]]] = []


class _Batch:
    """The keys of one call of the batch function, by cache key, in the order they came."""

    __slots__ = ("context", "entries", "lent", "node", "spare", "task", "timer")

    def __init__(self, context: contextvars.Context) -> None:
        self.context = context
        self.spare = False
        """Runs in a spare slot: only background refreshes, nobody waiting, when it started."""
        self.lent = False
        """Runs in no slot of its own: a running batch awaits one of its keys (its function
        called the batch function), and lends it its slot."""
        self.node: _Node | None = None
        """Where it stands, once it runs, in the graph of which computation awaits which."""
        self.entries: dict[Hashable, _Entry] = {}
        self.task: asyncio.Task[None] | None = None
        """Set once it runs."""
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        """What closes it, while it is gathered."""

    def __repr__(self) -> str:
        state = "gathered" if self.timer is not None else "running" if self.task else "in line"
        return f"<batch {state} keys={list(self.entries)}>"

    def waiting(self) -> bool:
        """Whether a computation still awaits this batch's answer."""
        return any(not f.done() for e in self.entries.values() for _, f in e.waiting)

    def low(self) -> bool:
        """Whether it holds only background refreshes that no caller has joined."""
        return all(
            flight.background and not flight.callers
            for entry in self.entries.values()
            for flight, _ in entry.waiting
        )

    def holds(self, key: Hashable) -> bool:
        return key in self.entries


class _Name:
    """How a running batch is named in a RecursionError (made only then: a key's repr may be
    slow, or fail)."""

    __slots__ = ("display", "keys", "more")

    def __init__(self, display: str, keys: list[Any], more: bool) -> None:
        self.display = display
        self.keys = keys
        self.more = more

    def __repr__(self) -> str:
        shown = ", ".join(map(repr, self.keys)) + (", ..." if self.more else "")
        return f"the batch of {self.display}() for [{shown}]"


class _Node(Flight[Hashable, Any]):
    """A running batch in the graph of which computation awaits which (see _nesting): its
    keys' items await it, and it is the parent of the calls its function makes (``current``
    in its task), so that a call closing a cycle, through this function or others, raises
    RecursionError, and a nested call of a memoized function may run in the slot of one of its
    callers. It belongs to no flight table; it never computes."""

    __slots__ = ("batch",)

    def __init__(self, batch: _Batch, name: _Name, parent: Flight[Any, Any] | None) -> None:
        super().__init__(name, (), {}, None, parent)
        self.batch: _Batch | None = batch


class _Line:
    """The batches of one flight table (one event loop): the one gathered, those in line for
    a slot, those running."""

    __slots__ = ("gathered", "loop", "running", "slots", "table")

    def __init__(self, table: FlightTable[Any, Any], maxsize: int, admit: Any) -> None:
        self.table = table
        self.loop = table.loop
        self.gathered: _Batch | None = None
        self.running: set[_Batch] = set()
        self.slots: Slots[_Batch] = Slots(maxsize, admit, table.loop)


@final
class _Batcher(Generic[K, V]):
    """The batches of one batch function: gathering keys, bounding and running batches,
    splitting their answers among keys."""

    __slots__ = (
        "_line",
        "batches",
        "display",
        "engine",
        "func",
        "max_batch",
        "max_wait",
        "maxsize",
        "remote",
    )

    def __init__(
        self,
        func: Callable[[list[K]], Awaitable[Any]],
        display: str,
        maxsize: int,
        max_batch: int,
        max_wait: float,
    ) -> None:
        self.func = func
        self.maxsize = maxsize
        self.display = display
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.engine: Engine[Hashable, V] | None = None
        self._line: _Line | None = None
        self.batches = 0
        """Calls of the batch function since the last clear."""
        self.remote: BatchFlight | None = None
        """A RedisCache's single flight across processes (see _Batcher._run)."""

    def line(self) -> _Line:
        """The batches of the engine's flight table now (a new table, a new line)."""
        engine = self.engine
        assert engine is not None
        assert engine.table is not None
        line = self._line
        if line is None or line.table is not engine.table:
            line = self._line = _Line(engine.table, self.maxsize, self._admit)
            engine.table.on_close = self._closing
        return line

    def _closing(self) -> None:
        """The queue closes: no key can come to the batch gathered any more; it leaves now."""
        line = self._line
        if line is not None and line.gathered is not None:
            self._close(line, line.gathered)

    async def compute(self, flight: Flight[Hashable, V]) -> V:
        """The computation of one key's item: its value from the batch it joins. With a
        RedisCache, a key another process holds is waited for, then taken from there, or
        (the holder gave it up) put in a later batch."""
        remote = self.remote
        if remote is None:
            return await self._in_batch(flight, None, None)  # type: ignore[no-any-return]
        names = remote.names(flight.key)  # a key Redis cannot take fails alone
        claim: Claim | None = None
        while True:
            got = await self._in_batch(flight, names, claim)
            if type(got) is not _Elsewhere:
                return got  # type: ignore[no-any-return]
            turn = await remote.wait(got.waiting)
            if isinstance(turn, _hit_type()):
                return turn.value  # type: ignore[no-any-return]
            claim = turn

    async def _in_batch(self, flight: Flight[Hashable, V], names: Any, claim: Claim | None) -> Any:
        """Put flight's key in the batch being gathered; its outcome there."""
        line = self.line()
        loop = line.loop
        waiter: asyncio.Future[V] = loop.create_future()
        batch = line.gathered
        if batch is None:
            context = contextvars.copy_context()
            # The batch computes for every key in it, not within this key's computation.
            context.run(current.set, None)
            batch = line.gathered = _Batch(context)
            if self.max_wait:
                batch.timer = loop.call_later(self.max_wait, self._close, line, batch)
            else:
                batch.timer = loop.call_soon(self._close, line, batch)
        entry = batch.entries.get(flight.key)
        if entry is None:
            entry = batch.entries[flight.key] = _Entry(flight.args[0], names, claim)
        elif claim is not None and _holds(claim):
            entry.claim = claim  # the lock is this process's: the entry need not claim it
        entry.waiting.append((flight, waiter))
        if len(batch.entries) >= self.max_batch:
            self._close(line, batch)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._leave(batch, flight, waiter)
            raise

    def _leave(self, batch: _Batch, flight: Flight[Hashable, V], waiter: asyncio.Future[V]) -> None:
        """A key's computation was cancelled (a shutdown aborts it): it leaves its batch; a
        batch running that nobody waits for any more is cancelled."""
        entry = batch.entries.get(flight.key)
        if entry is not None and batch.task is None:
            entry.waiting = [(f, w) for f, w in entry.waiting if w is not waiter]
            if not entry.waiting:
                del batch.entries[flight.key]
                self._give_up(entry)
        elif batch.task is not None and not batch.waiting():
            batch.task.cancel()

    def _close(self, line: _Line, batch: _Batch) -> None:
        """Gathering batch ends: it starts, or waits in line for a slot."""
        if line.gathered is not batch:
            return
        line.gathered = None
        timer, batch.timer = batch.timer, None
        if timer is not None:
            timer.cancel()
        slots = line.slots
        if self._awaited(line, batch):
            # A running batch awaits one of its keys: waiting for a slot could wait for the
            # one that batch holds (it called the batch function); it runs in that one.
            self._start(line, batch, lent=True)
        elif batch.low():
            # Background refreshes only: in a spare slot, as single refreshes run, so that no
            # caller's batch waits behind them.
            if slots.spare_free() and not slots.refresh_line:
                self._start(line, batch, spare=True)
            else:
                slots.enqueue(batch, low=True)
        elif slots.has_room():
            self._start(line, batch)
        else:
            slots.enqueue(batch)

    def promote(self, key: Hashable) -> None:
        """A caller joined key's background refresh: if its batch waits for a spare slot, it
        takes its turn among the callers' batches now."""
        line = self._line
        if line is None:
            return
        slots = line.slots
        for batch in slots.refresh_line:
            if batch.holds(key):
                if slots.has_room():
                    slots.remove(batch)
                    self._start(line, batch)
                else:
                    slots.promote(batch)
                return

    def _admit(self, batch: _Batch, spare: bool) -> None:
        """batch's turn for a slot has come (``spare``: a spare one, for refreshes only)."""
        line = self._line
        assert line is not None
        self._start(line, batch, spare)

    def _start(
        self, line: _Line, batch: _Batch, spare: bool = False, *, lent: bool = False
    ) -> None:
        """Run batch in a slot (``lent``: in the slot of a running batch that awaits it),
        leaving out the keys nobody waits for any more."""
        if lent:
            batch.lent = True
        else:
            line.slots.take(spare=spare)
            batch.spare = spare
        table = line.table
        for k, entry in list(batch.entries.items()):
            kept = []
            for flight, waiter in entry.waiting:
                if waiter.done():
                    continue
                if flight.wanted():
                    kept.append((flight, waiter))
                    continue
                # Every caller left before the batch started: leave the key out, and let a
                # later call start afresh rather than join an item that never computes.
                if not flight.forgotten:
                    table.forget(flight.key)
                waiter.set_result(_LEFT_OUT)
            if kept:
                entry.waiting = kept
            else:
                del batch.entries[k]
                self._give_up(entry)
        if not batch.entries:
            self._release(line, batch)
            return
        if self.remote is None:
            self.batches += 1  # with a RedisCache, once its keys are claimed (see _run)
        line.running.add(batch)
        self._enter_graph(batch)
        batch.task = line.loop.create_task(self._run(line, batch), context=batch.context)

    def _enter_graph(self, batch: _Batch) -> None:
        """batch starts: its node is awaited by its keys' items, and the parent of the calls its
        function makes; the parent of its first key's item is its own (a slot it may borrow)."""
        first, _ = next(iter(batch.entries.values())).waiting[0]
        entries = batch.entries
        shown = [entry.key for entry, _ in zip(entries.values(), range(5), strict=False)]
        name = _Name(self.display, shown, len(entries) > 5)
        node = batch.node = _Node(batch, name, first.parent)
        node.state = RUNNING
        for entry in batch.entries.values():
            for flight, waiter in entry.waiting:
                awaits(flight, node, waiter)
        batch.context.run(current.set, node)

    def _give_up(self, entry: _Entry) -> None:
        """An entry nobody waits for leaves its batch: a lock this process took for it is
        released (its waiters elsewhere look again at once)."""
        claim = entry.claim
        if claim is not None and self.remote is not None and _holds(claim):
            entry.claim = None
            self.remote.release(claim)  # type: ignore[arg-type]

    async def _claim(self, batch: _Batch) -> None:
        """With a RedisCache: claim the batch's keys not claimed yet, in one round trip. Those
        found are answered, those another process holds are sent back to their items to wait
        for (see compute); the others (held here, or computed alone) stay in the batch."""
        remote = self.remote
        assert remote is not None
        fresh = [(ck, e) for ck, e in batch.entries.items() if e.claim is None]
        if not fresh:
            return
        wanted = [
            (e.names[0], e.names[1], not any(f.refresh for f, _ in e.waiting)) for _, e in fresh
        ]
        claims = await remote.claim(wanted)
        counts = self.engine.counts if self.engine is not None else None
        for (ck, entry), claim in zip(fresh, claims, strict=True):
            if isinstance(claim, _hit_type()):
                del batch.entries[ck]
                for flight, waiter in entry.waiting:
                    if counts is not None and not flight.background and counts.misses > 0:
                        counts.misses -= 1  # counted as it started: found by its lookup
                        count_hit(counts)
                    if not waiter.done():
                        waiter.set_result(claim.value)
            elif _waits(claim):
                del batch.entries[ck]
                for _, waiter in entry.waiting:
                    if not waiter.done():
                        waiter.set_result(_Elsewhere(claim))  # type: ignore[arg-type]
            else:
                entry.claim = claim

    async def _run(self, line: _Line, batch: _Batch) -> None:
        remote = self.remote
        held: list[tuple[Any, _Entry]] = []
        try:
            if remote is not None:
                await self._claim(batch)
                if not batch.entries:
                    return
                self.batches += 1
                held = [(e.claim, e) for e in batch.entries.values() if _holds(e.claim)]
            keys = [entry.key for entry in batch.entries.values()]
            # A list of its own: a batch function may sort or empty it, the answer is split
            # along the keys as they were given.
            if held:
                assert remote is not None
                renewal = remote.renewing([h for h, _ in held])
                try:
                    answer = await self.func(list(keys))
                finally:
                    await renewal.stop()
            else:
                answer = await self.func(list(keys))
            outcomes = self._split(keys, answer)
        except BaseException as raised:
            exc = raised
            if isinstance(raised, StopIteration):
                # From the answer (a mapping's lookup using next()): no future takes it.
                exc = RuntimeError(f"{self.display}()'s answer raised StopIteration")
                exc.__cause__ = raised
            if held:
                assert remote is not None
                # Nothing stored; the waiters elsewhere look again (one of them computes).
                await remote.finish([(h, (False, exc)) for h, _ in held])
            for entry in batch.entries.values():
                for _, waiter in entry.waiting:
                    if waiter.done():
                        continue
                    if isinstance(exc, asyncio.CancelledError):
                        waiter.cancel()
                    else:
                        waiter.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # cancelled (nobody waits), KeyboardInterrupt: after telling the keys
        else:
            if held:
                assert remote is not None
                await remote.finish(self._endings(batch, outcomes))
            for entry, (ok, what) in zip(batch.entries.values(), outcomes, strict=True):
                for _, waiter in entry.waiting:
                    if waiter.done():
                        continue
                    if ok:
                        waiter.set_result(what)
                    else:
                        waiter.set_exception(what)
        finally:
            node = batch.node
            if node is not None:  # out of the graph: no edge leads through it any more
                node.state = FINISHED
                node.awaiting = node.batch = batch.node = None
            line.running.discard(batch)
            self._release(line, batch)

    @staticmethod
    def _endings(batch: _Batch, outcomes: list[tuple[bool, Any]]) -> list[tuple[Any, Any]]:
        """How each key this process holds ends: its outcome, stored (fenced) if it is a value
        and the key was not invalidated, cleared or primed meanwhile (invalidation wins)."""
        ends: list[tuple[Any, Any]] = []
        for entry, outcome in zip(batch.entries.values(), outcomes, strict=True):
            if not _holds(entry.claim):
                continue
            if outcome[0] and any(f.forgotten for f, _ in entry.waiting):
                outcome = (False, _Forgotten())
            ends.append((entry.claim, outcome))
        return ends

    @staticmethod
    def _release(line: _Line, batch: _Batch) -> None:
        if batch.lent:
            return  # it took no slot
        if batch.spare:
            batch.spare = False
            line.slots.unspare()
        line.slots.release()

    def _split(self, keys: list[K], answer: Any) -> list[tuple[bool, Any]]:
        """Each key's outcome from the batch function's answer: (True, value) or (False,
        exception), in the order of keys."""
        if isinstance(answer, Mapping):
            outcomes: list[tuple[bool, Any]] = []
            for k in keys:
                try:
                    value = answer[k]
                except KeyError:
                    outcomes.append((False, self._missing(k)))
                    continue
                except TypeError as exc:
                    if _hashable(k):
                        raise
                    raise TypeError(
                        f"{self.display}() returned a mapping, but the key {k!r} cannot be "
                        f"looked up in one ({exc}); return a sequence with one value per key in "
                        "the order given"
                    ) from exc
                outcomes.append(self._outcome(k, value))
            return outcomes
        if isinstance(answer, Sequence) and not isinstance(answer, str | bytes | bytearray):
            if len(answer) != len(keys):
                raise ValueError(
                    f"{self.display}() returned {len(answer)} values for {len(keys)} keys; "
                    "return a mapping from key to value, or a sequence with one value per key "
                    "in the order given"
                )
            return [self._outcome(k, value) for k, value in zip(keys, answer, strict=True)]
        raise TypeError(
            f"{self.display}() returned {type(answer).__name__}; a batch function returns a "
            "mapping from key to value, or a sequence with one value per key in the order given"
        )

    def _outcome(self, k: Any, value: Any) -> tuple[bool, Any]:
        """k's outcome for a value the batch function gave it: an exception is raised."""
        if not isinstance(value, BaseException):
            return True, value
        if isinstance(value, StopIteration):
            # No future takes StopIteration (it would end the coroutine awaiting it): raised as
            # RuntimeError, as a coroutine raising it is.
            failure = RuntimeError(f"{self.display}() gave StopIteration as the value of {k!r}")
            failure.__cause__ = value
            return False, failure
        return False, value

    def _missing(self, k: Any) -> KeyError:
        return KeyError(f"{self.display}() returned no value for key {k!r}")

    # -- calls made inside computations ---------------------------------------------------------

    def lend_awaited(self) -> None:
        """After a call made inside a computation: a batch waiting in line for a slot that a
        running batch awaits (directly, or through other computations) starts now, in that
        batch's slot, which it could otherwise wait for for ever."""
        line = self._line
        if line is None or not (line.slots.line or line.slots.refresh_line):
            return
        if not any(b.node is not None and b.node.awaiting for b in line.running):
            return  # no running batch awaits anything: the common case, a call from a computation
        slots = line.slots
        for waiting in [*slots.line, *slots.refresh_line]:
            if self._awaited(line, waiting):
                slots.remove(waiting)
                self._start(line, waiting, lent=True)

    @staticmethod
    def _awaited(line: _Line, batch: _Batch) -> bool:
        """Whether a running batch awaits one of batch's keys, directly or through other
        computations (its function called for it)."""
        for running in line.running:
            node = running.node
            if node is None or not node.awaiting:
                continue
            for entry in batch.entries.values():
                for flight, _ in entry.waiting:
                    if reaches(node, flight):
                        return True
        return False

    async def direct(
        self, keys: list[K], counts: Counts, key_of: Callable[[Any], Hashable]
    ) -> list[V]:
        """Load keys with the batch function itself, caching switched off (disabled()): each
        distinct cache key once, at most ``max_batch`` keys a call, one call after another."""
        cache_keys = [key_of(k) for k in keys]
        for _ in keys:
            counts.bypassed += 1
            _listeners.bypassed(counts.name)
        first: dict[Hashable, K] = {}
        for ck, k in zip(cache_keys, keys, strict=True):
            first.setdefault(ck, k)
        distinct = list(first)
        outcomes: dict[Hashable, tuple[bool, Any]] = {}
        for start in range(0, len(distinct), self.max_batch):
            chunk = distinct[start : start + self.max_batch]
            sent = [first[ck] for ck in chunk]
            answer = await self.func(list(sent))
            outcomes.update(zip(chunk, self._split(sent, answer), strict=True))
        values = []
        for ck in cache_keys:
            ok, what = outcomes[ck]
            if not ok:
                raise what
            values.append(what)
        return values

    def check(self) -> None:
        """Assert the batches' invariants (for tests): no batch holds more than ``max_batch``
        keys; at most ``maxsize`` run for callers, and background refreshes beside them only
        in spare slots (``2 * maxsize`` in all), batches lent a slot aside; a batch in line or
        gathered has not started."""
        line = self._line
        if line is None:
            return
        own = [b for b in line.running if not b.lent]
        for batch in line.running:
            assert batch.node is not None, batch
            assert batch.node.batch is batch, batch
        spare = sum(b.spare for b in own)
        assert len(own) - spare <= line.slots.maxsize, line.running
        assert len(own) <= 2 * line.slots.maxsize, line.running
        assert line.slots.running >= len(own)
        batches = [*line.running, *line.slots.line, *line.slots.refresh_line]
        if line.gathered is not None:
            batches.append(line.gathered)
        for batch in batches:
            assert len(batch.entries) <= self.max_batch, batch
        assert line.slots.spare == sum(b.spare for b in line.running), line.running
        for batch in (*line.slots.line, *line.slots.refresh_line):
            assert batch.task is None, batch
            assert batch.timer is None, batch


class _Raise:
    """What a lookup of a key under a dated policy finds for a remembered error
    (``cache_errors``): its caller raises it anew (a value can never be one of these)."""

    __slots__ = ("error",)

    def __init__(self, error: CachedError) -> None:
        self.error = error


def _fresh(
    find: Callable[[Hashable, object], Any], clock: Callable[[], float]
) -> Callable[[Hashable, object], Any]:
    """find(key, miss) over the dated entries (``Kept``) of a policy: a fresh entry's value,
    a ``_Raise`` for a fresh remembered error, miss for an expired entry (its key is loaded
    again; a failing load may still serve it stale) and for an entry the policy did not date
    (a value written by other code into a shared cache), as for ``@worker_queue``."""

    def lookup(k: Hashable, miss: object) -> Any:
        entry = find(k, miss)
        if type(entry) is not Kept or clock() >= entry.expires:
            return miss
        if entry.error is not None:
            return _Raise(entry.error)
        return entry.value

    return lookup


def _holds(claim: object) -> bool:
    """Whether claim is a key's lock this process holds (claims exist only with a RedisCache,
    so the redis package is there to import)."""
    if claim is None:
        return False
    from .backends._redis_batch import Holding

    return isinstance(claim, Holding)


def _waits(claim: object) -> bool:
    """Whether claim is a key another process holds."""
    from .backends._redis_batch import Waiting

    return isinstance(claim, Waiting)


def _hit_type() -> type[Any]:
    """The type of a claim that found the key's value."""
    from .backends._redis_flight import Hit

    return Hit


def _hashable(k: object) -> bool:
    try:
        hash(k)
    except TypeError:
        return False
    return True


def batches_now(batched: object) -> tuple[int, int, int]:
    """(batches gathered, in line, running) of a batch function on its current loop (for
    tests)."""
    batcher: _Batcher[Any, Any] = batched._batcher  # type: ignore[attr-defined]
    line = batcher._line
    if line is None:
        return (0, 0, 0)
    waiting = len(line.slots.line) + len(line.slots.refresh_line)
    return (int(line.gathered is not None), waiting, len(line.running))


def holdings_now(batched: object) -> set[tuple[bytes, bytes]]:
    """The Redis locks the running batches of a batch function hold, as (lock name, token)
    (for tests)."""
    batcher: _Batcher[Any, Any] = batched._batcher  # type: ignore[attr-defined]
    line = batcher._line
    if line is None:
        return set()
    held: set[tuple[bytes, bytes]] = set()
    for batch in line.running:
        for entry in batch.entries.values():
            claim: Any = entry.claim
            if _holds(claim):
                held.add((claim.names.lock, claim.token))
    return held


def check(batched: object) -> None:
    """Assert the invariants of a batch function's batches (for tests)."""
    batcher: _Batcher[Any, Any] = batched._batcher  # type: ignore[attr-defined]
    batcher.check()


class _BatchKind:
    """The controls of a batch function: those of its kind of cache, per key, and its batches
    counted in cache_info()."""

    __slots__ = ("_batcher", "kind")

    def __init__(self, kind: CacheKind, batcher: _Batcher[Any, Any]) -> None:
        self.kind = kind
        self._batcher = batcher

    def cache_info(self) -> BatchInfo:
        return BatchInfo(*self.kind.cache_info(), batches=self._batcher.batches)

    def cache_clear(self) -> None:
        self.kind.cache_clear()  # an async cache's raises: use acache_clear
        self._batcher.batches = 0

    async def acache_clear(self) -> None:
        try:
            await self.kind.acache_clear()
        finally:
            self._batcher.batches = 0

    def cache_invalidate(self, key: Any, /) -> bool:
        return self.kind.invalidate((key,), {})

    async def acache_invalidate(self, key: Any, /) -> bool:
        return await self.kind.ainvalidate((key,), {})

    def cache_prime(self, value: Any, key: Any, /) -> None:
        self.kind.prime(value, (key,), {})

    async def acache_prime(self, value: Any, key: Any, /) -> None:
        await self.kind.aprime(value, (key,), {})

    def cache_peek(self, key: Any, /) -> Any:
        return self.kind.peek((key,), {})

    async def acache_peek(self, key: Any, /) -> Any:
        return await self.kind.apeek((key,), {})

    async def refresh(self, key: Any, /) -> Any:
        return await self.kind.refresh((key,), {})


_CONTROLS: Final = (
    "cache_info",
    "cache_clear",
    "acache_clear",
    "cache_invalidate",
    "acache_invalidate",
    "cache_prime",
    "acache_prime",
    "cache_peek",
    "acache_peek",
    "refresh",
)


def _check_options(maxsize: object, max_batch: object, max_wait: object) -> None:
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(
            f"@worker_queue.batch: maxsize must be an int of at least 1, got {maxsize!r}"
        )
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(
            f"@worker_queue.batch: max_batch must be an int of at least 1, got {max_batch!r}"
        )
    if (
        isinstance(max_wait, bool)
        or not isinstance(max_wait, int | float)
        or not (max_wait >= 0 and math.isfinite(max_wait))
    ):
        raise ValueError(
            f"@worker_queue.batch: max_wait must be a number of seconds >= 0, got {max_wait!r}"
        )


class BatchOptions(NamedTuple):
    maxsize: int
    cache: MutableMapping[Any, Any] | AsyncCache | None
    key: Callable[[Any], Hashable] | None
    finish_timeout: float
    name: str | None
    max_batch: int
    max_wait: float
    refresher: Callable[[MutableMapping[Any, Any] | None, str], Refresher | None]
    """Makes the refresh-ahead policy asked for, given the cache and the function's name."""
    result_policy: Callable[[MutableMapping[Any, Any] | None, str], Policy | None] | None = None
    """Makes the per-result policy asked for (cache_if, ttl, ...), applied per key."""
    refresh_asked: bool = False
    """Whether refresh_after was given."""


@final
class BatchDecorator:
    """What ``worker_queue.batch(...)`` returns: it decorates a batch function."""

    __slots__ = ("_options",)

    def __init__(self, options: BatchOptions) -> None:
        _check_options(options.maxsize, options.max_batch, options.max_wait)  # at once
        self._options = options

    @overload
    def __call__(
        self, func: Callable[[list[K]], Awaitable[Mapping[K, V | BaseException]]], /
    ) -> Batched[K, V]: ...

    @overload
    def __call__(
        self, func: Callable[[list[K]], Awaitable[Sequence[V | BaseException]]], /
    ) -> Batched[K, V]: ...

    def __call__(self, func: Callable[[list[Any]], Awaitable[Any]], /) -> Batched[Any, Any]:
        return batch_decorator(func, **self._options._asdict())

    def __repr__(self) -> str:
        o = self._options
        return (
            f"<wq_memo.worker_queue.batch(maxsize={o.maxsize}, max_batch={o.max_batch}, "
            f"max_wait={o.max_wait}, cache={o.cache!r})>"
        )


def batch_decorator(
    func: Callable[[list[K]], Awaitable[Any]],
    *,
    maxsize: int,
    cache: MutableMapping[Any, Any] | AsyncCache | None,
    key: Callable[[K], Hashable] | None,
    finish_timeout: float,
    name: str | None,
    max_batch: int,
    max_wait: float,
    refresher: Callable[[MutableMapping[Any, Any] | None, str], Refresher | None],
    result_policy: Callable[[MutableMapping[Any, Any] | None, str], Policy | None] | None = None,
    refresh_asked: bool = False,
) -> Batched[K, V]:
    """Make func, a batch function, into a ``Batched``; see worker_queue.batch."""
    if isinstance(func, staticmethod | classmethod) or (
        inspect.isfunction(func) and _naming.in_class_body(func)
    ):
        raise TypeError(
            "@worker_queue.batch does not decorate methods; decorate a function, and call it "
            "from the method"
        )
    if not is_async_callable(func):
        raise TypeError(
            f"@worker_queue.batch needs an async function (async def) taking a list of keys, "
            f"got {func!r}; wrap a blocking function with asyncio.to_thread first"
        )
    _check_options(maxsize, max_batch, max_wait)
    if key is not None and not callable(key):
        raise TypeError(
            f"@worker_queue.batch: key must be a function building a cache key from a key, "
            f"got {key!r}"
        )
    remote: BatchFlightCache | None = None
    if isinstance(cache, AsyncCache) and not isinstance(cache, MutableMapping):
        if not isinstance(cache, BatchFlightCache):
            raise TypeError(
                f"@worker_queue.batch: {type(cache).__qualname__} is an async cache that cannot "
                "load many keys at once; pass a RedisCache, a MutableMapping (such as a "
                "cachetools cache) or None"
            )
        if refresh_asked:
            raise ValueError(
                "@worker_queue.batch: refresh_after is not supported with a RedisCache yet; "
                "drop refresh_after (the cache's ttl expires entries), or use an in-process "
                "cache"
            )
        remote = cache
    elif not (cache is None or isinstance(cache, MutableMapping)):
        raise TypeError(
            f"@worker_queue.batch: cache must be a MutableMapping (such as a cachetools cache), "
            f"a RedisCache or None; got {cache!r}"
        )
    display = _naming.describe(func)
    batcher: _Batcher[K, V] = _Batcher(func, display, maxsize, max_batch, float(max_wait))
    shared = None if remote is None else _naming.shared_name(func, name)
    if remote is not None:
        batcher.remote = remote.batch_flight()
    mapping = cache if isinstance(cache, MutableMapping) else None
    policy = None if remote is not None else refresher(mapping, display)
    # Per key, through the one store, as for a call of a memoized function: a key's value is
    # kept (or not) and dated by Store.now, its failure remembered or served stale by
    # Store.failed_now, both called by the flight table for that key's item (in-process caches
    # only: the policy is refused with a RedisCache at decoration).
    kept = None if result_policy is None or mapping is None else result_policy(mapping, display)

    def key_now(k: Any) -> Hashable:
        try:
            ck: Hashable = k if key is None else key(k)
            hash(ck)
        except TypeError as exc:
            raise TypeError(
                f"{display}(): the key {k!r} cannot be a cache key ({exc}); pass key= to "
                "@worker_queue.batch to build a hashable key from it"
            ) from exc
        return ck

    if shared is not None:
        plain_key = key_now

        def key_now(k: Any) -> Hashable:
            # Keys of an async cache name their function, as @worker_queue's do.
            return CallKey(shared, plain_key(k))

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        return key_now(args[0])

    store: Store[Hashable, V] | None = None
    if remote is not None:
        # Computed values are stored by the cache's own protocol (fenced); this store writes
        # primes only, through the cache's set (which fences the computations under way).
        store = Store(display, write=remote.set, single_flight=remote)
    elif mapping is not None:
        store = Store(
            display,
            mapping=mapping,
            stored=None if policy is None else policy.stored,
            policy=kept,
        )
        if policy is not None:
            # A key's stale value served is not refreshed ahead before its next attempt.
            store.deferred = policy.started
    # The queue's items are keys; its slots bound only the keys refreshed in the background at
    # once (each holds a spare slot while its batch runs): up to maxsize full batches of them.
    engine: Engine[Hashable, V] = Engine(
        func,
        maxsize * max_batch,
        finish_timeout,
        miss=MISSING,
        compute=batcher.compute,
        store=store,
        slotless=True,
        on_refresh_failed=None if policy is None else policy.failed,
    )
    batcher.engine = engine
    counts = engine.counts
    if kept is not None:
        kept.count_in(counts)
    kind: CacheKind
    find: Callable[[Hashable, object], Any] | None = None

    def tables() -> FlightTable[Hashable, V] | None:
        return engine.table

    if store is not None:
        store.tables = tables  # a prime forgets the computations of its key under way
    if remote is not None:
        assert store is not None
        kind = AsyncCacheKind(engine, key_of, remote, store, None, display)
    elif mapping is None:
        kind = NoCacheKind(engine, key_of)
    else:
        assert store is not None
        find = fast_lookup(mapping) or mapping.get
        if kept is not None and kept.dated:
            find = _fresh(find, kept.clock)
        kind = MappingKind(engine, key_of, mapping, store, None, policy, _no_hits, _nothing)
    bind = engine.bind
    # Only the lookup of a dated policy (_fresh) finds a _Raise: without one, the hit path tests
    # a local flag, not the type of every value found (a hit costs what it cost without it).
    remembers = kept is not None and kept.dated
    due_get = None if policy is None else policy.due.get
    clock = None if policy is None else policy.clock

    def request(k: Any) -> V | _Raise | asyncio.Future[V]:
        """k's value if cached (a ``_Raise`` for a remembered error), else the future of its
        item (joined or started)."""
        ck = key_now(k)
        if find is not None:
            value = find(ck, MISSING)
            if value is not MISSING:
                count_hit(counts)
                if remembers and type(value) is _Raise:
                    return value  # a remembered error: raised by the caller, in its turn
                if due_get is not None and clock is not None and clock() >= due_get(ck, NEVER):
                    # Due: one background refresh, which goes in a batch like any key.
                    assert policy is not None
                    policy.started(ck)
                    engine.table_now().refresh_in_background(ck, (k,), {})
                return value  # type: ignore[no-any-return]
        table = engine.table
        if table is None or table.loop is not asyncio.get_running_loop():
            table = bind()
        flight = table.flights.get(ck)
        future = table.call(ck, (k,))
        if flight is not None and flight.background:
            batcher.promote(ck)  # a caller now waits for that refresh
        if current.get() is not None:
            batcher.lend_awaited()  # a batch in line that a running one now awaits starts
        return future

    async def load(k: K, /) -> V:
        if SWITCH.watch and SWITCH.off():
            return (await batcher.direct([k], counts, key_now))[0]
        found = request(k)
        if isinstance(found, asyncio.Future):
            return await found
        if remembers and type(found) is _Raise:
            raise found.error.rebuild()
        return found  # type: ignore[return-value]  # a _Raise only under a dated policy

    async def many(keys: Iterable[K], /) -> list[V]:
        keys = list(keys)
        if SWITCH.watch and SWITCH.off():
            return await batcher.direct(keys, counts, key_now)
        found: dict[Hashable, Any] = {}
        order: list[Hashable] = []
        futures: list[asyncio.Future[V]] = []
        try:
            for k in keys:
                ck = key_now(k)
                order.append(ck)
                if ck not in found:
                    value = found[ck] = request(k)
                    if isinstance(value, asyncio.Future):
                        futures.append(value)
            values = []
            for ck in order:
                value = found[ck]
                if isinstance(value, asyncio.Future):
                    value = found[ck] = await value
                elif remembers and type(value) is _Raise:
                    raise value.error.rebuild()
                values.append(value)
            return values
        finally:
            for future in futures:
                future.cancel()  # this caller leaves what it no longer waits for

    load.__dict__.update(
        many=many,
        queue=facade(engine),
        cache=cache,
        _cache_kind=kind,
        _batcher=batcher,
        _refresher=policy,
    )
    controls = _BatchKind(kind, batcher)
    for control in _CONTROLS:
        setattr(load, control, getattr(controls, control))
    functools.update_wrapper(load, func)
    if shared is not None:
        _naming.claim(cache, shared, load)
    _memo_registry.register(load)
    _listeners.track(load, counts, name or display)
    return load  # type: ignore[return-value]


def _no_hits() -> int:
    return 0


def _nothing() -> None:
    return None
