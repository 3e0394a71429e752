"""Model-based test of the per-result policy (cache_if, ttl, cache_errors, stale_if_error) on a
fake clock: results with different ttls, skipped results, results with a bad ttl, remembered and
plain errors, expiries, failing recomputations inside and outside the stale window,
invalidations, clears and primes, some of them landing while a computation is under way, and
explicit refreshes (a failing one leaves a fresh value as it is), primes of a value kept no
time (the key's entry goes, as at an invalidation).

Three machines: an LRUCache with every option, the same with refresh_after, and an async cache
(honouring set's ttl) with cache_if and ttl. After every step the real function is checked
against a model of entries:
- a call computes exactly when the model holds no fresh entry of its key, and gets what the
  model says (the fresh value, the remembered error rebuilt, the computation's outcome, or the
  stale value when its recomputation fails within the window);
- invalidation wins: a computation under way when its key is invalidated, cleared or primed
  stores nothing, remembers nothing and serves nothing stale;
- one computation per key at a time: callers of a key under way join it;
- ``cache_peek`` shows each key's fresh value, remembered error or MISSING, as the model does,
  and ``cache_info()`` counts hits, misses, joins, skipped results and stale values alike;
- with refresh_after: a hit refreshes its key in the background exactly when the model says its
  entry is due (each entry at the part of its own lifetime the README states; never a
  remembered error, never a stale value before the back-off), and the refresh's result goes
  through the policy: stored with its own ttl, or skipped (the entry stays), or its failure
  counted, never remembered over the fresh value it would replace.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import cachetools
from _policy_harness import ClockedAsyncCache
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from wq_memo import MISSING, CachedError, Memoized, worker_queue
from wq_memo.backends import CallKey

KEYS = ("a", "b", "c")
keys = st.sampled_from(KEYS)
TTLS: dict[str, float | None] = {
    "short": 3.0,
    "long": 20.0,
    "forever": None,
    "bad": -1.0,
    "zero": 0.0,
}
"""A result's kind -> what ttl(result) returns; a "skip" result fails cache_if. Only primes are
"zero": a value kept no time, whose prime removes the key's entry as an invalidation does."""
REMEMBER = 4.0
STALE = 10.0
BACKOFF = 2.0
REFRESH_AFTER = 5.0
"""With an LRUCache and a ttl function there is no reference lifetime: an entry living L
seconds is due after min(REFRESH_AFTER, L / 2)."""
OUTCOMES = ("short", "long", "forever", "bad", "skip", "remembered", "plain")
outcomes = st.sampled_from(OUTCOMES)


class Remembered(TimeoutError):
    """A failure of a type named in cache_errors."""


class Plain(ValueError):
    """A failure of a type that is never cached."""


def keep(value: str) -> bool:
    return not value.endswith(":skip")


@dataclass
class Entry:
    """The model's entry of a key: a value, or a remembered error (its args)."""

    value: str | None
    error: tuple[Any, ...] | None
    expires: float
    until: float
    warned: bool = False
    written: float = 0.0
    """When it was written, on the fake clock."""


class PolicyMachine(RuleBasedStateMachine):
    """The model and the rules shared by both machines; ``dated``: the cache_errors and
    stale_if_error options are on (in-process cache)."""

    dated = True
    refreshing = False
    """refresh_after is on (REFRESH_AFTER)."""
    ttls: ClassVar[dict[str, float | None]] = TTLS
    remember: ClassVar[float] = REMEMBER
    stale: ClassVar[float] = STALE
    backoff: ClassVar[float] = BACKOFF
    refresh_after: ClassVar[float] = REFRESH_AFTER
    later: ClassVar[tuple[float, ...]] = (0.5, 1.0, 1.5, 2.0, 4.0)
    """The steps of the clock call_a_little_later draws from (with refresh_after)."""
    own_ttl: ClassVar[float | None] = None
    """The lifetime the cache gives an entry stored without a ttl (None: until evicted)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 0.0
        self.made = 0
        self.plans: dict[str, list[str]] = {k: [] for k in KEYS}
        """Per key, the outcomes its next computations are to have."""
        self.gate: asyncio.Event | None = None
        self.computed: list[str] = []
        self.entries: dict[str, Entry] = {}
        self.counts = {"hits": 0, "misses": 0, "joined": 0, "uncached": 0, "stale": 0}
        if self.refreshing:
            self.counts.update(refreshes=0, refresh_failures=0)
        self.due: dict[str, float] = {}
        """Per key, when its entry is due for a refresh (with refresh_after)."""

    def make(self) -> Memoized[[str], str]:
        raise NotImplementedError

    def flight_key(self, key: str) -> Hashable:
        """The key of key's computation in the queue's flight table."""
        return (key,)

    def ttl_of(self, value: str) -> float | None:
        return self.ttls[value.rsplit(":", 1)[1]]

    @initialize()
    def decorate(self) -> None:
        self.f = self.make()

    async def work(self, key: str) -> str:
        n = self.made
        self.made += 1
        self.computed.append(key)
        outcome = self.plans[key].pop(0)
        if self.gate is not None:
            await self.gate.wait()
        if outcome == "remembered":
            raise Remembered(key, n)
        if outcome == "plain":
            raise Plain(key, n)
        return f"{key}#{n}:{outcome}"

    def run(self, coro: Any) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(5):
                return await coro

        return self.loop.run_until_complete(bounded())

    # -- the model ------------------------------------------------------------------------------

    def keep_value(self, key: str, value: str, ttl: float | None) -> None:
        """The model stores value for key, living ttl seconds (None: forever)."""
        expires = math.inf if ttl is None else self.now + ttl
        until = expires + (self.stale if self.dated else 0)
        self.entries[key] = Entry(value, None, expires, until, False, self.now)
        after = self.refresh_after
        self.due[key] = self.now + (after if ttl is None else min(after, ttl / 2))

    def fresh(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        return entry if entry is not None and self.now < entry.expires else None

    def expect_computed(self, key: str, outcome: str, n: int) -> tuple[bool, Any]:
        """The model's outcome of key's computation number n with this outcome, stored."""
        if outcome in ("remembered", "plain"):
            old = self.entries.get(key)
            if (
                self.dated
                and old is not None
                and old.error is None
                and old.expires <= self.now < old.until
            ):
                again = min(self.now + self.backoff, old.until)
                self.entries[key] = Entry(old.value, None, again, old.until, True, self.now)
                self.due[key] = self.now + self.backoff  # not refreshed ahead before the back-off
                self.counts["stale"] += 1
                return True, old.value
            if outcome == "remembered" and self.dated:
                expires = self.now + self.remember
                self.entries[key] = Entry(None, (key, n), expires, expires, False, self.now)
            return False, (Remembered if outcome == "remembered" else Plain, (key, n))
        value = f"{key}#{n}:{outcome}"
        ttl = self.ttls.get(outcome)
        if outcome == "skip" or (ttl is not None and ttl < 0):
            self.counts["uncached"] += 1
        else:
            if ttl is None:
                ttl = self.own_ttl  # the cache's own lifetime, if it tells it
            self.keep_value(key, value, ttl)
        return True, value

    def check(self, got: Any, expected: tuple[bool, Any]) -> None:
        ok, what = expected
        if ok:
            assert got == what, f"got {got!r}, the model says {what!r}"
        else:
            kind, args = what
            assert type(got) is kind, f"got {got!r}, the model says {kind.__name__}{args}"
            assert got.args == args

    def until(self, condition: Callable[[], bool]) -> None:
        """Run the loop until condition() holds: turns of the loop first, then short naps (a
        RedisCache waits on the network); fail after 10 s."""
        deadline = time.monotonic() + 10
        turns = 0
        while not condition():
            assert time.monotonic() < deadline, "the calls never got there"
            turns += 1
            self.loop.run_until_complete(asyncio.sleep(0 if turns < 50 else 0.002))

    async def outcome(self, call: Any) -> Any:
        try:
            return await call
        except (Remembered, Plain) as exc:
            return exc

    # -- rules ----------------------------------------------------------------------------------

    @rule(key=keys, outcome=outcomes)
    def call(self, key: str, outcome: str) -> None:
        entry = self.fresh(key)
        before = len(self.computed)
        self.plans[key] = [outcome]
        got = self.run(self.outcome(self.f(key)))
        if entry is not None:
            if self.refreshing and entry.error is None and self.now >= self.due.get(key, math.inf):
                self.refreshed_in_the_background(key, outcome, before)
            assert len(self.computed) == before, f"{key!r} computed with a fresh entry"
            self.counts["hits"] += 1
            if entry.error is None:
                self.check(got, (True, entry.value))
            else:
                self.check(got, (False, (Remembered, entry.error)))
            return
        assert len(self.computed) == before + 1, f"{key!r} not computed without a fresh entry"
        self.counts["misses"] += 1
        self.check(got, self.expect_computed(key, outcome, self.made - 1))

    @rule(key=keys, outcome=outcomes, late=st.sampled_from(["in the window", "past it"]))
    def call_after_expiry(self, key: str, outcome: str, late: str) -> None:
        """The clock moves just past the expiry of key's entry (within its stale window, or
        past its end), and key is called: it computes, and a failure may be served stale."""
        entry = self.entries.get(key)
        if entry is None or math.isinf(entry.expires):
            return
        when = entry.expires if late == "in the window" else entry.until
        self.now = max(self.now, when + 0.5)
        self.call(key, outcome)

    def refreshed_in_the_background(self, key: str, outcome: str, before: int) -> None:
        """The hit found key's entry due: one background refresh computes it (now, since a
        slot is free), and the policy decides on its result."""
        table = self.f.queue._engine.table
        assert table is not None
        flight_key = self.flight_key(key)
        assert len(self.computed) > before or flight_key in table.flights, (
            f"{key!r} was due, yet no refresh of it is under way or done"
        )
        self.until(lambda: len(self.computed) == before + 1 and flight_key not in table.flights)
        n = self.made - 1
        self.counts["refreshes"] += 1
        self.due[key] = self.now + self.backoff  # set as it started; a stored result resets it
        if outcome in ("remembered", "plain"):
            self.counts["refresh_failures"] += 1  # the fresh entry stays, nothing remembered
        else:
            ttl = self.ttls.get(outcome)
            if outcome == "skip" or (ttl is not None and ttl < 0):
                self.counts["uncached"] += 1  # not stored: the entry stays
            else:
                self.keep_value(key, f"{key}#{n}:{outcome}", ttl)
        del self.computed[-1]  # for the caller's hit, which computed nothing itself

    @rule(key=keys, outcome=outcomes)
    def refresh(self, key: str, outcome: str) -> None:
        """An explicit refresh: it computes whatever the cache holds, and a failure leaves a
        fresh value as it is (raised, neither served stale nor replaced by a remembered
        error)."""
        entry = self.fresh(key)
        before = len(self.computed)
        self.plans[key] = [outcome]
        got = self.run(self.outcome(self.f.refresh(key)))
        assert len(self.computed) == before + 1, f"{key!r} not computed by a refresh"
        self.counts["misses"] += 1
        n = self.made - 1
        if outcome in ("remembered", "plain") and entry is not None and entry.error is None:
            kind = Remembered if outcome == "remembered" else Plain
            self.check(got, (False, (kind, (key, n))))
            return
        self.check(got, self.expect_computed(key, outcome, n))

    @rule(
        key=keys,
        outcome=outcomes,
        joiners=st.integers(0, 2),
        action=st.sampled_from(["nothing", "invalidate", "clear", "prime", "prime_for_no_time"]),
    )
    def call_under_way(self, key: str, outcome: str, joiners: int, action: str) -> None:
        """A computation of key held while others join it and an action lands."""
        if self.fresh(key) is not None:
            return
        self.plans[key] = [outcome]
        self.gate = gate = asyncio.Event()
        before = len(self.computed)
        joined = self.f.cache_info().joined
        first = self.loop.create_task(self.outcome(self.f(key)))
        self.until(lambda: len(self.computed) > before)
        assert self.computed[-1:] == [key]
        n = self.made - 1
        others = [self.loop.create_task(self.outcome(self.f(key))) for _ in range(joiners)]
        self.until(lambda: self.f.cache_info().joined == joined + joiners)
        self.counts["misses"] += 1
        self.counts["joined"] += joiners
        if action != "nothing":
            self.act(action, key)
        self.gate = None
        gate.set()
        results = self.run(asyncio.gather(first, *others))
        if action == "nothing":
            expected = self.expect_computed(key, outcome, n)
        elif outcome in ("remembered", "plain"):
            expected = (False, (Remembered if outcome == "remembered" else Plain, (key, n)))
        else:
            expected = (True, f"{key}#{n}:{outcome}")
        for got in results:
            self.check(got, expected)

    def act(self, action: str, key: str) -> None:
        if action == "invalidate":
            self.invalidate(key)
        elif action == "clear":
            self.clear()
        elif action == "prime":
            self.prime(key)
        else:
            self.prime_for_no_time(key)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 12.0, 40.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(key=keys)
    def invalidate(self, key: str) -> None:
        self.due.pop(key, None)
        held = self.entries.pop(key, None) is not None
        assert self.run(self.f.acache_invalidate(key)) == held

    @rule()
    def clear(self) -> None:
        self.entries.clear()
        self.run(self.f.acache_clear())
        self.counts = dict.fromkeys(self.counts, 0)

    @rule(key=keys)
    def prime(self, key: str) -> None:
        value = f"{key}#primed{self.made}:long"
        self.made += 1
        self.run(self.f.acache_prime(value, key))
        self.keep_value(key, value, self.ttls["long"])

    @rule(key=keys)
    def prime_for_no_time(self, key: str) -> None:
        value = f"{key}#primed{self.made}:zero"
        self.made += 1
        self.run(self.f.acache_prime(value, key))
        self.entries.pop(key, None)
        self.due.pop(key, None)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def peek_agrees_with_the_model(self) -> None:
        if not hasattr(self, "f"):
            return
        for key in KEYS:
            entry = self.fresh(key)
            peeked = self.run(self.f.acache_peek(key))
            if entry is None:
                assert peeked is MISSING, f"{key!r}: peeked {peeked!r}, the model has none"
            elif entry.error is None:
                assert peeked == entry.value, f"{key!r}: peeked {peeked!r}, not {entry.value!r}"
            else:
                assert peeked == CachedError(Remembered, entry.error), f"{key!r}: {peeked!r}"

    @invariant()
    def counts_agree_with_the_model(self) -> None:
        if not hasattr(self, "f"):
            return
        info = self.f.cache_info()
        got = {name: getattr(info, name) for name in self.counts}
        assert got == self.counts

    def teardown(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if hasattr(self, "f"):
            self.loop.run_until_complete(self.f.queue.aclose())
        self.loop.close()


class MappingPolicyMachine(PolicyMachine):
    dated = True

    def make(self) -> Memoized[[str], str]:
        @worker_queue(
            cache=cachetools.LRUCache(100),
            cache_if=keep,
            ttl=self.ttl_of,
            cache_errors={Remembered: REMEMBER},
            stale_if_error=STALE,
            refresh_backoff=BACKOFF,
            timer=lambda: self.now,
        )
        async def f(key: str) -> str:
            return await self.work(key)

        return f


class RefreshingPolicyMachine(PolicyMachine):
    """MappingPolicyMachine with refresh_after: calls that find their entry due refresh it."""

    dated = True
    refreshing = True

    def make(self) -> Memoized[[str], str]:
        @worker_queue(
            cache=cachetools.LRUCache(100),
            cache_if=keep,
            ttl=self.ttl_of,
            cache_errors={Remembered: REMEMBER},
            stale_if_error=STALE,
            refresh_backoff=BACKOFF,
            refresh_after=REFRESH_AFTER,
            timer=lambda: self.now,
        )
        async def f(key: str) -> str:
            return await self.work(key)

        return f

    @rule(key=keys, outcome=outcomes, seconds=st.sampled_from([0.5, 1.0, 1.5, 2.0, 4.0]))
    def call_a_little_later(self, key: str, outcome: str, seconds: float) -> None:
        """A call shortly after the last step: entries are found due more often than expired."""
        self.tick(seconds)
        self.call(key, outcome)


class AsyncPolicyMachine(PolicyMachine):
    """A plain async cache with every option: wq_memo keeps its dated entries in it (a value
    with its expiry, kept by set's ttl for the stale window; a remembered error)."""

    dated = True

    def make(self) -> Memoized[[str], str]:
        self.cache = ClockedAsyncCache(lambda: self.now)

        @worker_queue(
            cache=self.cache,
            cache_if=keep,
            ttl=self.ttl_of,
            cache_errors={Remembered: REMEMBER},
            stale_if_error=STALE,
            refresh_backoff=BACKOFF,
            timer=lambda: self.now,
            name="policy.machine",
        )
        async def f(key: str) -> str:
            return await self.work(key)

        return f


class RefreshingAsyncPolicyMachine(AsyncPolicyMachine):
    """AsyncPolicyMachine with refresh_after: the lookup unwraps the kept entries and tells
    refresh-ahead each value's own lifetime (not the cache ttl that keeps it for the stale
    window); calls that find their entry due refresh it in the background, under the policy."""

    refreshing = True

    def make(self) -> Memoized[[str], str]:
        self.cache = ClockedAsyncCache(lambda: self.now)

        @worker_queue(
            cache=self.cache,
            cache_if=keep,
            ttl=self.ttl_of,
            cache_errors={Remembered: REMEMBER},
            stale_if_error=STALE,
            refresh_backoff=BACKOFF,
            refresh_after=REFRESH_AFTER,
            timer=lambda: self.now,
            name="policy.machine",
        )
        async def f(key: str) -> str:
            return await self.work(key)

        return f

    def flight_key(self, key: str) -> Hashable:
        return CallKey("policy.machine", (key,))

    @rule(key=keys, outcome=outcomes, step=st.integers(0, 4))
    def call_a_little_later(self, key: str, outcome: str, step: int) -> None:
        """A call shortly after the last step: entries are found due more often than expired."""
        self.now += self.later[step]
        self.call(key, outcome)


class UndatedAsyncPolicyMachine(PolicyMachine):
    """A plain async cache with cache_if and ttl only: its entries are the values, kept for
    set's ttl, and no failure is kept."""

    dated = False

    def make(self) -> Memoized[[str], str]:
        self.cache = ClockedAsyncCache(lambda: self.now)

        @worker_queue(cache=self.cache, cache_if=keep, ttl=self.ttl_of, name="policy.machine")
        async def f(key: str) -> str:
            return await self.work(key)

        return f


def test_mapping_policy_machine() -> None:
    run_state_machine_as_test(MappingPolicyMachine)


def test_refreshing_policy_machine() -> None:
    run_state_machine_as_test(RefreshingPolicyMachine)


def test_async_policy_machine() -> None:
    run_state_machine_as_test(AsyncPolicyMachine)


def test_refreshing_async_policy_machine() -> None:
    run_state_machine_as_test(RefreshingAsyncPolicyMachine)


def test_undated_async_policy_machine() -> None:
    run_state_machine_as_test(UndatedAsyncPolicyMachine)
