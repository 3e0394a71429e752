"""A model-based test of RedisCache's single flight against a real Redis.

Two RedisCaches on one namespace stand for two processes. Callers call ``get_or_compute`` on
either; each call's computation waits on a gate of its own until a rule releases it with a
value, a failure or a value that cannot be stored. Other rules delete a key, clear the
namespace, or end a holder's lease while it computes. The machine owns its event loop and runs
it after each rule until every caller is either computing or waiting for another's computation.

Per key, a *generation* ends with a delete, a clear, a lease that ends, a failure or a value that
is not stored. Checked after every step:

- fencing: a value in Redis comes from the current generation: a computation that lost its lock,
  or whose key was deleted or cleared, never stores;
- at most one computation per key per generation computes under the lock;
- every caller gets the value (or the failure) of a computation of its key that succeeded
  before its generation ended, or that it computed itself;
- a value computed under the lock, not fenced, is in Redis once its caller has it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

pytest.importorskip("redis.asyncio")

from redis_names import delete_namespace

from wq_memo.backends import CallKey
from wq_memo.backends._redis_flight import SingleFlight
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import BadEntry, ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

SECRET = b"m" * 32
KEYS = ("a", "b", "c")
PROCESSES = (0, 1)
ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("role", default="?")
"""How the current call computes: "hold" (under the lock) or "alone" (without it)."""


class Value:
    """The result of one computation; pickled into Redis, so compared by id."""

    __slots__ = ("comp_id",)

    def __init__(self, comp_id: int) -> None:
        self.comp_id = comp_id

    def __repr__(self) -> str:
        return f"Value(#{self.comp_id})"


class Failed(Exception):
    """The failure of one computation."""

    def __init__(self, comp_id: int) -> None:
        super().__init__(f"computation #{comp_id} failed")
        self.comp_id = comp_id


class Unstorable:
    """A result that cannot be pickled, hence is never stored."""

    def __init__(self, comp_id: int) -> None:
        self.comp_id = comp_id

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


@dataclass(eq=False)
class Computation:
    id: int
    key: str
    process: int
    caller: int
    role: str
    generation: int
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: object = None
    done: bool = False
    fenced: bool = False
    """Its key was deleted or cleared, or its lease ended, while it computed."""
    ended_at: int | None = None
    """Model clock when its value stopped being current (a later generation began)."""


@dataclass(eq=False)
class Caller:
    id: int
    key: str
    process: int
    created_at: int
    task: asyncio.Task[Any]
    comp: Computation | None = None
    checked: bool = False


async def _held(comp: Computation) -> object:
    await comp.gate.wait()
    if isinstance(comp.outcome, Failed):
        raise comp.outcome
    return comp.outcome


class RedisFlightMachine(RuleBasedStateMachine):
    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.namespace = f"wq_memo_test_machine_{uuid.uuid4().hex[:12]}"
        self.caches = [
            RedisCache(self.url, namespace=self.namespace, secret=SECRET, lease=5, wait=30)
            for _ in PROCESSES
        ]
        self.codec = ValueCodec(SECRET)
        self.clock = itertools.count(1)
        self.now = 0
        self.generation = dict.fromkeys(KEYS, 0)
        self.comps: list[Computation] = []
        self.callers: list[Caller] = []
        self.holders: dict[tuple[str, int], Computation] = {}
        self.lost = [0 for _ in PROCESSES]
        self.violations: list[str] = []
        self._patches = (SingleFlight._hold, SingleFlight._alone)
        hold, alone = self._patches

        async def hold_with_role(flight: SingleFlight, *args: Any) -> Any:
            ROLE.set("hold")
            return await hold(flight, *args)

        async def alone_with_role(flight: SingleFlight, *args: Any) -> Any:
            ROLE.set("alone")
            return await alone(flight, *args)

        SingleFlight._hold = hold_with_role  # type: ignore[method-assign,assignment]
        SingleFlight._alone = alone_with_role  # type: ignore[method-assign,assignment]

    def tick(self) -> int:
        self.now = next(self.clock)
        return self.now

    def names(self, key: str) -> KeyNames:
        return key_names(self.namespace, CallKey("m.f", (key,)))

    # -- running the loop ------------------------------------------------------------------

    def compute_for(self, caller_id: int, key: str, process: int) -> Callable[[], Awaitable[Any]]:
        async def compute() -> Any:
            role = ROLE.get()
            comp = Computation(len(self.comps), key, process, caller_id, role, self.generation[key])
            self.comps.append(comp)
            self.callers[caller_id].comp = comp
            if role == "hold":
                previous = self.holders.get((key, comp.generation))
                if previous is not None:
                    self.violations.append(
                        f"{key!r} computed twice under the lock in generation "
                        f"{comp.generation}: #{previous.id} and #{comp.id}"
                    )
                self.holders[(key, comp.generation)] = comp
            try:
                return await _held(comp)
            finally:
                comp.done = True

        return compute

    def waiting(self, process: int, key: str) -> int:
        sub = self.caches[process]._subscriptions.current
        if sub is None or sub.dead:
            return 0
        ch = sub._channels.get(self.names(key).channel)
        return 0 if ch is None else sum(w.waiting for w in ch.watches)

    def settled(self) -> bool:
        pending: dict[tuple[int, str], int] = {}
        for caller in self.callers:
            if caller.task.done():
                continue
            comp = caller.comp
            if comp is not None and not comp.gate.is_set():
                continue  # computing, held by its gate
            pending[(caller.process, caller.key)] = pending.get((caller.process, caller.key), 0) + 1
        return all(self.waiting(p, k) == n for (p, k), n in pending.items())

    def settle(self) -> None:
        """Run the loop until every caller computes or waits, and nothing moved for 20 ms."""
        deadline = time.monotonic() + 15
        quiet: float | None = None
        while True:
            self.loop.run_until_complete(asyncio.sleep(0.002))
            if not self.settled():
                quiet = None
            elif quiet is None:
                quiet = time.monotonic()
            elif time.monotonic() - quiet >= 0.02:
                break
            assert time.monotonic() < deadline, "the callers never settled"
        for caller in self.callers:
            if caller.task.done() and not caller.checked:
                caller.checked = True
                self.check_caller(caller)

    def check_caller(self, caller: Caller) -> None:
        where = f"caller #{caller.id} ({caller.key!r}, process {caller.process})"
        exc = caller.task.exception()
        if exc is not None:
            if not isinstance(exc, Failed):
                raise AssertionError(f"{where} raised {exc!r}") from exc
            comp = self.comps[exc.comp_id]
            assert comp.caller == caller.id, f"{where} got another call's failure #{comp.id}"
            return
        value = caller.task.result()
        assert isinstance(value, Value | Unstorable), f"{where} got {value!r}"
        comp = self.comps[value.comp_id]
        assert comp.key == caller.key, f"{where} got #{comp.id}, a value of {comp.key!r}"
        if comp.caller == caller.id:
            return  # its own computation
        assert isinstance(value, Value), f"{where} got another call's unstorable #{comp.id}"
        assert comp.role == "hold", f"{where} got #{comp.id}, computed without the lock"
        assert comp.ended_at is None or caller.created_at < comp.ended_at, (
            f"{where} (created at {caller.created_at}) got #{comp.id}, whose generation had "
            f"ended at {comp.ended_at}"
        )

    def end_generation(self, key: str) -> None:
        self.generation[key] += 1
        now = self.tick()
        for comp in self.comps:
            if comp.key == key and comp.ended_at is None:
                comp.ended_at = now
                if not comp.done and comp.role == "hold":
                    comp.fenced = True

    # -- rules -----------------------------------------------------------------------------

    @rule(batch=st.lists(st.tuples(st.sampled_from(PROCESSES), st.sampled_from(KEYS)), max_size=5))
    def calls(self, batch: list[tuple[int, str]]) -> None:
        """Concurrent calls from either process."""
        for process, key in batch:
            caller_id = len(self.callers)
            coro = self.caches[process].get_or_compute(
                CallKey("m.f", (key,)), self.compute_for(caller_id, key, process)
            )
            task = self.loop.create_task(coro)
            self.callers.append(Caller(caller_id, key, process, self.tick(), task))
        self.settle()

    def running(self) -> list[Computation]:
        return [c for c in self.comps if not c.gate.is_set()]

    @precondition(lambda self: self.running())
    @rule(pick=st.integers(0, 9), outcome=st.sampled_from(["value", "failure", "unstorable"]))
    def release(self, pick: int, outcome: str) -> None:
        """One computation finishes, with a value, a failure, or a value that is not stored."""
        comp = self.running()[pick % len(self.running())]
        if outcome == "value":
            comp.outcome = Value(comp.id)
        elif outcome == "failure":
            comp.outcome = Failed(comp.id)
        else:
            comp.outcome = Unstorable(comp.id)
        if comp.role == "hold" and outcome != "value" and not comp.fenced:
            self.end_generation(comp.key)
        if comp.role == "hold" and comp.fenced and outcome == "value":
            self.lost[comp.process] += 1
        comp.gate.set()
        self.settle()

    @rule(process=st.sampled_from(PROCESSES), key=st.sampled_from(KEYS))
    def delete(self, process: int, key: str) -> None:
        """delete() of a key, perhaps while it is computed."""
        self.end_generation(key)
        self.loop.run_until_complete(self.caches[process].delete(CallKey("m.f", (key,))))
        self.settle()

    @rule(process=st.sampled_from(PROCESSES))
    def clear(self, process: int) -> None:
        """clear() of the namespace, perhaps while keys are computed."""
        for key in KEYS:
            self.end_generation(key)
        self.loop.run_until_complete(self.caches[process].clear())
        self.settle()

    def holding(self) -> list[Computation]:
        return [c for c in self.running() if c.role == "hold" and not c.fenced]

    @precondition(lambda self: self.holding())
    @rule(pick=st.integers(0, 9))
    def lease_ends(self, pick: int) -> None:
        """A holder's lease runs out while it computes (it stalled): Redis drops its lock.
        Waiters would notice when the lease ends; here they are told at once."""
        comp = self.holding()[pick % len(self.holding())]
        names = self.names(comp.key)
        self.end_generation(comp.key)

        async def expire() -> None:
            link = self.caches[0]._conn.link()
            await link.client.delete(names.lock)
            await link.client.publish(names.channel, b"x")

        self.loop.run_until_complete(expire())
        self.settle()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_violations(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def stored_values_are_current(self) -> None:
        async def read(key: str) -> Any:
            data = await self.caches[0]._conn.link().client.get(self.names(key).value)
            if data is None:
                return None
            assert isinstance(data, bytes)
            return self.codec.loads(self.names(key).value, data)

        for key in KEYS:
            try:
                value = self.loop.run_until_complete(read(key))
            except BadEntry as exc:
                raise AssertionError(f"{key!r} holds a refused entry: {exc}") from exc
            latest = self.holders.get((key, self.generation[key]))
            if value is None:
                if latest is not None and latest.done and isinstance(latest.outcome, Value):
                    caller = self.callers[latest.caller]
                    assert not caller.task.done(), f"#{latest.id}'s value was not stored"
                continue
            assert isinstance(value, Value), value
            comp = self.comps[value.comp_id]
            assert comp.key == key
            assert not comp.fenced, f"{key!r} holds #{comp.id}, which was fenced"
            assert comp.generation == self.generation[key], (
                f"{key!r} holds #{comp.id} of generation {comp.generation}; the current "
                f"generation is {self.generation[key]}"
            )

    @invariant()
    def lost_locks_are_counted(self) -> None:
        for process, cache in enumerate(self.caches):
            if all(c.done for c in self.comps if c.process == process and c.fenced):
                assert cache.stats().lock_lost == self.lost[process]

    def teardown(self) -> None:
        SingleFlight._hold, SingleFlight._alone = self._patches  # type: ignore[method-assign]
        loop = self.loop
        for comp in self.comps:  # let every computation end
            if not comp.gate.is_set():
                comp.outcome = Value(comp.id)
                comp.gate.set()
        try:
            tasks = [c.task for c in self.callers]
            if tasks:
                loop.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
                )
            for cache in self.caches:
                loop.run_until_complete(cache.aclose())
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            delete_namespace(self.url, self.namespace)


@pytest.mark.timeout(180)
def test_single_flight_machine(redis_url: str) -> None:
    RedisFlightMachine.url = redis_url
    run_state_machine_as_test(
        RedisFlightMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=15,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
