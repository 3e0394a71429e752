"""The policy state machine with a RedisCache and every option (cache_if, ttl, cache_errors,
stale_if_error), against the model of tests/stateful/test_policy_machine.py.

The entries carry their expiries on the policy's clock, here the machine's fake clock: a value's
expiry and the end of its stale window, a remembered error's expiry. Redis keeps its own time,
so its expiry of each key (the entry's ttl plus the stale window, or the error's time) is real
seconds: the times are long enough that Redis drops nothing during a run, the fake clock moves
past them, and an invariant checks that each key's expiry in Redis is the one the model gives.
The rest is the same model: results with different ttls, skipped results, bad ttls, remembered
and plain failures, failing recomputations inside and outside the stale window, invalidations,
clears and primes, some landing while a computation with joined callers is under way (the cache
fences its store, and the stale value or remembered error, then).
"""

from __future__ import annotations

import uuid
from collections.abc import Hashable
from typing import ClassVar

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test
from redis_names import delete_namespace
from stateful.test_policy_machine import AsyncPolicyMachine, Remembered, keep, keys, outcomes

from wq_memo import Memoized, worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)


class RedisPolicyMachine(AsyncPolicyMachine):
    url: ClassVar[str] = ""
    ttls: ClassVar[dict[str, float | None]] = {
        "short": 300.0,
        "long": 2000.0,
        "forever": None,
        "bad": -1.0,
        "zero": 0.0,
    }
    remember: ClassVar[float] = 200.0
    stale: ClassVar[float] = 500.0
    backoff: ClassVar[float] = 100.0

    def make(self) -> Memoized[[str], str]:
        import redis

        self.namespace = f"wq_memo_test_policy_machine_{uuid.uuid4().hex[:12]}"
        self.redis = RedisCache(self.url, namespace=self.namespace, ttl=self.own_ttl, lease=5)
        self.admin = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

        @worker_queue(
            cache=self.redis,
            cache_if=keep,
            ttl=self.ttl_of,
            cache_errors={Remembered: self.remember},
            stale_if_error=self.stale,
            refresh_backoff=self.backoff,
            timer=lambda: self.now,
            name="policy.redis",
        )
        async def f(key: str) -> str:
            value: str = await self.work(key)
            return value

        return f

    @rule(seconds=st.sampled_from([10.0, 100.0, 250.0, 400.0, 2500.0]))
    def tick(self, seconds: float) -> None:
        """The policy's clock moves (Redis's does not: it drops nothing during a run)."""
        self.now += seconds

    @invariant()
    def expiries_in_redis_agree_with_the_model(self) -> None:
        if not hasattr(self, "redis"):
            return
        for key, entry in self.entries.items():
            names = key_names(self.namespace, CallKey("policy.redis", cachetools.keys.hashkey(key)))
            pttl = int(self.admin.pttl(names.value))
            if entry.until == float("inf"):
                assert pttl == -1, f"{key!r}: PTTL {pttl}, the model keeps it for ever"
            else:
                # Kept in Redis until the end of its stale window (an error: its expiry).
                ttl_ms = (entry.until - entry.written) * 1000
                assert 0 < pttl <= ttl_ms, f"{key!r}: PTTL {pttl}, the model says {ttl_ms}"
                assert pttl > ttl_ms - 60_000, f"{key!r}: PTTL {pttl}, far below {ttl_ms}"

    def teardown(self) -> None:
        try:
            if self.gate is not None:
                self.gate.set()
            if hasattr(self, "f"):
                self.loop.run_until_complete(self.f.queue.aclose())
                self.loop.run_until_complete(self.redis.aclose())
            self.loop.close()
        finally:
            if hasattr(self, "redis"):
                self.admin.close()
                delete_namespace(self.url, self.namespace)


class RedisPolicyMachineWithTheCachesTtl(RedisPolicyMachine):
    """The same with a RedisCache whose own ttl is the lifetime of a result whose ttl is None:
    its entry expires then, and the stale window extends that."""

    own_ttl: ClassVar[float | None] = 1500.0


class RedisRefreshingPolicyMachine(RedisPolicyMachine):
    """RedisPolicyMachine with refresh_after: each call reads the entry as kept with its age
    (``get_kept_with_lifetime``), unwraps it and dates its refresh-ahead by the expiry the
    entry carries, not by its Redis key's (which includes the stale window); a due value is
    refreshed through the cache's fenced refresh, under the policy. The entries' write times
    are stamped on the machine's clock too (the cache's codec clock), so that their ages are
    read on the clock the model keeps."""

    refreshing = True
    refresh_after: ClassVar[float] = 200.0
    later: ClassVar[tuple[float, ...]] = (50.0, 100.0, 150.0, 200.0, 250.0)

    def make(self) -> Memoized[[str], str]:
        import redis

        self.namespace = f"wq_memo_test_policy_machine_{uuid.uuid4().hex[:12]}"
        self.redis = RedisCache(self.url, namespace=self.namespace, ttl=None, lease=5)
        self.redis._entries._codec._clock = lambda: self.now  # write times on the model's clock
        self.admin = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

        @worker_queue(
            cache=self.redis,
            cache_if=keep,
            ttl=self.ttl_of,
            cache_errors={Remembered: self.remember},
            stale_if_error=self.stale,
            refresh_backoff=self.backoff,
            refresh_after=self.refresh_after,
            timer=lambda: self.now,
            name="policy.redis",
        )
        async def f(key: str) -> str:
            value: str = await self.work(key)
            return value

        return f

    def flight_key(self, key: str) -> Hashable:
        return CallKey("policy.redis", (key,))

    @rule(key=keys, outcome=outcomes, step=st.integers(0, 4))
    def call_a_little_later(self, key: str, outcome: str, step: int) -> None:
        """A call shortly after the last step: entries are found due more often than expired."""
        self.now += self.later[step]
        self.call(key, outcome)


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(300)
def test_redis_refreshing_policy_machine(redis_url: str) -> None:
    RedisRefreshingPolicyMachine.url = redis_url
    run_state_machine_as_test(RedisRefreshingPolicyMachine, settings=SETTINGS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "machine", [RedisPolicyMachine, RedisPolicyMachineWithTheCachesTtl], ids=["forever", "own-ttl"]
)
def test_redis_policy_machine(redis_url: str, machine: type[RedisPolicyMachine]) -> None:
    machine.url = redis_url
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=200,
            stateful_step_count=30,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
