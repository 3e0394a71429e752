"""Single flight across OS processes sharing one Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

import redis_procs
from redis_spawn import CTX, Procs

pytest_plugins = ("redis_fixtures",)


def _start_herd(procs: Procs, url: str, ns: str, n: int, seconds: float, lease: float) -> None:
    go = CTX.Event()
    for _ in range(n):
        procs.start(redis_procs.herd, url, ns, 25, seconds, lease, go)
    procs.expect("ready", n)
    go.set()


def test_four_processes_with_many_callers_compute_a_cold_key_once(
    procs: Procs, redis_url: str, redis_namespace: str, sync_redis: Any
) -> None:
    _start_herd(procs, redis_url, redis_namespace, 4, 0.5, 10.0)
    done = procs.expect("done", 4)
    assert int(sync_redis.get(f"{redis_namespace}:computations")) == 1
    results = [r for message in done for r in message[2]]
    assert len(results) == 100
    assert len({r["pid"] for r in results}) == 1
    assert sum(message[3]["computed"] for message in done) == 1


def test_computation_longer_than_the_lease_still_runs_once(
    procs: Procs, redis_url: str, redis_namespace: str, sync_redis: Any
) -> None:
    # Four leases long. A much shorter lease would measure the machine's scheduling instead: the
    # holder's loop must get to run its renewal within the lease.
    _start_herd(procs, redis_url, redis_namespace, 4, 2.0, 0.5)
    done = procs.expect("done", 4)
    assert int(sync_redis.get(f"{redis_namespace}:computations")) == 1
    assert sum(message[3]["lock_lost"] for message in done) == 0
    assert len({r["pid"] for message in done for r in message[2]}) == 1


def test_killed_lock_holder_is_replaced_by_exactly_one_waiter(
    procs: Procs, redis_url: str, redis_namespace: str, sync_redis: Any
) -> None:
    from wq_memo.backends._redis_keys import key_names

    names = key_names(redis_namespace, redis_procs.KEY)
    holder = procs.start(redis_procs.hang, redis_url, redis_namespace, 1.0)
    procs.expect("computing", 1)
    _start_herd(procs, redis_url, redis_namespace, 3, 0.1, 1.0)
    # Wait (bounded) until the three processes are subscribed waiters of the live holder.
    deadline = time.monotonic() + 20
    while sync_redis.pubsub_numsub(names.channel)[0][1] < 3:
        assert time.monotonic() < deadline, "the waiters never subscribed"
        time.sleep(0.02)
    assert sync_redis.exists(names.lock)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(5)
    assert holder.exitcode == -signal.SIGKILL
    done = procs.expect("done", 3, timeout=20)
    assert (
        int(sync_redis.get(f"{redis_namespace}:computations")) == 2
    )  # the dead holder and one more
    results = [r for message in done for r in message[2]]
    assert len(results) == 75
    assert len({r["pid"] for r in results}) == 1
    assert results[0]["pid"] != holder.pid


def test_readme_example_computes_each_key_once(redis_url: str, redis_namespace: str) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "multiprocess.py"
    env = {**os.environ, "WQ_MEMO_REDIS_URL": redis_url, "WQ_MEMO_NAMESPACE": redis_namespace}
    out = subprocess.run(
        [sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 computations for 5 keys" in out.stdout


def test_processes_that_find_an_entry_due_refresh_it_once_and_never_wait(
    procs: Procs, redis_url: str, redis_namespace: str, sync_redis: Any
) -> None:
    from wq_memo.backends._redis_keys import key_names
    from wq_memo.backends._redis_values import ValueCodec

    name = key_names(redis_namespace, redis_procs.REFRESHED).value
    written = ValueCodec(None, lambda: time.time() - 40).dumps(name, "written 40 s ago")
    sync_redis.set(name, written, px=120_000)
    go, release = CTX.Event(), CTX.Event()
    for _ in range(3):
        procs.start(redis_procs.refresh_due, redis_url, redis_namespace, go, release)
    procs.expect("ready", 3)
    go.set()
    attempted = procs.expect("attempted", 3)
    # Every call got the entry as it was, at once (well within the hour the refresh is held);
    # one process computes, the two others gave up without waiting.
    assert [m[2] for m in attempted] == ["written 40 s ago"] * 3
    assert max(m[3] for m in attempted) < 10
    assert sorted(m[4] for m in attempted) == [0, 0, 1]
    assert int(sync_redis.get(f"{redis_namespace}:computations")) == 1
    release.set()
    done = procs.expect("done", 3)
    [refresher] = [m[1] for m in attempted if m[4] == 1]
    assert [m[2] for m in done] == [f"refreshed by {refresher}"] * 3
    assert [m[3] for m in done] == [1, 1, 1]  # each process started one refresh
    assert int(sync_redis.get(f"{redis_namespace}:computations")) == 1
