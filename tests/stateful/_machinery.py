"""The model shared by the state machines: computations held by gates, callers, generations.

The machines drive real code (a WorkerQueue, or a function under @worker_queue) on an event
loop they own, one step at a time, and check it against a small model:

- a *computation* is one call of the worker; it starts when the worker is called and waits on its
  own gate until a rule releases it with a success or a failure (or a shutdown cancels it);
- a *caller* is one task awaiting a result; it records the model's clock when it was created;
- per key, a *generation* ends with a failure, an invalidation, an expiry, a clear, a shutdown
  that aborts the computation or a move to another event loop. Within a generation there is at
  most one computation: a computation may only start when no other of its key is running and
  the model holds no cached value for the key.

Every result identifies the computation that produced it: a ``Value`` of its own, an exception
of its own (``ComputationFailed``), or ``None``, which at most one computation of each key
returns (a rule asking a later one for ``None`` gets a ``Value``). No two results of a key
compare equal unless one computation produced them, so a caller's outcome and a cache's entry
tell which computation they came from. The caches of the machines also tell which computation's
task stores each value (``PRODUCER``): a store is attributed to the computation that made it.

Each caller runs as its own tenant: its task sets ``TENANT`` to the caller's number before it
calls. A computation reads the tenant it runs as, which names the caller whose context it was
started in (its *starter*); from that the machines check context isolation and the order in
which computations are admitted.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import inspect
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import (
    INVARIANT_MARKER,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from wq_memo import QueueShutDown, ShutdownTimeout
from wq_memo._nesting import current as running_flight

KEYS = ("a", "b", "c", "d")
keys = st.sampled_from(KEYS)
FINISH_TIMEOUT = 1.0
"""What a close gives unfinished computations, in loop time: the machine's loop skips it."""
TENANT: contextvars.ContextVar[int | None] = contextvars.ContextVar("tenant", default=None)
"""The number of the caller whose context the running code belongs to."""
PRODUCER: contextvars.ContextVar[int | None] = contextvars.ContextVar("producer", default=None)
"""The computation whose task the running code belongs to: set by the worker, read by stores."""


def replay(machine: type[RuleBasedStateMachine], steps: str) -> None:
    """Run steps, as Hypothesis prints a failing example ("decorate(maxsize=1, yielding=False);
    calls(batch=['a'])"), on a new machine, checking every invariant after each rule."""
    invariants = [f for _, f in inspect.getmembers(machine) if getattr(f, INVARIANT_MARKER, None)]
    state = machine()
    try:
        for number, step in enumerate(steps.split(";")):
            call = ast.parse(step.strip(), mode="eval").body
            assert isinstance(call, ast.Call), step
            assert isinstance(call.func, ast.Name), step
            arguments = {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
            getattr(state, call.func.id)(**arguments)
            if number:  # the first step is the machine's initialize rule
                for check in invariants:
                    check(state)
    finally:
        state.teardown()


class FastForwardLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test can move forward, so that no test waits real time."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


class Value:
    """The result of one computation: compared by identity."""

    __slots__ = ("comp_id",)

    def __init__(self, comp_id: int) -> None:
        self.comp_id = comp_id

    def __repr__(self) -> str:
        return f"Value(#{self.comp_id})"


class ComputationFailed(Exception):
    """The failure of one computation: callers must receive this very object."""

    def __init__(self, comp_id: int) -> None:
        super().__init__(f"computation #{comp_id} failed")
        self.comp_id = comp_id


@dataclass(eq=False)
class Computation:
    """One call of the worker, held open by its gate."""

    id: int
    key: str
    started_at: int
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: Value | ComputationFailed | None = None
    released: bool = False
    finished_at: int | None = None
    succeeded: bool = False
    cancelled: bool = False
    cached_time: float = 0.0
    """The fake clock's time when its value was stored (for TTL expiry)."""
    uncached_at: int | None = None
    """Model clock when its value stopped being available (invalidated, expired, not cached)."""
    forgotten: bool = False
    """Invalidated while it ran: its value is never stored, and later calls never get it."""
    unstored: bool = False
    """Its value reaches its callers but is never stored (a single-flight cache refused it)."""
    forget_done: bool = False
    """The invalidation that forgot it has returned: storing its value now is a violation."""
    tenant: int | None = None
    """The tenant it ran as: the number of the caller that started it."""
    slotted: bool = True
    """Whether it counts against maxsize: a computation started by a call from inside
    another one does not (it never waits for a slot)."""
    first: Caller | None = None
    """The caller whose call made its flight (the first caller; None: not made by a caller)."""
    nested: bool = False
    """Its flight was made by a call from inside another computation."""


@dataclass(eq=False)
class Caller:
    """One call awaiting its outcome in a task."""

    id: int
    key: str
    created_at: int
    task: asyncio.Task[Any]
    cancel_requested: bool = False
    checked: bool = False
    joined: Computation | None = None
    """The computation of its key running when it was created: it must join that one."""
    arrived: int | None = None
    """Its place in the order of arrival: when its task first ran and asked for its key."""
    started: Computation | None = None
    """The computation that ran in its context: the one whose outcome it must get."""


class QueueModelMachine(RuleBasedStateMachine):
    """Rules and invariants common to the WorkerQueue and the @worker_queue machines."""

    caches_results: ClassVar[bool] = True
    """Whether a successful result is cached (False: deduplication only)."""
    stored_by_worker: ClassVar[bool] = True
    """Whether the model counts a result as cached when the worker returns it; if not, the
    machine's cache calls ``stored`` when the queue stores it."""
    none_results: ClassVar[bool] = False
    """Whether a computation may return None (the decorator caches None; the queue cannot)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = FastForwardLoop()
        self.clock = 0
        self.phase = "idle"  # "close" or "loop" while a shutdown or a loop change runs
        self.maxsize = 1
        self.comps: list[Computation] = []
        self.active: list[Computation] = []
        self.cached: dict[str, Computation] = {}
        self.storing: dict[str, Computation] = {}
        self.callers: list[Caller] = []
        self.caller_of_task: dict[asyncio.Task[Any], Caller] = {}
        self.violations: list[str] = []
        self.running_now = 0
        self.hits = 0
        self.shutdowns_refused = 0
        self.unstarted_allowance = 0
        self.fake_now = 0.0
        self.instant = False
        """While set, computations finish as soon as they start, with a result."""
        self.yielding = False
        """Whether the cache under test suspends in its operations, as a remote cache would."""
        self.lookup_delay: dict[asyncio.Task[Any] | None, int] = {}
        self.fenced: set[object] = set()
        """Keys whose next computation a single-flight cache will not store."""
        self.arrivals = 0
        self.inner_calls = 0
        """Calls made by computations themselves (counted by the code under test too)."""
        self.last_admitted: Caller | None = None
        """The starter of the latest computation that took a slot."""
        self.none_of: dict[str, Computation] = {}
        """Per key, the one computation that returned None."""
        self.lookup_gate: asyncio.Event | None = None
        """While set, the cache's lookups wait on this gate before they answer (they read at
        once)."""
        self.store_gate: asyncio.Event | None = None
        """While set, the cache's stores wait on this gate before they write."""
        self.lookers: list[Caller] = []
        """The callers whose own lookups reached the lookup gate (not those sharing them)."""
        self.invalidating: list[asyncio.Task[None]] = []
        """Invalidations a rule started while lookups or stores were held."""
        self.making: dict[str, Caller] = {}
        """Per key, the caller about to make its flight (its lookup found neither a value nor a
        flight), until the flight is seen."""
        self.makers: dict[object, Caller] = {}
        """Flights, each with the caller whose call made it."""
        self.firsts_checked = 0

    # -- what a concrete machine provides -------------------------------------------------------

    def call(self, key: str) -> Coroutine[Any, Any, Any]:
        """A coroutine making one call for key through the code under test."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the queue under test."""
        raise NotImplementedError

    def queue_table(self) -> Any:
        """The queue's in-flight table (or None) for the bookkeeping invariant."""
        raise NotImplementedError

    def counters(self) -> tuple[int, int, int] | None:
        """(hits, misses, joined) as the code under test counts them, or None."""
        return None

    def real_cache(self) -> dict[str, Any]:
        """What the cache under test holds now, per key, without counting as a hit."""
        raise NotImplementedError

    def flight_key(self, key: str) -> object:
        """The key of key's flights in the queue's table (None: the machine does not say)."""
        return None

    def looks_up(self) -> bool:
        """Whether the cache under test calls ``about_to_call`` when a caller's lookup misses;
        if not, a call goes straight from its first step to the queue's table."""
        return True

    # -- the event loop -------------------------------------------------------------------------

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def drive(self) -> None:
        """Run the loop until nothing is ready to run: every task is blocked or done."""
        loop = self.loop
        for _ in range(1000):
            loop.call_soon(loop.stop)
            loop.run_forever()
            if not loop._ready:  # type: ignore[attr-defined]
                break
        else:
            raise AssertionError("the event loop never became idle")
        self.check_finished_callers()

    def close_loop(self) -> None:
        """End the machine's loop as asyncio.run() does: cancel what is left, wait, close.

        asyncio.run() cancels the tasks once: a task started meanwhile (a waiting computation
        started when a running one was cancelled, say) would be destroyed pending.
        """
        loop = self.loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        assert not left, f"tasks started while the loop was ending: {left}"

    def teardown(self) -> None:
        if not self.loop.is_closed():
            self.phase = "loop"
            self.close_loop()

    # -- the worker -----------------------------------------------------------------------------

    async def work(self, key: str) -> Value | None:
        """The worker under test: one computation, held until a rule releases it."""
        comp = Computation(len(self.comps), key, self.tick())
        self.comps.append(comp)
        comp.tenant = TENANT.get()
        PRODUCER.set(comp.id)  # read by the stores this computation's task makes
        self.seen_making(key)
        flight = running_flight.get()
        if flight is not None:
            comp.first = self.makers.get(flight)
            comp.nested = flight.parent is not None
        comp.slotted = self.takes_a_slot(comp)
        if any(c.key == key and not c.forgotten for c in self.active):
            self.violations.append(f"{key!r} computed twice at once (computation #{comp.id})")
        stale = self.cached.get(key) or self.storing.get(key)
        if stale is not None and not stale.forgotten:
            self.violations.append(
                f"{key!r} computed again (#{comp.id}) although #{stale.id}'s value is still "
                "cached or being stored"
            )
        self.check_starter(comp)
        if self.phase == "loop":
            self.violations.append(f"{key!r} started (#{comp.id}) while its loop was ending")
        if flight is not None and flight in self.fenced:
            # Its flight was forgotten by an invalidation before its computation began (it
            # claimed the key, or waited for another process): its callers, all of whom called
            # before the invalidation, get its outcome; it is never stored, and no later call
            # gets it.
            self.fenced.discard(flight)
            comp.unstored = comp.forgotten = comp.forget_done = True
            comp.uncached_at = self.tick()
        self.active.append(comp)
        self.running_now += comp.slotted
        if self.running_now > self.maxsize:
            self.violations.append(
                f"{self.running_now} computations running at once, maxsize={self.maxsize}"
            )
        if self.instant:
            self.set_outcome(comp, fail=False, none=False)
        try:
            await self.before_gate(comp)
            await comp.gate.wait()
        except asyncio.CancelledError:
            comp.cancelled = True
            comp.finished_at = self.tick()
            self.active.remove(comp)
            if self.phase not in ("close", "loop"):
                self.violations.append(f"computation #{comp.id} of {key!r} was cancelled")
            raise
        finally:
            self.running_now -= comp.slotted
        if TENANT.get() != comp.tenant:
            self.violations.append(f"computation #{comp.id}'s context changed under it")
        TENANT.set(-1)  # a computation changing its context: its callers must not see it
        comp.finished_at = self.tick()
        self.active.remove(comp)
        if isinstance(comp.outcome, ComputationFailed):
            raise comp.outcome
        comp.succeeded = True
        if comp.unstored:
            comp.uncached_at = comp.finished_at
        elif comp.forgotten:
            pass  # invalidated while it ran: never stored
        elif not self.caches_results:
            comp.uncached_at = comp.finished_at
        elif self.stored_by_worker:
            comp.cached_time = self.fake_now
            self.cached[key] = comp
        else:
            self.storing[key] = comp
        return comp.outcome

    def takes_a_slot(self, comp: Computation) -> bool:
        """Whether comp, starting now, counts against maxsize."""
        return True

    async def before_gate(self, comp: Computation) -> None:
        """What a computation does before it waits on its gate (nothing here)."""

    def check_starter(self, comp: Computation) -> None:
        """Context isolation and FIFO admission, as the starting computation sees them.

        comp runs as the tenant of the caller that started it, whether it starts at once or
        after waiting in line; no caller starts two computations. Computations that take a
        slot start in the order their starters arrived (checked when lookups answer at once:
        a lookup that suspends lets a later caller's item enter the line first).
        """
        tenant = comp.tenant
        where = f"computation #{comp.id} of {comp.key!r}"
        if tenant is None or not 0 <= tenant < len(self.callers):
            self.violations.append(f"{where} ran in no caller's context (tenant {tenant})")
            return
        starter = self.callers[tenant]
        if starter.key != comp.key:
            self.violations.append(
                f"{where} ran in the context of caller #{tenant}, who called {starter.key!r}"
            )
            return
        if starter.started is not None:
            self.violations.append(
                f"{where} ran in the context of caller #{tenant}, who had started "
                f"#{starter.started.id} already"
            )
            return
        starter.started = comp
        if self.yielding or not comp.slotted:
            return
        last = self.last_admitted
        assert starter.arrived is not None
        if last is not None and last.arrived is not None and last.arrived > starter.arrived:
            self.violations.append(
                f"{where} (caller #{tenant}, arrived {starter.arrived}) started after the "
                f"computation of caller #{last.id} (arrived {last.arrived}): admission "
                "order is not arrival order"
            )
        self.last_admitted = starter

    def stored(self, key: str, value: object) -> None:
        """The model's side of the queue storing a result in the machine's cache (called by the
        cache, in the task that stores): the store is attributed to the computation whose task
        makes it, which must be the one the model expects to store key."""
        producer = self.producer(key, value)
        if producer is None:
            return
        if producer.forget_done:
            self.violations.append(
                f"{value!r} stored for {key!r} by computation #{producer.id} after the "
                "invalidation that forgot it had returned"
            )
            return
        expected = self.storing.get(key)
        if expected is not producer:
            self.violations.append(
                f"{value!r} stored for {key!r} by computation #{producer.id}; the model expects "
                f"a store by {expected}"
            )
            return
        del self.storing[key]
        producer.cached_time = self.fake_now
        self.cached[key] = producer

    def stored_now(self, value: object) -> None:
        """A synchronous cache's side of a store (the model counts the value as cached when the
        worker returns it): it must be by the computation the model holds as cached."""
        producer = self.producer(None, value)
        if producer is not None and self.cached.get(producer.key) is not producer:
            self.violations.append(
                f"{value!r} stored for {producer.key!r} by computation #{producer.id}, which "
                f"the model does not hold as cached ({self.cached.get(producer.key)})"
            )

    def producer(self, key: str | None, value: object) -> Computation | None:
        """The computation whose task stores value (for key), or None after a violation."""
        producer_id = PRODUCER.get()
        if producer_id is None:
            self.violations.append(f"{value!r} stored for {key!r} outside any computation")
            return None
        producer = self.comps[producer_id]
        if (key is not None and producer.key != key) or not (
            producer.succeeded and value is producer.outcome
        ):
            self.violations.append(
                f"{value!r} stored for {key!r} by computation #{producer.id} of "
                f"{producer.key!r}, which returned {producer.outcome!r}"
            )
            return None
        return producer

    async def answer_late(self) -> None:
        """A yielding cache's answer travels back: one turn of the loop, more for slow calls,
        and while ``lookup_gate`` is set, not before it opens."""
        task = asyncio.current_task()
        gate = self.lookup_gate
        if gate is not None:
            caller = self.caller_of_task.get(task)  # type: ignore[arg-type]
            if caller is not None:
                self.lookers.append(caller)
            await gate.wait()
        for _ in range(1 + self.lookup_delay.get(task, 0)):
            await asyncio.sleep(0)

    async def store_late(self) -> None:
        """A cache's store on its way: held while ``store_gate`` is set, and one turn of the
        loop for a yielding cache."""
        gate = self.store_gate
        if gate is not None:
            await gate.wait()
        if self.yielding:
            await asyncio.sleep(0)

    forget_refuses_pending_store: ClassVar[bool] = False
    """Whether an invalidation stops a result already on its way to the cache (a single-flight
    cache's store checks the key was not deleted meanwhile); else the invalidation waits for
    that store and then deletes it."""

    def forget(self, key: str) -> list[Computation]:
        """The model's side of an invalidation starting: computations of key under way are
        forgotten. Call ``forgotten_done`` once the invalidation has returned."""
        forgotten = []
        for comp in self.active:
            if comp.key == key:
                if not comp.forgotten:
                    comp.forgotten = True
                    comp.uncached_at = self.tick()
                # Forgotten by an earlier invalidation, maybe still under way: once this one
                # returns too, its value must never be stored.
                forgotten.append(comp)
        pending = self.storing.get(key)
        if pending is not None:
            if not pending.forgotten:
                # Delivered, its store on its way: refused, or awaited and then deleted (its
                # value stays available until the invalidation deletes it: see uncache).
                pending.forgotten = True
                if self.forget_refuses_pending_store:
                    del self.storing[key]
                    pending.uncached_at = self.tick()
            forgotten.append(pending)
        return forgotten

    def forgotten_done(self, comps: list[Computation]) -> None:
        for comp in comps:
            comp.forget_done = True

    def uncache(self, key: str) -> bool:
        """The model's side of an invalidation: the key's generation ends."""
        comp = self.cached.pop(key, None)
        if comp is None:
            return False
        comp.uncached_at = self.tick()
        return True

    # -- callers --------------------------------------------------------------------------------

    def pending(self) -> list[Caller]:
        return [c for c in self.callers if not c.task.done()]

    def start_calls(self, batch: list[str]) -> list[Caller]:
        """Create one caller task per key.

        A caller surely joins a computation of its key under way that is not released: one
        released may end before the caller's first step (awaiting nothing but its gate, or,
        in the recursion machine, only the nested calls it is still making)."""
        started = []
        for key in batch:
            caller_id = len(self.callers)
            task = self.loop.create_task(
                self.as_tenant(caller_id, key), name=f"caller-{caller_id}-{key}"
            )
            caller = Caller(caller_id, key, self.tick(), task)
            if self.phase == "idle":
                joined = next((c for c in self.active if c.key == key and not c.forgotten), None)
                caller.joined = None if joined is None or joined.released else joined
            self.callers.append(caller)
            self.caller_of_task[task] = caller
            started.append(caller)
        return started

    async def as_tenant(self, caller_id: int, key: str) -> Any:
        """One call, made as tenant caller_id; the caller's context must come back unchanged."""
        TENANT.set(caller_id)
        self.arrivals += 1
        self.callers[caller_id].arrived = self.arrivals
        if not self.looks_up():
            self.about_to_call(key)
        try:
            return await self.call(key)
        finally:
            if TENANT.get() != caller_id:
                self.violations.append(f"caller #{caller_id}'s context was changed by its call")

    def about_to_call(self, key: str) -> None:
        """Called by the cache in the task of a caller whose lookup of key missed (or, for a
        machine without lookups, as the call begins): the call goes on to the queue's table
        without suspending, and makes key's flight if there is none."""
        if self.flight_key(key) is None:
            return
        self.seen_making(key)
        try:
            task = asyncio.current_task()
        except RuntimeError:  # the machine itself, looking at the cache
            return
        caller = self.caller_of_task.get(task)  # type: ignore[arg-type]
        if caller is None:
            return
        table = self.queue_table()
        if table is None or table.flights.get(self.flight_key(key)) is None:
            self.making[key] = caller

    def seen_making(self, key: str) -> None:
        """The flight of key that the caller in ``making`` made is in the table now (or was
        never made: the call was refused)."""
        caller = self.making.pop(key, None)
        if caller is None:
            return
        table = self.queue_table()
        if table is None:
            return
        flight = table.flights.get(self.flight_key(key))
        if flight is not None and flight not in self.makers:
            self.makers[flight] = caller

    def record_hit(self) -> None:
        """Called by the cache when a caller's lookup finds a value."""
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return
        if task in self.caller_of_task:
            self.hits += 1

    def check_finished_callers(self) -> None:
        for caller in self.callers:
            if caller.checked or not caller.task.done():
                continue
            caller.checked = True
            self.check_outcome(caller)

    def check_outcome(self, caller: Caller) -> None:
        """A finished caller got exactly the outcome of a computation it could have joined."""
        task = caller.task
        where = f"caller #{caller.id} ({caller.key!r}, created at {caller.created_at})"
        if task.cancelled():
            assert caller.cancel_requested or self.phase == "loop", (
                f"{where} was cancelled although nobody cancelled it"
            )
            return
        assert not caller.cancel_requested, f"{where} ignored its cancellation"
        exc = task.exception()
        started = caller.started
        if started is not None and not isinstance(exc, ShutdownTimeout):
            outcome = exc if exc is not None else task.result()
            assert outcome is started.outcome, (
                f"{where} started computation #{started.id} (it ran in its context) but got "
                f"{outcome!r}, not its outcome {started.outcome!r}"
            )
        joined = caller.joined
        if joined is not None and not isinstance(exc, ShutdownTimeout):
            outcome = exc if exc is not None else task.result()
            assert outcome is joined.outcome, (
                f"{where} joined computation #{joined.id} but got {outcome!r}, "
                f"not its outcome {joined.outcome!r}"
            )
        if exc is None:
            self.check_value(caller, task.result())
        elif isinstance(exc, QueueShutDown):
            assert self.phase == "close", f"{where} got QueueShutDown outside a close: {exc!r}"
            self.shutdowns_refused += 1
        elif isinstance(exc, ShutdownTimeout):
            assert self.phase == "close", f"{where} got ShutdownTimeout outside a close: {exc!r}"
        elif isinstance(exc, ComputationFailed):
            comp = self.comps[exc.comp_id]
            assert comp.key == caller.key, f"{where} got the failure of #{comp.id} ({comp.key!r})"
            assert comp.outcome is exc, f"{where} got another exception than #{comp.id} raised"
            assert comp.finished_at is not None
            assert caller.created_at < comp.finished_at, (
                f"{where} got the failure of #{comp.id}, which had failed before the call "
                f"(at {comp.finished_at}): a failure was remembered"
            )
        else:
            raise AssertionError(f"{where} got an unexpected exception: {exc!r}") from exc

    def check_value(self, caller: Caller, value: object) -> None:
        where = f"caller #{caller.id} ({caller.key!r}, created at {caller.created_at})"
        if isinstance(value, Value):
            assert 0 <= value.comp_id < len(self.comps), f"{where} got a value of no computation"
            comp = self.comps[value.comp_id]
            assert comp.outcome is value, f"{where} got a value #{comp.id} never returned"
        else:
            assert value is None, f"{where} got {value!r}"
            assert self.none_results, f"{where} got None, which no computation returns"
            found = self.none_of.get(caller.key)
            assert found is not None, f"{where} got None, which no computation of its key returned"
            comp = found
        assert comp.key == caller.key, f"{where} got the value of #{comp.id} ({comp.key!r})"
        assert comp.succeeded, f"{where} got the value of #{comp.id}, which has not returned"
        assert comp.uncached_at is None or caller.created_at < comp.uncached_at, (
            f"{where} got the value of #{comp.id}, which had stopped being available before "
            f"the call (at {comp.uncached_at})"
        )

    # -- rules ----------------------------------------------------------------------------------

    @rule(batch=st.lists(keys, min_size=1, max_size=6))
    def calls(self, batch: list[str]) -> None:
        """Start several concurrent calls (each one a task), and let them run."""
        self.start_calls(batch)
        self.drive()

    @precondition(lambda self: self.active)
    @rule(pick=st.integers(0, 7), fail=st.booleans(), none=st.booleans())
    def release(self, pick: int, fail: bool, none: bool) -> None:
        """Let one held computation finish, with a result or a failure."""
        comp = self.active[pick % len(self.active)]
        self.set_outcome(comp, fail, none)
        self.drive()

    @precondition(lambda self: self.active)
    @rule(pick=st.integers(0, 7), fail=st.booleans(), batch=st.lists(keys, min_size=1, max_size=4))
    def release_while_calling(self, pick: int, fail: bool, batch: list[str]) -> None:
        """Let a computation finish while new calls come in, in the same turn of the loop."""
        comp = self.active[pick % len(self.active)]
        self.set_outcome(comp, fail, False)
        self.start_calls(batch)
        self.drive()

    @precondition(lambda self: self.active)
    @rule(pick=st.integers(0, 7), fail=st.booleans(), stream=st.lists(keys, min_size=1, max_size=5))
    def release_into_a_stream(self, pick: int, fail: bool, stream: list[str]) -> None:
        """Let a computation finish while newcomers keep arriving, one per turn of the loop:
        the callers already waiting for its slot must not be overtaken."""
        comp = self.active[pick % len(self.active)]
        self.set_outcome(comp, fail, False)
        for key in stream:
            self.start_calls([key])
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()
        self.drive()

    @precondition(lambda self: self.yielding)
    @rule(batch=st.lists(st.tuples(keys, st.integers(0, 2)), min_size=2, max_size=4))
    def calls_with_slow_lookups(self, batch: list[tuple[str, int]]) -> None:
        """Concurrent calls whose lookups answer after different delays; computations started
        meanwhile finish at once, so a result may be stored while a lookup is on its way."""
        self.instant = True
        callers = self.start_calls([key for key, _ in batch])
        for caller, (_, delay) in zip(callers, batch, strict=True):
            self.lookup_delay[caller.task] = delay
        self.drive()
        self.instant = False

    def set_outcome(self, comp: Computation, fail: bool, none: bool) -> None:
        if fail:
            comp.outcome = ComputationFailed(comp.id)
        elif none and self.none_results and comp.key not in self.none_of:
            comp.outcome = None
            self.none_of[comp.key] = comp
        else:
            comp.outcome = Value(comp.id)
        comp.released = True
        comp.gate.set()

    @precondition(lambda self: self.pending())
    @rule(picks=st.lists(st.integers(0, 15), min_size=1, max_size=3))
    def cancel(self, picks: list[int]) -> None:
        """Cancel some waiting callers: their computations and the other callers carry on."""
        pending = self.pending()
        for pick in picks:
            caller = pending[pick % len(pending)]
            caller.cancel_requested = True
            caller.task.cancel()
        self.drive()

    @rule(
        release=st.lists(st.integers(0, 7), max_size=3),
        fail=st.booleans(),
        during=st.lists(keys, max_size=2),
    )
    def close(self, release: list[int], fail: bool, during: list[str]) -> None:
        """Close the queue with computations in flight; some finish in time, the rest are aborted.

        Calls made while it closes are refused. A computation whose gate stays shut outlives
        finish_timeout, so its callers get ShutdownTimeout.
        """
        self.shut_down(release, fail, during)

    def shut_down(
        self,
        release: list[int],
        fail: bool,
        during: list[str],
        opening: asyncio.Event | None = None,
        store_held: bool = False,
    ) -> None:
        """The close rule; ``opening``, a gate that opens once the queue has begun to close
        (held lookups or stores then go on while it closes); ``store_held``: the store gate
        stays shut past finish_timeout, so that the store is cancelled by the shutdown."""
        self.phase = "close"
        self.allow_unstarted()
        closing = self.loop.create_task(self.aclose())
        self.drive()
        refused = []
        if not closing.done():
            for caller in self.start_calls(during):
                self.drive()
                refused.append(caller)
        if opening is not None:
            opening.set()
            self.drive()
        # Refused at once, or (sharing a held lookup) as soon as it answers.
        waiting = [c for c in refused if not c.task.done()]
        assert not waiting, f"a call made while the queue closes waits: {waiting}"
        to_release = (
            dict.fromkeys(self.active[i % len(self.active)] for i in release) if self.active else {}
        )
        for comp in to_release:
            self.set_outcome(comp, fail, False)
        self.drive()
        if not closing.done():
            # Only the finish_timeout timer is left: jump to it rather than wait.
            self.loop.offset += FINISH_TIMEOUT
            self.loop.run_until_complete(asyncio.wait_for(closing, 5))
        self.drive()
        if store_held:
            # Cancelled on their way by the shutdown: those values are never stored.
            for comp in self.storing.values():
                comp.uncached_at = self.tick()
            self.storing.clear()
        assert not self.pending(), f"callers still waiting after aclose(): {self.pending()}"
        assert not self.active, f"computations still running after aclose(): {self.active}"
        self.phase = "idle"

    stores_suspend: ClassVar[bool] = False
    """Whether the cache under test stores through coroutines, which ``store_gate`` can hold."""

    invalidation_forgets_lookups: ClassVar[bool] = True
    """Whether an invalidation stops later calls sharing a lookup under way (not with a bare
    WorkerQueue, which has no invalidation: its machine edits the cache behind its back)."""

    def start_invalidation(self, key: str | None) -> asyncio.Task[None] | None:
        """Invalidate key (None: clear the cache) as the machine's invalidate or clear rule
        does; an invalidation that awaits runs in the returned task."""
        raise NotImplementedError

    def land(self, action: str, pick: int, pending: list[Caller], key: str) -> None:
        """Land a rule while lookups or stores are held: cancel one of ``pending``, invalidate
        key or clear (waiting for the invalidation only as far as it goes without them)."""
        if action == "cancel":
            if pending:
                caller = pending[pick % len(pending)]
                caller.cancel_requested = True
                caller.task.cancel()
        else:
            task = self.start_invalidation(key if action == "invalidate" else None)
            if task is not None:
                self.invalidating.append(task)
        self.drive()

    @precondition(lambda self: self.yielding)
    @rule(
        batch=st.lists(keys, min_size=1, max_size=4),
        action=st.sampled_from(["cancel", "invalidate", "clear", "close"]),
        pick=st.integers(0, 7),
        after=st.lists(keys, max_size=3),
    )
    def while_looking_up(self, batch: list[str], action: str, pick: int, after: list[str]) -> None:
        """Calls whose lookups are held on their way back (callers of a key share the lookup
        under way); meanwhile the caller that started a lookup is cancelled, its key is
        invalidated, the cache is cleared or the queue closed. Calls come in (``after``)
        before the lookups answer: they must not share one an invalidation overtook."""
        gate = self.lookup_gate = asyncio.Event()
        self.lookers = []
        try:
            self.start_calls(batch)
            self.drive()
            if action == "close":
                self.lookup_gate = None  # calls made while it closes are refused at once
                self.shut_down([], False, after, opening=gate)
                return
            lookers = [c for c in self.lookers if not c.task.done()]
            if not self.invalidation_forgets_lookups:
                action = "cancel"
            self.land(action, pick, lookers, batch[pick % len(batch)])
            self.start_calls(after)
            self.drive()
            assert all(not c.task.done() for c in lookers if not c.cancel_requested), (
                "a lookup answered before its gate opened"
            )
        finally:
            gate.set()
            self.lookup_gate = None
        self.drive()
        self.invalidations_returned()

    @precondition(lambda self: self.active and self.stores_suspend)
    @rule(
        pick=st.integers(0, 7),
        none=st.booleans(),
        action=st.sampled_from(["cancel", "invalidate", "clear", "close", "close-held"]),
        after=st.lists(keys, max_size=3),
    )
    def while_storing(self, pick: int, none: bool, action: str, after: list[str]) -> None:
        """A computation returns and its store is held on its way; meanwhile a caller waiting
        (with a single-flight cache, for that store) is cancelled, the key is invalidated, the
        cache is cleared or the queue closed (the store goes on while it closes, or, held past
        finish_timeout, is cancelled). Calls come in before the store lands."""
        comp = self.active[pick % len(self.active)]
        gate = self.store_gate = asyncio.Event()
        try:
            self.set_outcome(comp, fail=False, none=none)
            self.drive()
            if action.startswith("close"):
                held = action == "close-held"
                self.shut_down([], False, after, None if held else gate, store_held=held)
                return
            self.land(action, pick, self.pending(), comp.key)
            self.start_calls(after)
            self.drive()
        finally:
            gate.set()
            self.store_gate = None
        self.drive()
        self.invalidations_returned()

    def invalidations_returned(self) -> None:
        for task in self.invalidating:
            assert task.done(), "an invalidation never returned"
            task.result()
        self.invalidating = []

    def allow_unstarted(self) -> None:
        """Accepted items a close or a loop change may drop unstarted: the line, or with a
        single-flight cache every computation that waits for a slot."""
        self.fenced.clear()  # the flights that claimed them are dropped
        table = self.queue_table()
        self.unstarted_allowance += max(self.maxsize, table.live if table is not None else 0)

    @rule()
    def new_loop(self) -> None:
        """Move on to a fresh event loop, as a second asyncio.run() would; the cache stays."""
        self.allow_unstarted()
        self.phase = "loop"
        self.close_loop()
        self.check_finished_callers()
        assert not self.active
        self.loop = FastForwardLoop()
        self.phase = "idle"

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def no_violation_seen_by_the_worker(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def the_table_is_consistent(self) -> None:
        table = self.queue_table()
        if table is not None:
            table.check()

    @invariant()
    def each_computation_runs_in_its_first_callers_context(self) -> None:
        """The caller whose call made a computation's flight is the tenant it runs as, whether
        it starts at once or after waiting in line, and whatever lookups did meanwhile."""
        for comp in self.comps[self.firsts_checked :]:
            where = f"computation #{comp.id} of {comp.key!r}"
            if comp.nested or self.flight_key(comp.key) is None:
                continue
            assert comp.first is not None, f"{where} was made by no caller the model saw"
            assert comp.tenant == comp.first.id, (
                f"{where} ran as tenant {comp.tenant}, not in the context of caller "
                f"#{comp.first.id}, whose call made it"
            )
        self.firsts_checked = len(self.comps)

    @invariant()
    def a_free_slot_leaves_nobody_waiting(self) -> None:
        """With fewer than maxsize computations running, every waiting caller has one running."""
        if len(self.active) >= self.maxsize:
            return

        def served(caller: Caller) -> bool:
            return any(
                c.key == caller.key
                and (
                    not c.forgotten
                    or (c.uncached_at is not None and caller.created_at < c.uncached_at)
                )
                for c in self.active
            )

        stuck = [c for c in self.pending() if not served(c)]
        assert not stuck, (
            f"{len(self.active)} of {self.maxsize} slots busy, yet callers wait for nothing "
            f"running: {[(c.id, c.key) for c in stuck]} (a lost wake-up)"
        )

    @invariant()
    def no_bookkeeping_when_idle(self) -> None:
        table = self.queue_table()
        if table is not None:
            assert len(table.accepted()) <= self.maxsize, f"accepted items exceed maxsize: {table}"
            assert table.running <= self.maxsize
        if self.pending() or self.active or table is None:
            return
        assert not table.flights, f"nothing in flight, yet the table keeps {table.flights}"
        in_line, _, asking = table.lines()
        assert not in_line, f"nothing in flight, yet items wait: {table.slots}"
        assert table.running == 0, f"nothing in flight, yet running={table.running}"
        assert table.live == 0, f"nothing in flight, yet {table.live} flights are live"
        assert not asking, f"nothing in flight, yet computations wait: {table.slots}"

    @invariant()
    def cache_agrees_with_the_model(self) -> None:
        real = self.real_cache()
        expected = {k: c.outcome for k, c in self.cached.items()}
        assert real.keys() == expected.keys(), f"cache holds {real}, model expects {expected}"
        for k, v in real.items():
            assert v is expected[k], f"cache holds {v!r} for {k!r}, model expects {expected[k]!r}"

    @invariant()
    def counters_agree_with_the_model(self) -> None:
        counted = self.counters()
        if counted is None:
            return
        hits, misses, joined = counted
        started = len(self.comps)
        done = [c for c in self.callers if c.task.done()]
        # Every call that got an outcome other than a refusal was counted once.
        attached = [
            c
            for c in done
            if not c.task.cancelled() and not isinstance(c.task.exception(), QueueShutDown)
        ]
        # Callers sharing another caller's lookup count a hit without asking the cache.
        assert hits >= self.hits, f"hits={hits}, but callers found {self.hits} cached values"
        table = self.queue_table()
        # Items in line, and (single-flight caches) computations started that wait for a slot.
        waiting = len(table.accepted()) + table.lines()[2] if table is not None else 0
        # Items whose callers all left before they started count as misses too.
        dropped = table.counts.total("dropped") if table is not None else 0
        assert started <= misses - dropped <= started + waiting + self.unstarted_allowance, (
            f"misses={misses}, of which {dropped} were dropped unstarted, but {started} "
            f"computations started, {waiting} wait for a slot and at most "
            f"{self.unstarted_allowance} accepted items were dropped unstarted"
        )
        known_joins = sum(c.joined is not None for c in self.callers)
        assert joined >= known_joins, f"joined={joined}, but {known_joins} calls surely joined"
        total = hits + misses + joined
        made = len(self.callers) + self.inner_calls
        assert len(attached) <= total <= made - self.shutdowns_refused, (
            f"hits+misses+joined={total}, but {made} calls were made, "
            f"{len(attached)} got an outcome and {self.shutdowns_refused} were refused"
        )
