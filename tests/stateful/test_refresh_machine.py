"""Model-based test of refresh-ahead: a TTLCache on a fake clock, computations held by gates,
calls, clock advances, failures and invalidations, against a model of entries and due times.

Invariants:
- no call waits for a computation while its key has a live entry: it gets that entry at once;
- a call waits for a slot only while the callers' computations fill maxsize, never behind
  background refreshes, which take only spare slots (at most maxsize of them);
- at most one computation (call or refresh) of a key is in flight, forgotten ones aside;
- a failed refresh never reaches a caller that found the entry, and never removes the entry;
- invalidation wins: a computation under way when its key is invalidated stores nothing;
- the cache holds exactly the model's live entries.

With a policy (issue 20), each result says how long it lives (``ttl``, a function of the
result) and whether it is kept (``cache_if``), in a TTLCache (the reference lifetime of
refresh_after is its ttl) or an LRUCache (none: half an entry's lifetime): an entry is due at
the part of its own lifetime the README states, never after it expired; a refresh whose result
is not kept leaves the entry as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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

from wq_memo import Memoized, worker_queue
from wq_memo._policy import Kept

from ._machinery import FastForwardLoop

KEYS = ("a", "b", "c")
REFRESH_AFTER = 5.0
BACKOFF = 2.0
TTL = 8.0
SHORT = 4.0
"""The lifetime of a short-lived result (``ttl`` of the policy)."""
POLICIES = ("none", "ttl", "cache_if", "both")


@dataclass(frozen=True)
class Result:
    """What a computation returns: which one it was, and what the policy reads of it."""

    id: int
    short: bool
    keep: bool


class RefreshFailed(Exception):
    """The failure of one computation."""


@dataclass(eq=False)
class Comp:
    id: int
    key: str
    refresh: bool
    """Started while its key had a live entry: a background refresh."""
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    fail: bool = False
    short: bool = False
    keep: bool = True
    forgotten: bool = False
    done: bool = False


@dataclass(eq=False)
class Call:
    id: int
    key: str
    task: asyncio.Task[Any]
    hit: object | None
    """The value of the live entry the call found (None: it found none and may wait)."""
    checked: bool = False


class RefreshMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = FastForwardLoop()
        self.now = 0.0
        self.comps: list[Comp] = []
        self.calls: list[Call] = []
        self.entries: dict[str, tuple[object, float, float]] = {}
        """key -> (value, written at, lifetime), the model's cache."""
        self.due: dict[str, float] = {}
        self.violations: list[str] = []

    @initialize(
        maxsize=st.integers(1, 2),
        policy=st.sampled_from(POLICIES),
        lru=st.booleans(),
    )
    def decorate(self, maxsize: int, policy: str, lru: bool) -> None:
        self.maxsize = maxsize
        self.policy = policy
        self.lru = lru
        self.cache: cachetools.Cache[Hashable, Any] = (
            cachetools.LRUCache(100)
            if lru
            else cachetools.TTLCache(100, ttl=TTL, timer=lambda: self.now)
        )
        options: dict[str, Any] = {}
        if policy in ("ttl", "both"):
            # With an LRUCache each result names its lifetime; with the TTLCache a long one
            # lives the cache's own.
            options["ttl"] = lambda r: SHORT if r.short else (TTL if lru else None)
        if policy in ("cache_if", "both"):
            options["cache_if"] = lambda r: r.keep
        self.dated = "ttl" in options

        @worker_queue(
            maxsize=maxsize,
            cache=self.cache,
            refresh_after=REFRESH_AFTER,
            refresh_backoff=BACKOFF,
            timer=lambda: self.now,
            **options,
        )
        async def f(key: str) -> object:
            return await self.work(key)

        self.f: Memoized[[str], object] = f

    # -- the model ------------------------------------------------------------------------------

    def live(self, key: str) -> object | None:
        entry = self.entries.get(key)
        if entry is None or self.now >= entry[1] + entry[2]:
            return None
        return entry[0]

    def lifetime(self, comp: Comp) -> float:
        """How long comp's result lives in the cache."""
        if self.policy in ("ttl", "both") and comp.short:
            return SHORT
        return TTL if self.dated or not self.lru else math.inf

    def delay(self, lifetime: float) -> float:
        """When an entry living ``lifetime`` is due after its write, as the README states:
        refresh_after, or the same part of a shorter lifetime as refresh_after is of the
        TTLCache's ttl; half the lifetime with an LRUCache, which has no ttl of its own."""
        if self.lru:
            return min(REFRESH_AFTER, lifetime / 2)
        return min(REFRESH_AFTER, lifetime * REFRESH_AFTER / TTL)

    def active(self, key: str | None = None) -> list[Comp]:
        return [c for c in self.comps if not c.done and (key is None or c.key == key)]

    async def work(self, key: str) -> object:
        comp = Comp(len(self.comps), key, refresh=self.live(key) is not None)
        if any(not c.forgotten for c in self.active(key)):
            self.violations.append(f"{key!r} computed twice at once (#{comp.id})")
        self.comps.append(comp)
        await comp.gate.wait()
        comp.done = True
        if comp.fail:
            if comp.refresh and not comp.forgotten:
                self.due[key] = self.now + BACKOFF
            raise RefreshFailed(f"#{comp.id}")
        value = Result(comp.id, comp.short, comp.keep)
        kept = comp.keep or self.policy not in ("cache_if", "both")
        if not comp.forgotten and kept:
            lifetime = self.lifetime(comp)
            self.entries[key] = (value, self.now, lifetime)
            self.due[key] = self.now + self.delay(lifetime)
        # Not kept: a refresh leaves the entry (due again after the back-off), a miss nothing.
        return value

    def drive(self) -> None:
        loop = self.loop
        for _ in range(1000):
            loop.call_soon(loop.stop)
            loop.run_forever()
            if not loop._ready:  # type: ignore[attr-defined]
                break
        else:
            raise AssertionError("the event loop never became idle")
        for call in self.calls:
            if call.checked or not call.task.done():
                continue
            call.checked = True
            if call.hit is not None:
                assert call.task.result() is call.hit or call.task.result() == call.hit, (
                    f"call #{call.id} found {call.hit!r} but got {call.task.result()!r}"
                )

    # -- rules ----------------------------------------------------------------------------------

    @rule(batch=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4))
    def call(self, batch: list[str]) -> None:
        new = []
        refreshing = set()
        for key in batch:
            hit = self.live(key)
            if hit is not None and self.now >= self.due.get(key, float("inf")):
                self.due[key] = self.now + BACKOFF  # a refresh starts (or one is under way)
                refreshing.add(key)
            task = self.loop.create_task(self.f(key))
            call = Call(len(self.calls), key, task, hit)
            self.calls.append(call)
            new.append(call)
        self.drive()
        for call in new:
            if call.hit is not None:
                assert call.task.done(), (
                    f"call #{call.id} of {call.key!r} waits although its entry is live"
                )
        table = self.f.queue._engine.table
        assert table is not None
        for key in refreshing:
            assert (key,) in table.flights, (
                f"{key!r} was due, yet no refresh of it is under way or in line"
            )

    @precondition(lambda self: self.active())
    @rule(pick=st.integers(0, 5), fail=st.booleans(), short=st.booleans(), keep=st.booleans())
    def release(self, pick: int, fail: bool, short: bool, keep: bool) -> None:
        comps = self.active()
        comp = comps[pick % len(comps)]
        before = self.live(comp.key)
        comp.fail = fail
        comp.short = short
        comp.keep = keep
        comp.gate.set()
        self.drive()
        refused = not keep and self.policy in ("cache_if", "both")
        if (fail or refused) and comp.refresh and before is not None:
            # A failed refresh, or one whose result cache_if refuses, leaves the entry.
            assert self.live(comp.key) is before, (
                "a failed or refused refresh removed or replaced the entry"
            )

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        for key in list(self.entries):
            if self.live(key) is None:
                del self.entries[key]

    @rule(key=st.sampled_from(KEYS))
    def invalidate(self, key: str) -> None:
        for comp in self.active(key):
            comp.forgotten = True
        removed = self.f.cache_invalidate(key)
        # A dated entry that expired stays in the cache until it is overwritten, removed or
        # (a TTLCache) expires there too.
        assert removed or self.live(key) is None
        assert removed == (self.live(key) is not None) or self.dated
        self.entries.pop(key, None)
        self.due.pop(key, None)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def nothing_seen_by_the_worker(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def the_table_is_consistent(self) -> None:
        table = self.f.queue._engine.table if hasattr(self, "f") else None
        if table is not None:
            table.check()

    @invariant()
    def the_cache_holds_the_live_entries(self) -> None:
        if not hasattr(self, "cache"):
            return
        real = {}
        for key in KEYS:
            if (key,) not in self.cache:  # a TTLCache's expired entries aside
                continue
            with contextlib.suppress(KeyError):
                entry = cachetools.Cache.__getitem__(self.cache, (key,))
                if type(entry) is not Kept:
                    real[key] = entry
                elif self.now < entry.expires:  # a dated entry that expired is no entry
                    real[key] = entry.value
        expected = {key: v for key in KEYS if (v := self.live(key)) is not None}
        assert real == expected, f"cache holds {real}, model expects {expected}"

    @invariant()
    def refreshes_take_only_spare_slots(self) -> None:
        """A caller that waits for a slot waits only because the callers' own computations fill
        maxsize, never behind refreshes; refreshes hold at most maxsize slots, and wait only
        while no slot is spare."""
        if not hasattr(self, "f"):
            return
        table = self.f.queue._engine.table
        if table is None:
            return
        callers = table.running - table.spare
        assert 0 <= table.spare <= self.maxsize, f"{table.spare} spare slots taken"
        assert callers <= self.maxsize, f"{callers} computations for callers, {self.maxsize=}"
        assert len(self.active()) <= 2 * self.maxsize
        # Pending with no computation of its key running (not even a forgotten one, which
        # callers from before an invalidation may still await): it waits for a slot.
        waiting = [
            call.id for call in self.calls if not call.task.done() and not self.active(call.key)
        ]
        assert not waiting or callers == self.maxsize, (
            f"calls {waiting} wait for a slot while {callers} of {self.maxsize} slots for "
            f"callers are taken ({table.spare} by refreshes)"
        )
        in_line, refreshes, _ = table.lines()
        if refreshes:
            assert table.running >= self.maxsize or in_line, (
                f"refreshes wait although a slot is spare: {table.slots}"
            )

    @invariant()
    def callers_that_found_an_entry_never_see_a_failure(self) -> None:
        for call in self.calls:
            if call.hit is not None and call.task.done() and not call.task.cancelled():
                assert call.task.exception() is None, (
                    f"call #{call.id} found an entry yet got {call.task.exception()!r}"
                )

    def teardown(self) -> None:
        for comp in self.comps:
            comp.gate.set()
        loop = self.loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for call in self.calls:  # failures callers got are retrieved here
            if call.task.done() and not call.task.cancelled():
                call.task.exception()
        loop.close()


def test_refresh_machine() -> None:
    run_state_machine_as_test(RefreshMachine)
