"""Model-based test of the writes: f.refresh(k), primes, peeks, invalidations and clears against
computations and background refreshes under way, with stores on their way.

The function under test, f(key), is memoized with refresh-ahead on a fake clock, over one of
four caches kept in memory: a cachetools mapping, an AsyncCache, a SingleFlightCache and a
RefreshingCache. The last two work as RedisCache does: a computation claims its key (a lock
with a token, taken under the namespace's epoch), and its store (FINISH) lands only while its
token still holds the lock and no clear that began after the claim runs; a prime stores and
removes the lock, a delete removes the value and the lock, a clear sets the epoch, removes
every value and lock in a later step, then unsets the epoch. Every operation of the async
caches suspends, and rules can hold any kind of operation at a gate (a lookup, a claim, a
store, a prime, a delete, a clear before or during its scan) while other rules run: calls,
refreshes, primes, invalidations and clears run as tasks, each recording, in the model's
clock, when it began and when it returned.

Every computation returns an object of its own and every prime stores one, so each value the
cache stores and each value a caller receives names the computation (or prime) it came from;
values are never compared by equality. After every step the machine checks that:

- once an invalidation or a clear of a key has returned, no result of a computation begun
  before it is ever stored, or delivered to a call made afterwards;
- once a prime has stored its value, no computation begun before the prime stores over it,
  and no call made after the prime returned gets such a computation's result;
- f.refresh(k) returns the result of a computation begun at or after its call (or of the
  computation of k under way when it was called, which it joins), never a stored value;
- a computation's result is stored, once nothing is held at a gate, unless an invalidation,
  a clear or a prime of its key overlapped it;
- a peek never computes, never counts (neither in cache_info() nor in the cache's own reads),
  and returns what the model says the cache holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import cachetools
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from wq_memo import MISSING, Memoized, worker_queue
from wq_memo.backends import CallKey, Missing, RefreshingCache, SingleFlightCache

from ._machinery import ComputationFailed, FastForwardLoop, Value

V = TypeVar("V")
KEYS = ("a", "b")
keys = st.sampled_from(KEYS)
REFRESH_AFTER = 5.0
ASYNC_GATES = ("get", "set", "prime", "delete", "clear")
SINGLE_FLIGHT_GATES = ("get", "claim", "finish", "set", "prime", "delete", "clear", "scan")
"""The gates of the cache's operations: "set" holds the sets of computations' results, "prime"
those of primes, so that a prime can land while a computation's store is held on its way."""


class Primed:
    """A value one prime stores: compared by identity."""

    __slots__ = ("op",)

    def __init__(self, op: Op) -> None:
        self.op = op

    def __repr__(self) -> str:
        return f"Primed(op #{self.op.id})"


@dataclass(eq=False)
class Comp:
    """One call of the worker, held open by its gate."""

    id: int
    key: str
    began: int
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    result: Value | None = None
    fail: bool = False
    done: bool = False
    written: int | None = None
    """The model's clock when the cache first stored its result."""


@dataclass(eq=False)
class Op:
    """An invalidation, a clear or a prime (``key`` None: a clear of every key)."""

    id: int
    kind: str
    key: str | None
    began: int | None = None
    returned: int | None = None
    written: int | None = None
    """A prime: when the cache stored its value."""
    task: asyncio.Task[Any] | None = None

    def covers(self, key: str) -> bool:
        return self.key is None or self.key == key

    def __repr__(self) -> str:
        return (
            f"{self.kind}({self.key or ''}) op #{self.id} "
            f"[began {self.began}, returned {self.returned}]"
        )


@dataclass(eq=False)
class Call:
    """f(key) or f.refresh(key), awaited in a task."""

    id: int
    key: str
    refresh: bool
    task: asyncio.Task[Any] | None = None
    created: int | None = None
    """When its task first ran and made the call."""
    returned: int | None = None
    joinable: list[Comp] = field(default_factory=list)
    """A refresh: the computations of its key under way, not superseded, when it was made."""
    stored_then: object = None
    """What the cache held for its key when it was made."""
    checked: bool = False
    got: Comp | None = None
    """The computation whose result it got."""


def name_of(key: Hashable) -> str:
    """The model's key of a cache key: hashkey('a') or CallKey('f', hashkey('a'))."""
    if isinstance(key, CallKey):
        key = key.key
    assert isinstance(key, tuple), key
    found = key[0]
    assert isinstance(found, str), key
    return found


# -- the caches ---------------------------------------------------------------------------------


def set_gate(value: object) -> str:
    """The gate a set of value waits at: a prime's, or a computation's store."""
    return "prime" if isinstance(value, Primed) else "set"


class RecordingLRUCache(cachetools.LRUCache[Hashable, Any]):
    """A mapping cache that tells the machine every write and removal."""

    def __init__(self, machine: StoreMachine) -> None:
        super().__init__(maxsize=100)
        self.machine = machine

    def __setitem__(self, key: Hashable, value: Any) -> None:
        super().__setitem__(key, value)
        self.machine.wrote(name_of(key), value)

    def __delitem__(self, key: Hashable) -> None:
        super().__delitem__(key)
        self.machine.removed(name_of(key))

    def clear(self) -> None:
        keys = list(self.keys())
        super().clear()
        for key in keys:
            self.machine.removed(name_of(key))


class GatedAsyncCache:
    """An AsyncCache in memory: every operation suspends, and waits at its gate while the
    machine holds it; each change of the data happens in one step and is told to the machine.
    ``reads`` counts lookups (a peek counts nothing)."""

    def __init__(self, machine: StoreMachine) -> None:
        self.machine = machine
        self.data: dict[Hashable, Any] = {}
        self.written_at: dict[Hashable, float] = {}
        self.reads = 0

    async def get(self, key: Hashable) -> Any:
        self.reads += 1
        await self.machine.at("get")
        return self.data.get(key, MISSING)

    async def peek(self, key: Hashable) -> Any:
        return self.data.get(key, MISSING)

    def put(self, key: Hashable, value: Any) -> None:
        self.data[key] = value
        self.written_at[key] = self.machine.now
        self.machine.wrote(name_of(key), value)

    def remove(self, key: Hashable) -> bool:
        found = self.data.pop(key, MISSING) is not MISSING
        if found:
            self.machine.removed(name_of(key))
        return found

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await self.machine.at(set_gate(value))
        self.put(key, value)

    async def delete(self, key: Hashable) -> bool:
        await self.machine.at("delete")
        return self.remove(key)

    async def clear(self) -> None:
        await self.machine.at("clear")
        for key in list(self.data):
            self.remove(key)

    async def aclose(self) -> None:
        pass


@dataclass(eq=False)
class Lock:
    """A computation's claim on a key, taken under the epoch then set (None: no clear ran)."""

    epoch: object | None


class GatedSingleFlightCache(GatedAsyncCache):
    """A SingleFlightCache in memory that claims, stores, primes, deletes and clears the way
    RedisCache's scripts do (see the module docstring); each script is one step, after a
    suspension and the wait at its gate."""

    def __init__(self, machine: StoreMachine) -> None:
        super().__init__(machine)
        self.locks: dict[Hashable, Lock] = {}
        self.epoch: object | None = None
        self.released = asyncio.Event()
        """Set when a lock is released (then replaced): the waiters look again."""

    def unlock(self, key: Hashable) -> None:
        if self.locks.pop(key, None) is not None:
            self.released.set()
            self.released = asyncio.Event()

    async def set(self, key: Hashable, value: Any, ttl: float | None = None) -> None:
        await self.machine.at(set_gate(value))
        self.put(key, value)  # a prime wins over the computation under way
        self.unlock(key)

    async def delete(self, key: Hashable) -> bool:
        await self.machine.at("delete")
        found = self.remove(key)
        self.unlock(key)
        return found

    async def clear(self) -> None:
        await self.machine.at("clear")
        epoch = self.epoch = object()
        await self.machine.at("scan")
        for key in list(self.data):
            self.remove(key)
        for key in list(self.locks):
            self.unlock(key)
        await asyncio.sleep(0)
        if self.epoch is epoch:
            self.epoch = None

    async def claim(self, key: Hashable, look: bool) -> tuple[str, Any, asyncio.Event | None]:
        """("hit", value, None), ("taken", lock, None) or ("held", None, released)."""
        await self.machine.at("claim")
        if look and key in self.data:
            self.reads += 1
            return "hit", self.data[key], None
        if key in self.locks:
            return "held", None, self.released
        lock = self.locks[key] = Lock(self.epoch)
        return "taken", lock, None

    async def finish(self, key: Hashable, lock: Lock, value: Any, store: bool) -> None:
        await self.machine.at("finish")
        if self.locks.get(key) is not lock:
            return  # deleted, cleared or primed meanwhile
        self.unlock(key)
        if self.epoch is not None and self.epoch is not lock.epoch:
            return  # a clear that began after the claim runs
        if store:
            self.put(key, value)

    async def hold(self, key: Hashable, lock: Lock, compute: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await compute()
        except BaseException:
            await self.finish(key, lock, None, store=False)
            raise
        await self.finish(key, lock, value, store=True)
        return value

    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        while True:
            kind, payload, released = await self.claim(key, look=True)
            if kind == "hit":
                return payload  # type: ignore[no-any-return]
            if kind == "taken":
                return await self.hold(key, payload, compute)
            assert released is not None
            await released.wait()


class GatedRefreshingCache(GatedSingleFlightCache):
    """A GatedSingleFlightCache that knows its entries' ages and refreshes them, as RedisCache
    does: a refresh claims without looking, and gives up at once if the key is held."""

    async def get_with_age(self, key: Hashable) -> tuple[Any, float | None]:
        value = await self.get(key)
        if value is MISSING:
            return MISSING, None
        return value, self.machine.now - self.written_at[key]

    async def refresh(
        self, key: Hashable, compute: Callable[[], Awaitable[V]]
    ) -> tuple[bool, V | Missing]:
        kind, lock, _ = await self.claim(key, look=False)
        if kind != "taken":
            return False, MISSING
        return True, await self.hold(key, lock, compute)


# -- the machine --------------------------------------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Drives f(key) under @worker_queue(refresh_after=...) with a mapping cache."""

    gate_names: ClassVar[tuple[str, ...]] = ()
    synchronous: ClassVar[bool] = True
    """Whether the cache is a mapping (cache_prime() and the like work; nothing suspends)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = FastForwardLoop()
        self.clock = 0
        self.now = 0.0
        self.comps: list[Comp] = []
        self.ops: list[Op] = []
        self.made: list[Call] = []
        self.stored: dict[str, object] = {}
        """What the cache holds, as its writes and removals told the machine."""
        self.gates: dict[str, asyncio.Event] = {}
        self.violations: list[str] = []

    def make_cache(self) -> Any:
        return RecordingLRUCache(self)

    @initialize(maxsize=st.integers(1, 2))
    def decorate(self, maxsize: int) -> None:
        self.cache = self.make_cache()

        @worker_queue(
            maxsize=maxsize,
            cache=self.cache,
            name="f",
            refresh_after=REFRESH_AFTER,
            timer=lambda: self.now,
        )
        async def f(key: str) -> object:
            return await self.work(key)

        self.f: Memoized[[str], object] = f

    # -- the model ------------------------------------------------------------------------------

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    async def at(self, name: str) -> None:
        """Where an operation of the cache suspends, and waits while its gate is held."""
        await asyncio.sleep(0)
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()

    async def work(self, key: str) -> Value:
        comp = Comp(len(self.comps), key, self.tick())
        self.comps.append(comp)
        try:
            await comp.gate.wait()
        finally:
            comp.done = True
        if comp.fail:
            raise ComputationFailed(comp.id)
        comp.result = Value(comp.id)
        return comp.result

    def superseding(self, key: str, since: int, before: int | None = None) -> list[Op]:
        """The invalidations, clears and primes of key that began after ``since`` and (with
        ``before``) had returned before it."""
        return [
            op
            for op in self.ops
            if op.covers(key)
            and op.began is not None
            and op.began > since
            and (before is None or (op.returned is not None and op.returned < before))
        ]

    def under_way(self, key: str, when: int) -> list[Op]:
        """The invalidations, clears and primes of key under way at ``when``. A refresh made
        then may return the entry as it is, with a RefreshingCache: the computation the
        operation forgot still holds the key's claim until the operation removes it, so the
        refresh finds the key held and answers as if another process computed it."""
        return [
            op
            for op in self.ops
            if op.covers(key)
            and op.began is not None
            and op.began < when
            and (op.returned is None or op.returned > when)
        ]

    def wrote(self, key: str, value: object) -> None:
        """The cache stored value for key, now."""
        now = self.tick()
        self.stored[key] = value
        if isinstance(value, Primed):
            if value.op.written is None:
                value.op.written = now
            return
        if not isinstance(value, Value):
            self.violations.append(f"{value!r} stored for {key!r}: no computation returned it")
            return
        comp = self.comps[value.comp_id]
        if comp.key != key:
            self.violations.append(f"{value!r} of {comp.key!r} stored for {key!r}")
        if comp.written is None:
            comp.written = now
        for op in self.superseding(key, comp.began):
            if op.returned is not None:
                self.violations.append(
                    f"{value!r} (computation #{comp.id}, began at {comp.began}) stored for "
                    f"{key!r} at {now}, after {op} had returned"
                )
            elif op.kind == "prime" and op.written is not None:
                self.violations.append(
                    f"{value!r} (computation #{comp.id}, began at {comp.began}) stored for "
                    f"{key!r} at {now}, over the value {op} stored at {op.written}"
                )

    def removed(self, key: str) -> None:
        self.stored.pop(key, None)

    def storing(self, comp: Comp) -> bool:
        """Whether comp has ended and its flight is still in the queue's table, its store on
        its way (after delivering, with an AsyncCache; before, in a single-flight cache's
        get_or_compute): f.refresh() of its key joins it and returns that result without
        computing, a gap tests/test_refresh_while_storing.py marks."""
        table = self.f.queue._engine.table
        if table is None or not comp.done:
            return False
        for flight in table.flights.values():
            if name_of(flight.key) == comp.key:
                if flight.outcome is not None:
                    return flight.outcome[1] is comp.result
                latest = max(c.id for c in self.comps if c.key == comp.key)
                return comp.id == latest
        return False

    def active(self) -> list[Comp]:
        return [c for c in self.comps if not c.done and not c.gate.is_set()]

    # -- running things -------------------------------------------------------------------------

    def drive(self) -> None:
        """Run the loop until every task is blocked or done; check what finished."""
        loop = self.loop
        for _ in range(1000):
            loop.call_soon(loop.stop)
            loop.run_forever()
            if not loop._ready:  # type: ignore[attr-defined]
                break
        else:
            raise AssertionError("the event loop never became idle")
        for call in self.made:
            if not call.checked and call.task is not None and call.task.done():
                call.checked = True
                self.check_call(call)

    async def calling(self, call: Call) -> object:
        call.created = self.tick()
        call.stored_then = self.stored.get(call.key)
        if call.refresh:
            call.joinable = [
                c
                for c in self.comps
                if c.key == call.key
                and not self.superseding(c.key, c.began)
                and (not c.done or self.storing(c))
            ]
            value = await self.f.refresh(call.key)
        else:
            value = await self.f(call.key)
        call.returned = self.tick()
        return value

    def start_call(self, key: str, refresh: bool) -> Call:
        call = Call(len(self.made), key, refresh)
        call.task = self.loop.create_task(self.calling(call))
        self.made.append(call)
        return call

    async def operating(self, op: Op, run: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        op.began = self.tick()
        await run()
        op.returned = self.tick()

    def start_op(self, kind: str, key: str | None, sync: bool) -> Op:
        """Begin an invalidation, a clear or a prime; a synchronous one ends at once."""
        op = Op(len(self.ops), kind, key)
        self.ops.append(op)
        f = self.f
        if sync:
            op.began = self.tick()
            if kind == "prime":
                assert key is not None
                f.cache_prime(Primed(op), key)
            elif kind == "invalidate":
                assert key is not None
                f.cache_invalidate(key)
            else:
                f.cache_clear()
                assert self.counted() == (0, 0, 0), f"right after cache_clear(): {self.counted()}"
            op.returned = self.tick()
            return op

        def run() -> Coroutine[Any, Any, Any]:
            if kind == "prime":
                assert key is not None
                return f.acache_prime(Primed(op), key)
            if kind == "invalidate":
                assert key is not None
                return f.acache_invalidate(key)
            return f.acache_clear()

        op.task = self.loop.create_task(self.operating(op, run))
        return op

    def counted(self) -> tuple[int, int, int]:
        info = self.f.cache_info()
        return info.hits, info.misses, info.joined

    # -- checking what callers got --------------------------------------------------------------

    def check_call(self, call: Call) -> None:
        task = call.task
        assert task is not None
        where = f"{'f.refresh' if call.refresh else 'f'}({call.key!r}) #{call.id}"
        assert not task.cancelled(), f"{where} was cancelled"
        exc = task.exception()
        assert call.created is not None
        if exc is not None:
            assert isinstance(exc, ComputationFailed), f"{where} raised {exc!r}"
            comp = self.comps[exc.comp_id]
            assert comp.key == call.key, f"{where} got the failure of #{comp.id} ({comp.key!r})"
            return
        value = task.result()
        assert call.returned is not None
        if isinstance(value, Primed):
            op = value.op
            assert op.key == call.key, f"{where} got {value!r}, primed for {op.key!r}"
            assert op.written is not None
            # A prime that lands while a refresh looks the key up (a SingleFlightCache's
            # get_or_compute after its delete, or that of the call it joined) wins over it:
            # the refresh returns the primed value.
            assert (
                not call.refresh
                or op.written > call.created
                or value is call.stored_then
                or self.under_way(call.key, call.created)
            ), f"{where} returned the primed {value!r}, replaced before it was made"
            later = self.superseding(call.key, op.written, before=call.created)
            assert not later, f"{where} got {value!r}, removed or replaced by {later} first"
            return
        assert isinstance(value, Value), f"{where} got {value!r}"
        comp = self.comps[value.comp_id]
        assert comp.key == call.key, f"{where} got {value!r}, computed for {comp.key!r}"
        stale = self.superseding(call.key, comp.began, before=call.created)
        assert not stale, (
            f"{where}, made at {call.created}, got {value!r} (computation #{comp.id}, began "
            f"at {comp.began}), although {stale} had returned before"
        )
        if call.refresh and not self.under_way(call.key, call.created):
            assert comp.began >= call.created or comp in call.joinable, (
                f"{where}, made at {call.created}, returned {value!r} of computation #{comp.id}, "
                f"which began at {comp.began} and was not under way to be joined"
            )
        call.got = comp

    # -- rules ----------------------------------------------------------------------------------

    @rule(batch=st.lists(keys, min_size=1, max_size=3))
    def calls(self, batch: list[str]) -> None:
        """Concurrent calls of f."""
        for key in batch:
            self.start_call(key, refresh=False)
        self.drive()

    @rule(key=keys)
    def refresh(self, key: str) -> None:
        """f.refresh(key): computes anew (or joins the computation under way), stores, returns."""
        self.start_call(key, refresh=True)
        self.drive()

    @precondition(lambda self: self.active())
    @rule(pick=st.integers(0, 7), fail=st.booleans())
    def release(self, pick: int, fail: bool) -> None:
        """Let one held computation end, with its result or a failure."""
        active = self.active()
        comp = active[pick % len(active)]
        comp.fail = fail
        comp.gate.set()
        self.drive()

    @rule(key=keys, sync=st.booleans())
    def prime(self, key: str, sync: bool) -> None:
        """cache_prime() or acache_prime() a value of its own."""
        self.start_op("prime", key, sync and self.synchronous)
        self.drive()

    @rule(key=keys, sync=st.booleans())
    def invalidate(self, key: str, sync: bool) -> None:
        self.start_op("invalidate", key, sync and self.synchronous)
        self.drive()

    @rule(sync=st.booleans())
    def clear(self, sync: bool) -> None:
        self.start_op("clear", None, sync and self.synchronous)
        self.drive()

    @rule(seconds=st.sampled_from([2.0, 6.0]))
    def advance(self, seconds: float) -> None:
        """Move the clock: entries become due, and the next hit starts a background refresh."""
        self.now += seconds

    @rule(key=keys, then=st.sampled_from([None, "invalidate", "clear", "prime"]))
    def call_when_due(self, key: str, then: str | None) -> None:
        """Move the clock past refresh_after and call: a hit on a stored entry starts a
        background refresh; ``then`` lands an operation on its key while it stores."""
        self.now += REFRESH_AFTER + 1
        before = len(self.comps)
        self.start_call(key, refresh=False)
        self.drive()
        started = [c for c in self.comps[before:] if c.key == key and not c.done]
        if then is not None and started and self.gate_names:
            active = self.active()
            self.store_lands_around(active.index(started[0]), then, False, [], True)

    @rule(key=keys, sync=st.booleans())
    def peek(self, key: str, sync: bool) -> None:
        """cache_peek() or acache_peek(): what the cache holds, at once; nothing computed, looked
        up, counted or started."""
        counted, comps = self.f.cache_info(), len(self.comps)
        reads = getattr(self.cache, "reads", 0)
        table = self.f.queue._engine.table
        flights = dict(table.flights) if table is not None else {}
        if sync and self.synchronous:
            value = self.f.cache_peek(key)
        else:
            # It must not suspend (the cache's peek answers at once): run without the loop.
            coroutine = self.f.acache_peek(key)
            try:
                coroutine.send(None)
            except StopIteration as returned:
                value = returned.value
            else:
                coroutine.close()
                assert getattr(self.cache, "reads", 0) == reads, "a peek looked the key up"
                raise AssertionError("acache_peek() suspended although the cache's peek does not")
        expected = self.stored.get(key, MISSING)
        assert value is expected, f"peek({key!r}) gave {value!r}, the cache holds {expected!r}"
        assert self.f.cache_info() == counted, f"a peek counted: {counted} -> {self.f.cache_info()}"
        assert getattr(self.cache, "reads", 0) == reads, "a peek looked the key up"
        assert len(self.comps) == comps, "a peek computed"
        table = self.f.queue._engine.table
        assert (dict(table.flights) if table is not None else {}) == flights, "a peek started"
        self.drive()

    @precondition(lambda self: self.gate_names)
    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        """Hold one kind of the cache's operations at a gate (those already past it go on)."""
        name = data.draw(st.sampled_from(self.gate_names))
        if name not in self.gates:
            self.gates[name] = asyncio.Event()
        self.drive()

    @precondition(lambda self: self.gates)
    @rule(data=st.data())
    def open_gate(self, data: st.DataObject) -> None:
        """Let the operations held at one gate go on."""
        name = data.draw(st.sampled_from(sorted(self.gates)))
        self.gates.pop(name).set()
        self.drive()

    @precondition(lambda self: self.active() and self.gate_names)
    @rule(
        pick=st.integers(0, 7),
        kind=st.sampled_from(["invalidate", "clear", "prime"]),
        op_first=st.booleans(),
        during=st.lists(st.tuples(keys, st.booleans()), max_size=2),
        by_set=st.booleans(),
    )
    def store_lands_around(
        self, pick: int, kind: str, op_first: bool, during: list[tuple[str, bool]], by_set: bool
    ) -> None:
        """A computation ends while an invalidation, a clear or a prime of its key is under way:
        its store is held while the operation starts (or the operation is held at its cache
        step while the store goes on), calls and refreshes come in, then everything goes on.
        ``by_set``: with a single-flight cache, hold set() (a background refresh beside the
        entry stores through it) rather than get_or_compute's finish. A prime's set has a
        gate of its own: held, the store goes on under it; not held, the prime goes on while
        the store is held on its way, and must wait for it rather than be overwritten."""
        active = self.active()
        comp = active[pick % len(active)]
        store_gate = "finish" if "finish" in self.gate_names and not by_set else "set"
        op_gate = {"invalidate": "delete", "prime": "prime"}.get(kind, "clear")
        if kind == "clear" and op_first and "scan" in self.gate_names:
            op_gate = "scan"  # the clear's epoch is set, its removals not made yet
        held = op_gate if op_first else store_gate
        added = held not in self.gates
        if added:
            self.gates[held] = asyncio.Event()
        if op_first:
            self.start_op(kind, None if kind == "clear" else comp.key, sync=False)
            self.drive()
            comp.gate.set()
        else:
            comp.gate.set()
            self.drive()
            self.start_op(kind, None if kind == "clear" else comp.key, sync=False)
        self.drive()
        for key, refresh in during:
            self.start_call(key, refresh)
        self.drive()
        if added:
            self.gates.pop(held).set()
        self.drive()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def no_violation(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def the_table_is_consistent(self) -> None:
        table = self.f.queue._engine.table if hasattr(self, "f") else None
        if table is not None:
            table.check()

    @invariant()
    def results_are_stored_once_nothing_is_held(self) -> None:
        """A result delivered is stored, unless an invalidation, a clear or a prime of its key
        overlapped its flight: from the first call that got it (a single-flight cache claims
        the key before the computation takes a slot) to the last to return."""
        if self.gates:
            return
        got: dict[int, list[Call]] = {}
        for call in self.made:
            if call.got is not None:
                got.setdefault(call.got.id, []).append(call)
        for comp_id, calls in got.items():
            comp = self.comps[comp_id]
            if comp.written is not None:
                continue
            since = min(comp.began, *(c.created for c in calls if c.created is not None))
            until = max(c.returned for c in calls if c.returned is not None)
            overlapping = [
                op
                for op in self.ops
                if op.covers(comp.key)
                and op.began is not None
                and op.began <= until
                and (op.returned is None or op.returned >= since)
            ]
            assert overlapping, (
                f"calls {[c.id for c in calls]} got the result of computation #{comp.id} "
                f"({comp.key!r}), which was never stored, and no invalidation, clear or prime "
                "of its key overlapped them"
            )

    def teardown(self) -> None:
        for gate in self.gates.values():
            gate.set()
        for comp in self.comps:
            comp.gate.set()
        loop = self.loop
        with contextlib.suppress(AssertionError):
            self.drive()
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for call in self.made:
            if call.task is not None and call.task.done() and not call.task.cancelled():
                call.task.exception()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class AsyncStoreMachine(StoreMachine):
    """As StoreMachine, with an AsyncCache whose operations suspend and can be held."""

    gate_names = ASYNC_GATES
    synchronous = False

    def make_cache(self) -> Any:
        return GatedAsyncCache(self)


class SingleFlightStoreMachine(StoreMachine):
    """As StoreMachine, with a SingleFlightCache whose scripts suspend and can be held."""

    gate_names = SINGLE_FLIGHT_GATES
    synchronous = False

    def make_cache(self) -> Any:
        cache = GatedSingleFlightCache(self)
        assert isinstance(cache, SingleFlightCache)
        assert not isinstance(cache, RefreshingCache)
        return cache


class RefreshingStoreMachine(StoreMachine):
    """As StoreMachine, with a RefreshingCache (as RedisCache is) that can be held."""

    gate_names = SINGLE_FLIGHT_GATES
    synchronous = False

    def make_cache(self) -> Any:
        cache = GatedRefreshingCache(self)
        assert isinstance(cache, RefreshingCache)
        return cache


def run(machine: type[StoreMachine]) -> None:
    run_state_machine_as_test(machine)


def test_store_machine_with_a_mapping() -> None:
    run(StoreMachine)


def test_store_machine_with_an_async_cache() -> None:
    run(AsyncStoreMachine)


def test_store_machine_with_a_single_flight_cache() -> None:
    run(SingleFlightStoreMachine)


def test_store_machine_with_a_refreshing_cache() -> None:
    run(RefreshingStoreMachine)
