"""A model-based test of RedisCache's refresh-ahead against a real Redis.

Two RedisCaches on one namespace stand for two processes. Rules write an entry (dated long ago),
start refreshes from either process (each computation held by a gate of its own until a rule
releases it with a value or a failure), delete keys, and read entries with their age. The
machine owns its event loop and runs it after each rule until every refresh either computes or
has given up. Checked after every step:

- at most one refresh of a key computes at a time across both caches (a refresh whose key was
  deleted meanwhile no longer counts: its lock is gone and it cannot store), and a refresh gives
  up, without computing, exactly when another one of its key computes;
- both caches read, at once, the entry the model expects: a refresh's result replaces it and
  resets its age; a failed refresh never removes or changes it; a refresh whose key was deleted
  while it computed never stores its result (the delete wins);
- with the per-result policy (``lifetime=``, issue 20): a refresh's result the policy refuses
  is not stored and the entry stays as it was; one given a lifetime of its own lives that long
  in Redis, and both caches read that lifetime with the entry (``get_with_lifetime``), so that
  both date its refresh-ahead alike, before it expires.
"""

from __future__ import annotations

import asyncio
import time
import uuid
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

from wq_memo._refresh import Refresher
from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends._redis_values import ValueCodec
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

KEYS = ("a", "b")
PROCESSES = (0, 1)
OLD = 1000.0
"""Age, in seconds, of the entries the write rule stores; a refreshed entry is younger."""
TTL = 3600.0
"""The caches' ttl: the lifetime of a refreshed entry unless the policy gives it its own."""
SHORT = 20.0
"""The lifetime the policy gives a "short" result."""
REFRESH_AFTER = 30.0
READ_BOUND = 5.0
"""Reads never wait for a refresh; this only bounds them so that a bug fails fast."""


class Failed(Exception):
    """The failure of one refresh's computation."""


@dataclass(eq=False)
class Refresh:
    id: int
    key: str
    process: int
    task: asyncio.Task[tuple[bool, Any]]
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    computing: bool = False
    outcome: str = ""
    fenced: bool = False
    """Its key was deleted while it computed: its result must not be stored."""


def _key(key: str) -> CallKey:
    return CallKey("m.f", (key,))


class RedisRefreshMachine(RuleBasedStateMachine):
    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        import redis

        self.loop = asyncio.new_event_loop()
        self.namespace = f"wq_memo_test_refresh_machine_{uuid.uuid4().hex[:12]}"
        self.caches = [
            RedisCache(self.url, namespace=self.namespace, ttl=TTL, lease=5) for _ in PROCESSES
        ]
        # What each process's refresh-ahead makes of the lifetimes it reads.
        self.refreshers = [
            Refresher(REFRESH_AFTER, 1.0, 0.0, time.monotonic, "m.f", None, True, TTL)
            for _ in PROCESSES
        ]
        self.admin = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
        self.refreshes: list[Refresh] = []
        self.entries: dict[str, tuple[str, bool, float | None] | None] = dict.fromkeys(KEYS)
        """The model: each key's value, whether a refresh wrote it (so it is young), and its
        lifetime in Redis (None: no expiry)."""
        self.writes = 0
        self.skipped = [0 for _ in PROCESSES]

    # -- running the loop ------------------------------------------------------------------

    def run_until(self, condition: Any) -> None:
        deadline = time.monotonic() + 15
        while not condition():
            assert time.monotonic() < deadline, "the refreshes never settled"
            self.loop.run_until_complete(asyncio.sleep(0.002))

    def computing(self, key: str) -> list[Refresh]:
        """The refreshes of key computing under a lock they still hold."""
        return [
            r
            for r in self.refreshes
            if r.key == key and r.computing and not r.fenced and not r.task.done()
        ]

    def running(self) -> list[Refresh]:
        return [r for r in self.refreshes if r.computing and not r.gate.is_set()]

    # -- rules -----------------------------------------------------------------------------

    @precondition(lambda self: any(not self.computing(k) for k in KEYS))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """An entry written long ago (by a call, in some process) appears."""
        key = data.draw(st.sampled_from([k for k in KEYS if not self.computing(k)]))
        self.writes += 1
        value = f"{key}:written#{self.writes}"
        name = key_names(self.namespace, _key(key)).value
        self.admin.set(name, ValueCodec(None, lambda: time.time() - OLD).dumps(name, value))
        self.entries[key] = (value, False, None)

    @rule(process=st.sampled_from(PROCESSES), key=st.sampled_from(KEYS))
    def refresh(self, process: int, key: str) -> None:
        """A process finds key due and refreshes it in the background."""
        held = bool(self.computing(key))
        n = len(self.refreshes)

        async def compute() -> str:
            refresh = self.refreshes[n]
            refresh.computing = True
            await refresh.gate.wait()
            if refresh.outcome == "failure":
                raise Failed(f"refresh #{n} failed")
            return f"{key}:refreshed#{n}"

        def lifetime(value: Any) -> tuple[bool, float | None]:
            """The policy's decision on the refresh's result, made in the fenced store."""
            outcome = self.refreshes[n].outcome
            return (outcome != "refused", SHORT if outcome == "short" else None)

        task = self.loop.create_task(
            self.caches[process].refresh(_key(key), compute, lifetime=lifetime)
        )
        refresh = Refresh(n, key, process, task)
        self.refreshes.append(refresh)
        self.run_until(lambda: refresh.computing or task.done())
        if held:
            assert task.done(), f"refresh #{n} of {key!r} waited for another one"
            assert task.result() == (False, MISSING), f"refresh #{n} of {key!r} computed"
            self.skipped[process] += 1
        else:
            assert refresh.computing, f"refresh #{n} of {key!r} gave up, with nobody computing"

    @precondition(lambda self: self.running())
    @rule(pick=st.integers(0, 9), outcome=st.sampled_from(["value", "failure", "short", "refused"]))
    def release(self, pick: int, outcome: str) -> None:
        """One refresh's computation ends, with a value (kept for the cache's ttl, kept for a
        short lifetime of its own, or refused by the policy) or a failure."""
        running = self.running()
        refresh = running[pick % len(running)]
        refresh.outcome = outcome
        refresh.gate.set()
        self.run_until(refresh.task.done)
        if outcome == "failure":
            exc = refresh.task.exception()
            assert isinstance(exc, Failed), f"refresh #{refresh.id} ended with {exc!r}"
            return  # the entry stays as it was
        assert refresh.task.result() == (True, f"{refresh.key}:refreshed#{refresh.id}")
        if not refresh.fenced and outcome != "refused":  # a refused result leaves the entry
            lifetime = SHORT if outcome == "short" else TTL
            self.entries[refresh.key] = (f"{refresh.key}:refreshed#{refresh.id}", True, lifetime)

    @rule(process=st.sampled_from(PROCESSES), key=st.sampled_from(KEYS))
    def delete(self, process: int, key: str) -> None:
        """An invalidation, perhaps while the key is refreshed."""
        self.loop.run_until_complete(self.caches[process].delete(_key(key)))
        self.entries[key] = None
        for refresh in self.computing(key):
            refresh.fenced = True

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def one_refresh_per_key_at_a_time(self) -> None:
        for key in KEYS:
            running = [r.id for r in self.computing(key)]
            assert len(running) <= 1, f"{key!r} refreshed by #{running} at once"

    @invariant()
    def refreshes_given_up_are_counted(self) -> None:
        for process, cache in enumerate(self.caches):
            assert cache.stats().refresh_skipped == self.skipped[process]

    @invariant()
    def every_reader_gets_the_expected_entry_at_once(self) -> None:
        async def read(cache: RedisCache, key: str) -> tuple[Any, float | None, float | None]:
            async with asyncio.timeout(READ_BOUND):
                return await cache.get_with_lifetime(_key(key))

        for process, cache in enumerate(self.caches):
            for key in KEYS:
                value, age, lifetime = self.loop.run_until_complete(read(cache, key))
                expected = self.entries[key]
                where = f"process {process} read {key!r}"
                if expected is None:
                    assert (value, age, lifetime) == (MISSING, None, None), (
                        f"{where}: {value!r}, expected none"
                    )
                    continue
                assert value == expected[0], f"{where}: {value!r}, expected {expected[0]!r}"
                assert age is not None
                if expected[1]:
                    assert age < OLD / 2, f"{where}: refreshed, yet {age:.1f} s old"
                else:
                    assert age >= OLD, f"{where}: written {OLD} s ago, yet {age:.1f} s old"
                if expected[2] is None:
                    assert lifetime is None, f"{where}: lives {lifetime} s, expected no expiry"
                    continue
                assert lifetime is not None
                assert expected[2] - READ_BOUND <= lifetime <= expected[2] + READ_BOUND, (
                    f"{where}: lives {lifetime:.1f} s, expected {expected[2]} s"
                )
                # Refresh-ahead in that process dates the entry by that lifetime: due at the
                # same part of it as refresh_after is of the ttl, before it expires.
                refresher = self.refreshers[process]
                refresher.forget(_key(key))
                refresher.written(_key(key), age, lifetime)
                due_in = refresher.due_time(_key(key)) - time.monotonic() + age
                want = min(REFRESH_AFTER, expected[2] * REFRESH_AFTER / TTL)
                assert want - READ_BOUND <= due_in <= want + 0.5, (
                    f"{where}: due {due_in:.2f} s after its write, expected {want:.2f} s"
                )
                assert due_in < lifetime

    def teardown(self) -> None:
        loop = self.loop
        for refresh in self.refreshes:  # let every computation end
            refresh.gate.set()
        try:
            tasks = [r.task for r in self.refreshes]
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
            self.admin.close()
            delete_namespace(self.url, self.namespace)


@pytest.mark.timeout(120)
def test_refresh_machine(redis_url: str) -> None:
    RedisRefreshMachine.url = redis_url
    run_state_machine_as_test(
        RedisRefreshMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=12,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
