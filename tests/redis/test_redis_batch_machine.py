"""A model-based test of @worker_queue.batch with a RedisCache, against a real Redis.

Two RedisCaches on one namespace stand for two processes, each with its own batch function (of
the same name, so that they share keys). Callers in either process load keys; each call of a
batch function waits on its gate until a rule answers it, per key, with a value, a failure (an
exception as the value) or no value at all, or makes the whole call raise. Other rules
invalidate, prime or clear through either process, end the lease of a key a batch is computing
(its lock is gone), or cancel callers. The machine owns its event loop and runs it after each
rule until the fleet is still: no batch waits to start, every batch running in either process is
a call of its batch function waiting for its answer (its claims and its stores answered), and
every caller is in one or waits for a key whose lock in Redis a running batch of the other
process holds. That state does not depend on timing, and no rule's draws or preconditions
depend on which process won a race for a key (a rule with nothing to act on does nothing), so
runs replay the same under any load. The lease and the wait are long enough never to end on
their own.

Per key, a *generation* ends with an invalidation, a prime, a clear, a lease that ends, or a
computation that fails. Checked after every step:

- at most one computation of a key per generation, in the whole fleet: a key another process
  computes is waited for, never sent again (and once its holder gives up, one process takes it);
- fencing: a value in Redis comes from the current generation (a computation of it, or the
  prime that began it): a batch whose key was invalidated, primed, cleared, or whose lease
  ended, never stores that key's value, and its other keys are stored all the same;
- a value computed in the current generation is in Redis once a caller has it;
- every caller gets an outcome of its own key: from a computation of its own process, or from
  the other process's computation that was current when it ended (or a prime).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

pytest.importorskip("redis.asyncio")

from redis_names import delete_namespace

from wq_memo import worker_queue
from wq_memo._batch import batches_now, holdings_now
from wq_memo._batch import check as check_batches
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import KeyNames, key_names
from wq_memo.backends._redis_values import BadEntry, ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

SECRET = b"b" * 32
KEYS = ("a", "b", "c")
PROCESSES = (0, 1)
NAME = "m.batch"
PLANS = ("value", "fail", "missing")


class Value:
    """The result of one computation (or prime); pickled into Redis, so compared by id."""

    __slots__ = ("comp_id",)

    def __init__(self, comp_id: int) -> None:
        self.comp_id = comp_id

    def __repr__(self) -> str:
        return f"Value(#{self.comp_id})"


class Failed(Exception):
    """The failure of one computation (given as its key's value)."""

    def __init__(self, comp_id: int) -> None:
        super().__init__(f"computation #{comp_id} failed")
        self.comp_id = comp_id


class WholeFailed(Exception):
    """A call of a batch function that raised, for every key of it."""

    def __init__(self, call_id: int) -> None:
        super().__init__(f"batch #{call_id} failed")
        self.call_id = call_id


@dataclass(eq=False)
class Computation:
    """One key of one call of a batch function (or a prime)."""

    id: int
    key: str
    process: int
    generation: int
    call: Call | None
    outcome: str | None = None
    """The plan it was answered with (None: not yet); "prime" for a prime."""
    current_at_end: bool = False
    """Whether its generation was still current when it was answered."""


@dataclass(eq=False)
class Call:
    id: int
    process: int
    comps: list[Computation]
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    whole: bool = False


@dataclass(eq=False)
class Caller:
    id: int
    key: str
    process: int
    task: asyncio.Task[Any]
    checked: bool = False


class RedisBatchMachine(RuleBasedStateMachine):
    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.namespace = f"wq_memo_test_batch_machine_{uuid.uuid4().hex[:12]}"
        self.caches = [
            RedisCache(self.url, namespace=self.namespace, secret=SECRET, lease=600, wait=3600)
            for _ in PROCESSES
        ]
        self.codec = ValueCodec(SECRET)
        self.generation = dict.fromkeys(KEYS, 0)
        self.comps: list[Computation] = []
        self.calls: list[Call] = []
        self.callers: list[Caller] = []
        self.computed: dict[tuple[str, int], Computation] = {}
        self.violations: list[str] = []
        self.loads: list[Any] = []

    @initialize(max_batch=st.integers(1, 3), first=st.permutations(KEYS))
    def decorate(self, max_batch: int, first: list[str]) -> None:
        """Both processes, with the first keys loaded by both (so that one waits for the other
        from the start)."""
        for process in PROCESSES:
            load = worker_queue.batch(
                cache=self.caches[process], name=NAME, maxsize=16, max_batch=max_batch
            )(self.batch_function(process))
            self.loads.append(load)
        self.load_keys([(0, first[0]), (0, first[1]), (1, first[1]), (1, first[0])])

    def names(self, key: str) -> KeyNames:
        return key_names(self.namespace, CallKey(NAME, key))

    # -- the batch functions -----------------------------------------------------------------------

    def batch_function(self, process: int) -> Any:
        async def load(keys: list[str]) -> dict[str, Any]:
            call = Call(len(self.calls), process, [])
            self.calls.append(call)
            if len(set(keys)) != len(keys):
                self.violations.append(f"a key sent twice in one batch: {keys}")
            for key in keys:
                comp = Computation(len(self.comps), key, process, self.generation[key], call)
                self.comps.append(comp)
                call.comps.append(comp)
                previous = self.computed.get((key, comp.generation))
                if previous is not None:
                    self.violations.append(
                        f"{key!r} computed twice in generation {comp.generation}: #{previous.id} "
                        f"(process {previous.process}) and #{comp.id} (process {process})"
                    )
                self.computed[(key, comp.generation)] = comp
            await call.gate.wait()
            if call.whole:
                raise WholeFailed(call.id)
            answer: dict[str, Any] = {}
            for comp in call.comps:
                if comp.outcome == "value":
                    answer[comp.key] = Value(comp.id)
                elif comp.outcome == "fail":
                    answer[comp.key] = Failed(comp.id)
            return answer

        return load

    # -- running the loop --------------------------------------------------------------------------

    def waiting(self, process: int, key: str) -> bool:
        """Whether a computation of key in process waits for news of it (none received)."""
        sub = self.caches[process]._subscriptions.current
        if sub is None or sub.dead:
            return False
        ch = sub._channels.get(self.names(key).channel)
        return ch is not None and any(w.waiting and not w.event.is_set() for w in ch.watches)

    async def settled(self) -> bool:
        holdings = []
        for process, load in enumerate(self.loads):
            gathered, waiting, running = batches_now(load)
            if gathered or waiting:
                return False  # a batch has yet to start
            calls = sum(1 for c in self.calls if c.process == process and not c.gate.is_set())
            if running != calls:
                return False  # a batch claims, or stores and unlocks, or ends
            holdings.append(holdings_now(load))
        computing = {
            (c.process, comp.key) for c in self.calls if not c.gate.is_set() for comp in c.comps
        }
        client = self.caches[0]._conn.link().client
        for caller in self.callers:
            if caller.task.done():
                continue
            process, key = where = (caller.process, caller.key)
            if where in computing:
                continue
            if not self.waiting(*where):
                return False
            lock = self.names(key).lock
            if (lock, await client.get(lock)) not in holdings[1 - process]:
                return False  # the holder is done: the waiter is about to hear of it
        return True

    def settle(self) -> None:
        """Run the loop until the fleet is still (see the module docstring)."""

        async def still() -> None:
            async with asyncio.timeout(20):
                # Polled: the state spans two processes' batches, pub/sub and Redis itself.
                while not await self.settled():  # noqa: ASYNC110
                    await asyncio.sleep(0.001)

        try:
            self.loop.run_until_complete(still())
        except TimeoutError:
            raise AssertionError("the callers never settled") from None
        for caller in self.callers:
            if caller.task.done() and not caller.checked:
                caller.checked = True
                self.check_caller(caller)

    def check_caller(self, caller: Caller) -> None:
        where = f"caller #{caller.id} ({caller.key!r}, process {caller.process})"
        if caller.task.cancelled():
            return
        exc = caller.task.exception()
        if exc is not None:
            if isinstance(exc, Failed):
                comp = self.comps[exc.comp_id]
                assert comp.key == caller.key, f"{where} got #{comp.id}'s failure"
                assert comp.process == caller.process, f"{where} got a failure from elsewhere"
            elif isinstance(exc, WholeFailed):
                call = self.calls[exc.call_id]
                assert call.process == caller.process, f"{where} got a failure from elsewhere"
                assert caller.key in [c.key for c in call.comps], f"{where} got {exc!r}"
            elif isinstance(exc, KeyError):
                assert repr(caller.key) in str(exc), f"{where} got {exc!r}"
            else:
                raise AssertionError(f"{where} raised {exc!r}") from exc
            return
        value = caller.task.result()
        assert isinstance(value, Value), f"{where} got {value!r}"
        comp = self.comps[value.comp_id]
        assert comp.key == caller.key, f"{where} got #{comp.id}, a value of {comp.key!r}"
        if comp.process != caller.process and comp.outcome != "prime":
            assert comp.current_at_end, (
                f"{where} got #{comp.id} from process {comp.process}, whose generation had "
                "ended before it was stored"
            )

    def end_generation(self, key: str) -> None:
        self.generation[key] += 1

    # -- rules -------------------------------------------------------------------------------------

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from(PROCESSES), st.sampled_from(KEYS)), min_size=1, max_size=5
        )
    )
    def load(self, batch: list[tuple[int, str]]) -> None:
        """Concurrent callers in either process (one turn of the loop: batched together)."""
        self.load_keys(batch)

    def load_keys(self, batch: list[tuple[int, str]]) -> None:
        for process, key in batch:
            task = self.loop.create_task(self.loads[process](key))
            self.callers.append(Caller(len(self.callers), key, process, task))
        self.settle()

    def running(self) -> list[Call]:
        return [c for c in self.calls if not c.gate.is_set()]

    @rule(
        pick=st.integers(0, 9),
        plans=st.lists(st.sampled_from(PLANS), min_size=3, max_size=3),
        whole=st.booleans(),
    )
    def answer(self, pick: int, plans: list[str], whole: bool) -> None:
        """A call of a batch function ends: per key a value, a failure or nothing; or it
        raises."""
        running = self.running()
        if not running:
            return
        call = running[pick % len(running)]
        call.whole = whole and pick % 3 == 0
        for comp, plan in zip(call.comps, plans, strict=False):
            comp.outcome = "fail" if call.whole else plan
            comp.current_at_end = comp.generation == self.generation[comp.key]
            if comp.outcome != "value" and comp.current_at_end:
                self.end_generation(comp.key)  # nothing stored: someone computes it anew
        call.gate.set()
        self.settle()

    @rule(process=st.sampled_from(PROCESSES), key=st.sampled_from(KEYS))
    def invalidate(self, process: int, key: str) -> None:
        """acache_invalidate(key) in either process, perhaps while a batch computes it."""
        self.end_generation(key)
        self.loop.run_until_complete(self.loads[process].acache_invalidate(key))
        self.settle()

    @rule(process=st.sampled_from(PROCESSES), key=st.sampled_from(KEYS))
    def prime(self, process: int, key: str) -> None:
        """acache_prime(value, key) in either process, perhaps while a batch computes it."""
        self.end_generation(key)
        comp = Computation(len(self.comps), key, process, self.generation[key], None, "prime")
        self.comps.append(comp)
        self.loop.run_until_complete(self.loads[process].acache_prime(Value(comp.id), key))
        self.settle()

    @rule(process=st.sampled_from(PROCESSES))
    def clear(self, process: int) -> None:
        """acache_clear() in either process, perhaps while batches compute."""
        for key in KEYS:
            self.end_generation(key)
        self.loop.run_until_complete(self.loads[process].acache_clear())
        self.settle()

    def holding(self) -> list[Computation]:
        return [
            comp
            for call in self.running()
            for comp in call.comps
            if comp.generation == self.generation[comp.key]
        ]

    @rule(pick=st.integers(0, 9))
    def lease_ends(self, pick: int) -> None:
        """The lease of a key a batch computes runs out (the batch stalled): Redis drops its
        lock. Waiters would notice when the lease ends; here they are told at once."""
        holding = self.holding()
        if not holding:
            return
        comp = holding[pick % len(holding)]
        names = self.names(comp.key)
        self.end_generation(comp.key)

        async def expire() -> None:
            link = self.caches[0]._conn.link()
            await link.client.delete(names.lock)
            await link.client.publish(names.channel, b"x")

        self.loop.run_until_complete(expire())
        self.settle()

    @rule(pick=st.integers(0, 9), keys=st.lists(st.sampled_from(KEYS), max_size=2))
    def load_held_elsewhere(self, pick: int, keys: list[str]) -> None:
        """Callers in one process load a key a batch of the other computes (with others)."""
        holding = self.holding()
        if not holding:
            return
        comp = holding[pick % len(holding)]
        process = 1 - comp.process
        for key in [comp.key, *keys]:
            task = self.loop.create_task(self.loads[process](key))
            self.callers.append(Caller(len(self.callers), key, process, task))
        self.settle()

    @rule(pick=st.integers(0, 9))
    def cancel(self, pick: int) -> None:
        """A caller leaves."""
        pending = [c for c in self.callers if not c.task.done()]
        if not pending:
            return
        pending[pick % len(pending)].task.cancel()
        self.settle()

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def no_violations(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def batches_hold(self) -> None:
        for load in self.loads:
            check_batches(load)

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
            if value is None:
                for caller in self.callers:
                    if caller.key != key or not caller.checked or caller.task.cancelled():
                        continue
                    got = caller.task.exception() or caller.task.result()
                    if isinstance(got, Value):
                        comp = self.comps[got.comp_id]
                        assert comp.generation != self.generation[key], (
                            f"#{comp.id}, current, reached caller #{caller.id} but is not stored"
                        )
                continue
            assert isinstance(value, Value), value
            comp = self.comps[value.comp_id]
            assert comp.key == key
            assert comp.generation == self.generation[key], (
                f"{key!r} holds #{comp.id} of generation {comp.generation}; the current "
                f"generation is {self.generation[key]}"
            )

    def teardown(self) -> None:
        loop = self.loop
        for call in self.calls:  # let every batch end
            if not call.gate.is_set():
                for comp in call.comps:
                    comp.outcome = "value"
                call.gate.set()
        try:
            tasks = [c.task for c in self.callers]
            if tasks:
                loop.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
                )
            for load in self.loads:
                loop.run_until_complete(load.queue.aclose())
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


@pytest.mark.timeout(240)
def test_batch_machine_with_redis(redis_url: str) -> None:
    RedisBatchMachine.url = redis_url
    run_state_machine_as_test(
        RedisBatchMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=20,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
