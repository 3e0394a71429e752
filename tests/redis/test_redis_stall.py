"""Stores survive a stall of the server (issue 11, item 3).

Four processes of 50 callers over 10 keys; each computation lasts 0.5 s. Once all ten have
started, the server stalls for 2 s (CLIENT PAUSE, DEBUG SLEEP or SIGSTOP), so that every
computation ends, and must be stored, while Redis does not answer, and unrelated lookups time
out and open the breaker meanwhile.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

pytest.importorskip("redis")

import redis_procs
from redis_server import RedisServer
from redis_spawn import CTX, Procs

pytest_plugins = ("redis_fixtures",)

STALL = 2.0
TIMEOUT = 1.0  # the RedisCache's timeout in the processes
COMPUTATION = 0.5
PROCESSES, CALLERS, KEYS = 4, 50, 10


def _stall(kind: str, server: RedisServer) -> None:
    import redis

    admin = redis.Redis.from_url(server.url, socket_timeout=10)
    try:
        if kind == "client pause":
            admin.client_pause(int(STALL * 1000))
        elif kind == "debug sleep":
            # DEBUG SLEEP blocks the connection that sends it: from a thread of its own.
            sleep: Any = admin.execute_command
            thread = threading.Thread(target=sleep, args=("DEBUG", "SLEEP", STALL))
            thread.start()
            thread.join(STALL + 10)
        else:
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(STALL)
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        admin.close()


@pytest.mark.parametrize("kind", ["client pause", "debug sleep", "sigstop"])
def test_finished_computations_are_stored_through_a_stall(
    kind: str, own_redis: RedisServer, procs: Procs
) -> None:
    import redis

    namespace = "stall"
    go = CTX.Event()
    for _ in range(PROCESSES):
        procs.start(
            redis_procs.stall_caller, own_redis.url, namespace, CALLERS, KEYS, COMPUTATION, go
        )
    procs.expect("ready", PROCESSES, timeout=60)
    watcher = redis.Redis.from_url(own_redis.url, socket_timeout=10)
    try:
        go.set()
        deadline = time.monotonic() + 20
        while int(watcher.get(f"{namespace}:started") or 0) < KEYS:
            assert time.monotonic() < deadline, "the computations never started"
            time.sleep(0.005)
    finally:
        watcher.close()
    _stall(kind, own_redis)  # all ten computing: they end during the stall
    done = procs.expect("done", PROCESSES, timeout=60)
    assert [message[2] for message in done] == [0] * PROCESSES  # every call got its value
    computed: list[dict[int, int]] = [message[4] for message in done]
    assert all(n == 1 for per_process in computed for n in per_process.values())
    stats: list[dict[str, Any]] = [message[5] for message in done]
    assert sum(s["lock_lost"] for s in stats) == 0
    assert sum(s["redis_errors"] for s in stats) > 0  # the stall was felt
    slowest = max(message[3] for message in done)
    assert slowest <= STALL + 2 * TIMEOUT + COMPUTATION, slowest
