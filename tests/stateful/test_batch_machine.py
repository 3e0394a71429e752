"""Model-based test of worker_queue.batch: calls, batches finishing in any order, per-key
failures, missing keys, cancellations, invalidations, primes, clears and closes; the batch
function reverses the list of keys it is given, and answers with a mapping or a sequence.

The machine predicts every batch: the keys of one rule's calls (one turn of the loop) that start
a load go, in the order of their first callers, into batches of at most ``max_batch`` keys,
opened by the first caller of their first key; batches start in the order they were made, at
most ``maxsize`` at once, leaving out the keys whose callers have all left. Each call of the
batch function is held by its gate until a rule answers it; every answer names the call that
made it (a ``Value`` or an exception of its own), so that an outcome tells where it came from.

Checked: each call of the batch function is the batch the model predicts (its keys, each once,
none under way in another batch unless invalidated meanwhile, its opener's context); at most
``maxsize`` run; every caller gets its key's outcome from the batch that loaded it for that
caller (or the cached value, or ShutdownTimeout from a close); the cache holds exactly the
values the model stored; the counts agree.

``BatchPolicyMachine`` runs the same rules with cache_if, a ttl per value, cache_errors and
stale_if_error on a fake clock: each key of a batch is kept or refused (``uncached``), dated,
remembered (an exception as its value, the batch function's own for every key, a missing key's
KeyError) or served its expired value (``stale``) on its own, and a key invalidated, primed or
cleared while its batch runs keeps, remembers and serves nothing of it. After every step the
cache's dated entries, ``cache_peek`` and ``cache_info()`` match the model, and every hit is
the value, or the remembered error rebuilt, of the batch call that produced it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

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

from wq_memo import MISSING, CachedError, Memoized, ShutdownTimeout, worker_queue
from wq_memo._batch import check as check_batches
from wq_memo._policy import Kept

from . import test_policy_machine as policy_model
from ._machinery import (
    FINISH_TIMEOUT,
    KEYS,
    TENANT,
    ComputationFailed,
    FastForwardLoop,
    Value,
    keys,
)

OUTCOMES = ("value", "fail", "stop", "missing", "error")
"""What a batch answers for one key: a value, an exception as the value (a StopIteration, which
its callers get as a RuntimeError), no entry at all, or (for every key) the batch function
raises."""


class Remembered(TimeoutError):
    """A failure of a type the policy machine names in cache_errors: (key or "batch", the
    number of the call of the batch function that raised it)."""


class KindValue(Value):
    """A value whose kind says what the policy machine's cache_if and ttl make of it."""

    __slots__ = ("kind",)

    def __init__(self, comp_id: int, kind: str) -> None:
        super().__init__(comp_id)
        self.kind = kind

    def __repr__(self) -> str:
        return f"Value(#{self.comp_id}:{self.kind})"


@dataclass(eq=False)
class Call:
    """One call of the batch function, held by its gate."""

    id: int
    keys: list[str]
    tenant: int | None
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    plan: dict[str, str] = field(default_factory=dict)
    whole: str | None = None
    """"error": the batch function raises; "short": it returns too few values."""
    values: dict[str, Value] = field(default_factory=dict)
    failures: dict[str, BaseException] = field(default_factory=dict)
    cancelled: bool = False
    finished: bool = False


@dataclass(eq=False)
class Flight:
    """The model of one key's load: its callers, the batch it is in."""

    key: str
    callers: list[Caller] = field(default_factory=list)
    forgotten: bool = False
    outcome: tuple[str, Any] | None = None
    """("value", Value) or ("raise", exception) or ("missing", None) once delivered."""


@dataclass(eq=False)
class Batch:
    """The model of one batch: its flights in order, its opener, its call once it runs."""

    opener: int
    flights: list[Flight] = field(default_factory=list)
    call: Call | None = None


@dataclass(eq=False)
class Caller:
    id: int
    key: str
    task: asyncio.Task[Any]
    hit: tuple[str, Any] | None = None
    """("value", Value) or ("error", (type, args)): the fresh entry it was answered from."""
    flight: Flight | None = None
    cancel_requested: bool = False
    checked: bool = False


class BatchMachine(RuleBasedStateMachine):
    """Drives a batch function with a dict for cache on a loop the machine owns."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = FastForwardLoop()
        self.calls_made: list[Call] = []
        self.unmatched: deque[Call] = deque()
        self.callers: list[Caller] = []
        self.live: dict[str, Flight] = {}
        self.line: deque[Batch] = deque()
        self.running: list[Batch] = []
        self.cached: dict[str, Value] = {}
        self.violations: list[str] = []
        self.values = 0
        self.hits = self.misses = self.joined = self.batches = 0
        self.closing = False

    @initialize(maxsize=st.integers(1, 3), max_batch=st.integers(1, 4))
    def decorate(self, maxsize: int, max_batch: int) -> None:
        self.maxsize = maxsize
        self.max_batch = max_batch
        self.cache: dict[str, Value] = {}
        self.load = worker_queue.batch(
            maxsize=maxsize, max_batch=max_batch, cache=self.cache, finish_timeout=FINISH_TIMEOUT
        )(self.batch_function)

    # -- the batch function ------------------------------------------------------------------------

    async def batch_function(self, batch_keys: list[str]) -> Any:
        call = Call(len(self.calls_made), list(batch_keys), TENANT.get())
        self.calls_made.append(call)
        self.unmatched.append(call)
        if len(set(batch_keys)) != len(batch_keys):
            self.violations.append(f"a key sent twice in one batch: {batch_keys}")
        under_way = [c for c in self.calls_made if not c.finished and not c.cancelled]
        if len(under_way) > self.maxsize:
            self.violations.append(f"{len(under_way)} batches at once, maxsize={self.maxsize}")
        batch_keys.reverse()  # the list is the function's own (as a query may sort it)
        try:
            await call.gate.wait()
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            call.finished = True
        if call.whole == "error":
            raise call.failures[""]
        if call.whole == "short":
            return [call.values.get(k) for k in batch_keys][:-1]
        if all(call.plan[k].startswith("value") for k in call.keys):
            return [call.values[k] for k in call.keys]  # aligned with the keys as given
        answer: dict[str, Any] = {}
        for k in batch_keys:
            how = call.plan[k]
            if how.startswith("value"):
                answer[k] = call.values[k]
            elif how in ("fail", "stop", "remembered"):
                answer[k] = call.failures[k]
        return answer

    # -- the loop ----------------------------------------------------------------------------------

    def drive(self) -> None:
        loop = self.loop
        for _ in range(1000):
            loop.call_soon(loop.stop)
            loop.run_forever()
            if not loop._ready:  # type: ignore[attr-defined]
                break
        else:
            raise AssertionError("the event loop never became idle")

    def teardown(self) -> None:
        loop = self.loop
        if loop.is_closed():
            return
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    # -- the model ---------------------------------------------------------------------------------

    async def as_tenant(self, caller_id: int, key: str) -> Any:
        TENANT.set(caller_id)
        try:
            return await self.load(key)
        finally:
            if TENANT.get() != caller_id:
                self.violations.append(f"caller #{caller_id}'s context was changed by its call")

    def admit(self) -> None:
        """Start the batches in line while there is room, as the model says they start."""
        while self.line and len(self.running) < self.maxsize:
            batch = self.line.popleft()
            kept = []
            for flight in batch.flights:
                if any(not c.task.done() for c in flight.callers):
                    kept.append(flight)
                else:  # every caller left: left out, and forgotten
                    flight.forgotten = True
                    if self.live.get(flight.key) is flight:
                        del self.live[flight.key]
            batch.flights = kept
            if not kept:
                continue
            if not self.unmatched:
                self.violations.append(f"batch {[f.key for f in kept]} never sent")
                continue
            call = self.unmatched.popleft()
            batch.call = call
            self.batches += 1
            expected = [f.key for f in kept]
            if call.keys != expected:
                self.violations.append(f"call #{call.id} sent {call.keys}, expected {expected}")
            if call.tenant != batch.opener:
                self.violations.append(
                    f"call #{call.id} ran as caller #{call.tenant}, opened by #{batch.opener}"
                )
            for other in self.running:
                for flight in other.flights:
                    if flight.key in call.keys and not flight.forgotten:
                        self.violations.append(
                            f"{flight.key!r} sent in call #{call.id} while under way in "
                            f"call #{other.call.id if other.call else None}"
                        )
            self.running.append(batch)

    def check_sent(self) -> None:
        if self.unmatched:
            self.violations.append(f"calls the model did not expect: {list(self.unmatched)}")
            self.unmatched.clear()

    def forget(self, key: str) -> None:
        flight = self.live.pop(key, None)
        if flight is not None:
            flight.forgotten = True

    # What the cache holds, in the model: overridden by the policy machine, whose entries are
    # dated, kept or not per result, remembered errors and stale values.

    def hit(self, key: str) -> tuple[str, Any] | None:
        """What a call of key is answered with from the cache (None: it loads)."""
        return ("value", self.cached[key]) if key in self.cached else None

    def settle(self, key: str, outcome: tuple[str, Any]) -> tuple[str, Any]:
        """A live (not forgotten) load of key ended with outcome: what the cache keeps of it,
        and what its callers get."""
        if outcome[0] == "value":
            self.cached[key] = outcome[1]
        return outcome

    def remove(self, key: str) -> bool:
        """An invalidation of key: whether the cache held an entry for it."""
        return self.cached.pop(key, None) is not None

    def primed(self, key: str, value: Value) -> None:
        self.cached[key] = value

    def cleared(self) -> None:
        self.cached.clear()

    # -- rules -------------------------------------------------------------------------------------

    @rule(batch=st.lists(keys, min_size=1, max_size=6))
    def calls(self, batch: list[str]) -> None:
        """Calls made in one turn of the loop."""
        made: Batch | None = None
        for key in batch:
            caller_id = len(self.callers)
            task = self.loop.create_task(self.as_tenant(caller_id, key))
            caller = Caller(caller_id, key, task)
            self.callers.append(caller)
            caller.hit = self.hit(key)
            if caller.hit is not None:
                self.hits += 1
                continue
            flight = self.live.get(key)
            if flight is None:
                flight = self.live[key] = Flight(key)
                self.misses += 1
                if made is None or len(made.flights) == self.max_batch:
                    made = Batch(caller_id)
                    self.line.append(made)
                made.flights.append(flight)
            else:
                self.joined += 1
            flight.callers.append(caller)
            caller.flight = flight
        self.drive()
        self.admit()
        self.check_sent()

    @precondition(lambda self: self.running)
    @rule(
        pick=st.integers(0, 7),
        plan=st.lists(st.sampled_from(OUTCOMES), min_size=4, max_size=4),
        short=st.booleans(),
    )
    def answer(self, pick: int, plan: list[str], short: bool) -> None:
        """One running batch answers: per key a value, an exception, nothing; or it raises."""
        self.respond(pick, plan, short)

    def respond(self, pick: int, plan: list[str], short: bool) -> None:
        """The running batch pick answers as plan says for its keys in order: "value" (or
        "value:kind"), "fail", "stop", "remembered" (an exception as the value), "missing";
        "error" or "down" anywhere in plan: the batch function raises (a ComputationFailed,
        or a Remembered); short: it returns too few values."""
        batch = self.running.pop(pick % len(self.running))
        call = batch.call
        assert call is not None
        outcomes: dict[str, tuple[str, Any]] = {}
        whole = next((how for how in plan if how in ("error", "down")), None)
        if whole is not None or short:
            call.whole = "error" if whole is not None else "short"
            failure: Exception = (
                Remembered("batch", call.id) if whole == "down" else ComputationFailed(call.id)
            )
            call.failures[""] = failure
            for k in call.keys:
                call.values[k] = self.new_value("value")
                outcomes[k] = ("raise", failure) if call.whole == "error" else ("short", None)
        else:
            for k, how in zip(call.keys, plan, strict=False):
                call.plan[k] = how
                if how.startswith("value"):
                    call.values[k] = value = self.new_value(how)
                    outcomes[k] = ("value", value)
                elif how in ("fail", "remembered"):
                    call.failures[k] = failure = (
                        Remembered(k, call.id)
                        if how == "remembered"
                        else ComputationFailed(call.id)
                    )
                    outcomes[k] = ("raise", failure)
                elif how == "stop":
                    call.failures[k] = stop = StopIteration(call.id)
                    outcomes[k] = ("stop", stop)
                else:
                    outcomes[k] = ("missing", None)
        call.gate.set()
        for flight in batch.flights:
            if self.live.get(flight.key) is flight:
                del self.live[flight.key]
                flight.outcome = self.settle(flight.key, outcomes[flight.key])
            else:
                flight.outcome = outcomes[flight.key]
        self.drive()
        self.admit()
        self.check_sent()

    def new_value(self, how: str) -> Value:
        """A value of its own; "value:kind" gives it the kind the policy machine reads."""
        self.values += 1
        if ":" in how:
            return KindValue(self.values, how.split(":", 1)[1])
        return Value(self.values)

    @precondition(lambda self: any(not c.task.done() for c in self.callers))
    @rule(picks=st.lists(st.integers(0, 15), min_size=1, max_size=3), whole_key=st.booleans())
    def cancel(self, picks: list[int], whole_key: bool) -> None:
        """Some callers leave (``whole_key``: every caller of their keys); their keys' batches
        go on for the others, and a batch not started yet leaves out a key nobody waits for."""
        pending = [c for c in self.callers if not c.task.done()]
        chosen = {pending[pick % len(pending)] for pick in picks}
        if whole_key:
            left = {c.key for c in chosen}
            chosen = {c for c in pending if c.key in left}
        for caller in chosen:
            caller.cancel_requested = True
            caller.task.cancel()
        self.drive()
        self.check_sent()

    @rule(key=keys, use_async=st.booleans())
    def invalidate(self, key: str, use_async: bool) -> None:
        """Invalidation wins: the batch under way for key does not store it."""
        if use_async:
            removed = self.loop.run_until_complete(self.load.acache_invalidate(key))
        else:
            removed = self.load.cache_invalidate(key)
        assert removed == self.remove(key)
        self.forget(key)
        self.drive()

    @rule(key=keys, use_async=st.booleans())
    def prime(self, key: str, use_async: bool) -> None:
        """A prime wins over the batch under way for key."""
        self.prime_with(key, self.new_value("value"), use_async)

    def prime_with(self, key: str, value: Value, use_async: bool) -> None:
        if use_async:
            self.loop.run_until_complete(self.load.acache_prime(value, key))
        else:
            self.load.cache_prime(value, key)
        self.primed(key, value)
        self.forget(key)
        self.drive()

    @rule(use_async=st.booleans())
    def clear(self, use_async: bool) -> None:
        if use_async:
            self.loop.run_until_complete(self.load.acache_clear())
        else:
            self.load.cache_clear()
        self.cleared()
        for key in list(self.live):
            self.forget(key)
        self.hits = self.misses = self.joined = self.batches = 0
        self.drive()

    @rule()
    def close(self) -> None:
        """Close with batches under way: nothing answers, so finish_timeout aborts them."""
        closing = self.loop.create_task(self.load.queue.aclose())
        self.drive()
        if not closing.done():
            self.loop.offset += FINISH_TIMEOUT
            self.loop.run_until_complete(asyncio.wait_for(closing, 5))
        self.drive()
        for batch in self.running:
            assert batch.call is not None
            if not batch.call.cancelled:
                self.violations.append(f"call #{batch.call.id} outlived the shutdown")
        for batch in [*self.running, *self.line]:
            for flight in batch.flights:
                flight.forgotten = True
                flight.outcome = ("shutdown", None)
        self.running.clear()
        self.line.clear()
        self.live.clear()
        assert not [c for c in self.callers if not c.task.done()], "callers left after aclose()"
        self.check_sent()

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def no_violation(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def every_caller_gets_its_keys_outcome(self) -> None:
        for caller in self.callers:
            if caller.checked or not caller.task.done():
                continue
            caller.checked = True
            task = caller.task
            if caller.cancel_requested and task.cancelled():
                continue
            assert not task.cancelled(), f"caller #{caller.id} cancelled by nobody"
            error = task.exception()
            result = None if error is not None else task.result()
            if caller.hit is not None:
                how, what = caller.hit
                if how == "value":
                    assert result is what, (caller, result, error)
                else:  # a remembered error, raised anew: the same type and arguments
                    kind, args = what
                    assert type(error) is kind, (caller, error, what)
                    assert error is not None
                    if args is None:  # a missing key's KeyError
                        assert repr(caller.key) in str(error), error
                    else:
                        assert error.args == args, (caller, error, what)
                continue
            flight = caller.flight
            assert flight is not None
            assert flight.outcome is not None, f"caller #{caller.id} answered before its batch"
            how, what = flight.outcome
            if how == "value":
                assert result is what, (caller, result, error, what)
            elif how == "raise":
                assert error is what, (caller, error, what)
            elif how == "stop":
                assert isinstance(error, RuntimeError), (caller, error)
                assert error.__cause__ is what, (caller, error, what)
            elif how == "missing":
                assert isinstance(error, KeyError), (caller, error)
                assert repr(caller.key) in str(error), error
            elif how == "short":
                assert isinstance(error, ValueError), (caller, error)
                assert "batch_function" in str(error), error
            else:
                assert isinstance(error, ShutdownTimeout), (caller, error)

    @invariant()
    def the_cache_holds_what_the_model_stored(self) -> None:
        assert set(self.cache) == set(self.cached), (self.cache, self.cached)
        for key, value in self.cached.items():
            assert self.cache[key] is value, (key, self.cache[key], value)

    @invariant()
    def the_counts_agree(self) -> None:
        info = self.load.cache_info()
        got = (info.hits, info.misses, info.joined, info.batches)
        assert got == (self.hits, self.misses, self.joined, self.batches), got

    @invariant()
    def the_batches_are_consistent(self) -> None:
        check_batches(self.load)
        assert len(self.running) <= self.maxsize


def test_batch_machine() -> None:
    run_state_machine_as_test(BatchMachine)


# -- the per-result policy, per key ----------------------------------------------------------------

TTLS: dict[str, float | None] = {"short": 3.0, "long": 20.0, "forever": None, "bad": -1.0}
"""A value's kind -> what ttl(value) returns; a "skip" value fails cache_if, a "zero" one is kept
no time (a prime of it removes the key's entry, as an invalidation does)."""
UNKEPT = ("skip", "bad", "zero")
REMEMBER = 2.0
"""How long a Remembered is remembered."""
REMEMBER_MISSING = 1.0
"""How long a missing key's KeyError is remembered."""
STALE = 30.0
BACKOFF = 2.0
POLICY_OUTCOMES = (
    "value:short",
    "value:long",
    "value:short",
    "value:long",
    "value:forever",
    "value:skip",
    "value:bad",
    "value:zero",
    "fail",
    "remembered",
    "stop",
    "missing",
)
"""What a batch answers for one key under the policy (a value kept for a while twice as likely
as the others): a value of a kind, an exception as the value (a ComputationFailed, never
remembered; a Remembered), a StopIteration, no entry (a KeyError, remembered)."""
WHOLE = ("each", "each", "error", "down", "short")
"""What the batch function does as a whole: answers each key ("each", twice as likely), raises a
ComputationFailed ("error") or a Remembered ("down"), or returns too few values ("short")."""


def keep(value: Value) -> bool:
    return getattr(value, "kind", None) != "skip"


def ttl_of(value: Value) -> float | None:
    kind = getattr(value, "kind", "forever")
    return 0.0 if kind == "zero" else TTLS[kind]


@dataclass
class Entry:
    """The model's entry of a key: a value, or a remembered error (its type and args; args
    None for a missing key's KeyError, whose message the library writes)."""

    value: Value | None
    error: tuple[type[Exception], tuple[Any, ...] | None] | None
    expires: float
    until: float
    warned: bool = False


class BatchPolicyMachine(BatchMachine):
    """The batch machine with cache_if, a ttl per value, cache_errors and stale_if_error, on a
    fake clock, with a dict or an LRUCache: each key of a batch is kept, dated, remembered or
    served stale on its own, and invalidation wins per key."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.entries: dict[str, Entry] = {}
        self.uncached = self.stale = 0

    @initialize(
        maxsize=st.integers(1, 3),
        max_batch=st.integers(1, 4),
        mapping=st.sampled_from(["dict", "lru"]),
    )
    def decorate(self, maxsize: int, max_batch: int, mapping: str) -> None:
        self.maxsize = maxsize
        self.max_batch = max_batch
        self.cache: Any = {} if mapping == "dict" else cachetools.LRUCache(1000)
        self.load = worker_queue.batch(
            maxsize=maxsize,
            max_batch=max_batch,
            cache=self.cache,
            finish_timeout=FINISH_TIMEOUT,
            cache_if=keep,
            ttl=ttl_of,
            cache_errors={Remembered: REMEMBER, KeyError: REMEMBER_MISSING},
            stale_if_error=STALE,
            refresh_backoff=BACKOFF,
            timer=lambda: self.now,
        )(self.batch_function)

    # -- the model ---------------------------------------------------------------------------------

    def fresh(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        return entry if entry is not None and self.now < entry.expires else None

    def hit(self, key: str) -> tuple[str, Any] | None:
        entry = self.fresh(key)
        if entry is None:
            return None
        if entry.error is not None:
            return ("error", entry.error)
        return ("value", entry.value)

    def settle(self, key: str, outcome: tuple[str, Any]) -> tuple[str, Any]:
        how, what = outcome
        old = self.entries.get(key)
        assert old is None or old.expires <= self.now, f"{key!r} loaded with a fresh entry {old}"
        if how == "value":
            kind = what.kind
            if kind in UNKEPT:
                self.uncached += 1
            else:
                ttl = TTLS[kind]
                expires = math.inf if ttl is None else self.now + ttl
                self.entries[key] = Entry(what, None, expires, expires + STALE)
            return outcome
        if old is not None and old.error is None and old.expires <= self.now < old.until:
            # The key's load failed within the window: its callers get the expired value,
            # and the next attempt waits BACKOFF.
            again = min(self.now + BACKOFF, old.until)
            self.entries[key] = Entry(old.value, None, again, old.until, True)
            self.stale += 1
            return ("value", old.value)
        if how == "raise" and isinstance(what, Remembered):
            expires = self.now + REMEMBER
            self.entries[key] = Entry(None, (Remembered, what.args), expires, expires)
        elif how == "missing":
            expires = self.now + REMEMBER_MISSING
            self.entries[key] = Entry(None, (KeyError, None), expires, expires)
        return outcome

    def remove(self, key: str) -> bool:
        return self.entries.pop(key, None) is not None

    def primed(self, key: str, value: Value) -> None:
        ttl = ttl_of(value)
        if ttl == 0:  # kept no time: the key's entry goes, as at an invalidation
            self.entries.pop(key, None)
            return
        expires = math.inf if ttl is None else self.now + ttl
        self.entries[key] = Entry(value, None, expires, expires + STALE)

    def cleared(self) -> None:
        self.entries.clear()
        self.uncached = self.stale = 0

    # -- rules -------------------------------------------------------------------------------------

    @precondition(lambda self: self.running)
    @rule(
        pick=st.integers(0, 7),
        plan=st.lists(st.sampled_from(POLICY_OUTCOMES), min_size=4, max_size=4),
        whole=st.sampled_from(WHOLE),
    )
    def answer(self, pick: int, plan: list[str], whole: str) -> None:
        """One running batch answers: per key a value of a kind, an exception, nothing; or it
        raises, or returns too few values."""
        failing = [whole] if whole in ("error", "down") else []
        self.respond(pick, plan + failing, whole == "short")

    @rule(key=keys, use_async=st.booleans(), kind=st.sampled_from(["short", "long", "zero"]))
    def prime(self, key: str, use_async: bool, kind: str) -> None:
        """A prime takes the ttl of its value, whatever cache_if says; kept no time, it removes
        the key's entry; it wins over the batch under way for key."""
        self.prime_with(key, self.new_value(f"value:{kind}"), use_async)

    @rule(
        batch=st.lists(keys, min_size=1, max_size=6),
        later=st.sampled_from([0.0, 0.0, 1.0, 2.5, 5.0]),
    )
    def calls(self, batch: list[str], later: float) -> None:
        """Calls made in one turn of the loop, ``later`` seconds after the previous step (the
        clock moves with the calls, so that entries expire between the calls of most runs)."""
        self.now += later
        super().calls(batch)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 12.0, 40.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(key=keys, later=st.sampled_from([0.0, 1.0, STALE - 0.5, STALE]))
    def expire(self, key: str, later: float) -> None:
        """The clock moves to key's expiry (or that much later: within the stale window, at
        its end), so that its next load is one that may serve it stale."""
        entry = self.entries.get(key)
        if entry is not None and self.now < entry.expires < math.inf:
            self.now = entry.expires + later

    # -- invariants --------------------------------------------------------------------------------

    @staticmethod
    def same_error(
        error: CachedError, expected: tuple[type[Exception], tuple[Any, ...] | None], key: str
    ) -> bool:
        kind, args = expected
        if error.type is not kind:
            return False
        if args is None:  # a missing key's KeyError, its message naming the key
            return repr(key) in str(error.args)
        return error.args == args

    @invariant()
    def the_cache_holds_what_the_model_stored(self) -> None:
        if not hasattr(self, "load"):
            return
        assert set(self.cache) == set(self.entries), (dict(self.cache), self.entries)
        for key, entry in self.entries.items():
            kept = self.cache[key]
            assert type(kept) is Kept, (key, kept)
            if entry.error is None:
                assert kept.error is None, (key, kept, entry)
                assert kept.value is entry.value, (key, kept, entry)
            else:
                assert kept.error is not None, (key, kept, entry)
                assert self.same_error(kept.error, entry.error, key), (key, kept, entry)
            dates = (kept.expires, kept.until, kept.warned)
            assert dates == (entry.expires, entry.until, entry.warned), (key, kept, entry)

    @invariant()
    def peek_agrees_with_the_model(self) -> None:
        if not hasattr(self, "load"):
            return
        for key in KEYS:
            entry = self.fresh(key)
            peeked = self.load.cache_peek(key)
            if entry is None:
                assert peeked is MISSING, (key, peeked)
            elif entry.error is None:
                assert peeked is entry.value, (key, peeked, entry)
            else:
                assert isinstance(peeked, CachedError), (key, peeked, entry)
                assert self.same_error(peeked, entry.error, key), (key, peeked, entry)

    @invariant()
    def the_counts_agree(self) -> None:
        if not hasattr(self, "load"):
            return
        info = self.load.cache_info()
        got = (info.hits, info.misses, info.joined, info.batches, info.uncached, info.stale)
        expected = (self.hits, self.misses, self.joined, self.batches, self.uncached, self.stale)
        assert got == expected, (got, expected)


def test_batch_policy_machine() -> None:
    run_state_machine_as_test(BatchPolicyMachine)


class BatchRefreshingPolicyMachine(policy_model.RefreshingPolicyMachine):
    """The policy machine with refresh_after (tests/stateful/test_policy_machine.py) over a
    batch function with every option: each key of a batch is computed by the model's ``work``
    (its failure becomes the key's exception value), so that a key's entry, its due time by its
    own lifetime, a refresh's result under the policy (refused: the entry stays; failing: the
    fresh value stays, nothing remembered) and a stale value's back-off are checked per key as
    for a memoized function. ``many`` calls several keys at once: those found due are refreshed
    together, in one background batch."""

    def make(self) -> Memoized[[str], str]:
        self.numbers: dict[str, int] = {}

        async def load_batch(keys: list[str]) -> dict[str, Any]:
            answers: dict[str, Any] = {}
            for k in keys:
                self.numbers[k] = self.made
                try:
                    answers[k] = await self.work(k)
                except (policy_model.Remembered, policy_model.Plain) as exc:
                    answers[k] = exc
            return answers

        self.load = worker_queue.batch(
            cache=cachetools.LRUCache(100),
            cache_if=policy_model.keep,
            ttl=self.ttl_of,
            cache_errors={policy_model.Remembered: policy_model.REMEMBER},
            stale_if_error=policy_model.STALE,
            refresh_backoff=policy_model.BACKOFF,
            refresh_after=policy_model.REFRESH_AFTER,
            timer=lambda: self.now,
        )(load_batch)
        return self.load  # type: ignore[return-value]

    def flight_key(self, key: str) -> Hashable:
        return key

    @rule(
        batch=st.lists(policy_model.keys, min_size=1, max_size=3, unique=True),
        outcome=st.sampled_from(["short", "long", "forever", "skip", "remembered", "plain"]),
        step=st.integers(0, 4),
    )
    def many(self, batch: list[str], outcome: str, step: int) -> None:
        """Several keys at once, a little later, when each holds a fresh value: each is a hit,
        and those found due are refreshed in one background batch, each under the policy."""
        later = self.now + self.later[step]
        entries = [self.entries.get(k) for k in batch]
        if any(e is None or e.error is not None or later >= e.expires for e in entries):
            return
        self.now = later
        before = len(self.computed)
        due = [k for k in batch if self.now >= self.due.get(k, math.inf)]
        expected = [self.entries[k].value for k in batch]
        for k in batch:
            self.plans[k] = [outcome]
        got = self.run(self.load.many(batch))
        assert got == expected, f"got {got!r}, the model says {expected!r}"
        self.counts["hits"] += len(batch)
        table = self.load.queue._engine.table
        flights = {} if table is None else table.flights
        assert table is not None or not due, f"{due} were due, yet no refresh started"
        self.until(
            lambda: len(self.computed) == before + len(due) and not any(k in flights for k in due)
        )
        assert sorted(self.computed[before:]) == sorted(due), (self.computed[before:], due)
        for k in due:
            self.counts["refreshes"] += 1
            self.due[k] = self.now + self.backoff
            if outcome in ("remembered", "plain"):
                self.counts["refresh_failures"] += 1
                continue
            ttl = self.ttls.get(outcome)
            if outcome == "skip" or (ttl is not None and ttl < 0):
                self.counts["uncached"] += 1
            else:
                self.keep_value(k, f"{k}#{self.numbers[k]}:{outcome}", ttl)
        del self.computed[before:]


def test_batch_refreshing_policy_machine() -> None:
    run_state_machine_as_test(BatchRefreshingPolicyMachine)
