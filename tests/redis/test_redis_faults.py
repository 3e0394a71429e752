"""Redis down, slow, restarted or answering garbage: calls still return, and Redis is used again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from functools import partial

import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer, free_port
from redis_waits import until

from wq_memo.backends import MISSING, CallKey
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)


async def _value(key: int) -> dict[str, int]:
    await asyncio.sleep(0.005)
    return {"k": key}


async def test_redis_stopped_and_restarted_during_a_run(own_redis: RedisServer) -> None:
    cache = RedisCache(own_redis.url, namespace="faults", timeout=0.5, retry_interval=0.0)
    computed: Counter[int] = Counter()
    calls = 0
    errors: list[BaseException] = []
    finish = asyncio.Event()
    milestones: dict[int, asyncio.Event] = {}

    def after(n: int) -> asyncio.Event:
        return milestones.setdefault(calls + n, asyncio.Event())

    async def compute(key: int) -> dict[str, int]:
        computed[key] += 1
        return await _value(key)

    async def caller(seed: int) -> None:
        nonlocal calls
        i = seed
        while not finish.is_set():
            key = i % 5
            i += 1
            try:
                value = await cache.get_or_compute(CallKey("m.f", (key,)), partial(compute, key))
                assert value == {"k": key}
            except BaseException as exc:
                errors.append(exc)
                raise
            calls += 1
            if calls in milestones:
                milestones[calls].set()
            await asyncio.sleep(0)

    async with asyncio.timeout(30):
        tasks = [asyncio.create_task(caller(seed)) for seed in range(8)]
        await after(100).wait()
        assert sum(computed.values()) == 5  # cached in Redis: each key once
        await asyncio.to_thread(own_redis.stop)
        down = cache.stats()
        await after(100).wait()
        assert cache.stats().fallbacks > down.fallbacks
        await asyncio.to_thread(own_redis.start)  # same port, empty
        restarted = sum(computed.values())
        hits = cache.stats().hits
        await after(200).wait()
        finish.set()
        await asyncio.gather(*tasks)
    await cache.aclose()
    assert errors == []
    stats = cache.stats()
    assert stats.redis_errors > 0
    assert stats.hits > hits  # Redis is used again without a restart of ours
    # Once back, each key is computed at most once more (plus calls that raced the restart).
    assert sum(computed.values()) - restarted <= 5 + 8


async def test_slow_redis_costs_at_most_the_timeout(own_redis: RedisServer) -> None:
    cache = RedisCache(own_redis.url, namespace="slow", timeout=0.3, retry_interval=0.5)
    await cache.set(CallKey("m.f", (0,)), "stored")
    assert own_redis.proc is not None
    pid = own_redis.proc.pid
    os.kill(pid, signal.SIGSTOP)  # the server hangs: every operation times out
    try:
        started = time.monotonic()
        value = await cache.get_or_compute(CallKey("m.f", (1,)), lambda: _value(1))
        elapsed = time.monotonic() - started
        assert value == {"k": 1}
        assert elapsed < 0.3 + 0.5
        # The probe (PING) times out too: Redis is down, and skipped from then on.
        await until(lambda: cache._conn.down, 5)
        started = time.monotonic()
        assert await cache.get(CallKey("m.f", (0,))) is MISSING
        assert time.monotonic() - started < 0.05
        assert cache.stats().redis_errors == 2  # the call's operation, and the probe
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.sleep(0.5)  # retry_interval: then the next call tries Redis again
    async with asyncio.timeout(5):
        assert await cache.get(CallKey("m.f", (0,))) == "stored"
    await cache.aclose()


async def test_nothing_listening_computes_locally_and_propagates_compute_errors() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", namespace="down", retry_interval=0)
    started = time.monotonic()
    assert await cache.get_or_compute(CallKey("m.f", (2,)), lambda: _value(2)) == {"k": 2}
    assert await cache.get(CallKey("m.f", (2,))) is MISSING
    await cache.set(CallKey("m.f", (2,)), 1)
    assert await cache.delete(CallKey("m.f", (2,))) is False
    await cache.clear()

    async def fail() -> None:
        raise KeyError("from compute")

    with pytest.raises(KeyError, match="from compute"):
        await cache.get_or_compute(CallKey("m.f", (3,)), fail)
    assert time.monotonic() - started < 5
    stats = cache.stats()
    assert stats.fallbacks == 2
    assert stats.redis_errors >= 6
    await cache.aclose()


async def test_garbage_answers_are_redis_errors_not_call_failures() -> None:
    async def answer_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(4096):
                writer.write(b"?this is not RESP\r\n*x\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer_garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", namespace="garbage", timeout=0.5)
    try:
        async with asyncio.timeout(5):
            assert await cache.get_or_compute(CallKey("m.f", (4,)), lambda: _value(4)) == {"k": 4}
        assert cache.stats().redis_errors >= 1
        assert cache.stats().fallbacks == 1
    finally:
        await cache.aclose()
        server.close()
        await server.wait_closed()


async def test_a_clear_stopped_by_a_stall_says_so_and_leaves_no_epoch_for_ever(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stalls between the clear's SCAN and its UNLINK: the clear cannot complete. It says
    so (a WARNING naming clear() and what to do), and the namespace's epoch, which fences the
    computations under way while a clear runs, expires instead of staying for ever."""
    import redis
    from redis.asyncio import Redis

    from wq_memo.backends._redis_keys import Namespace

    assert own_redis.proc is not None
    pid = own_redis.proc.pid
    client = Redis.from_url(own_redis.url, max_connections=12)
    cache = RedisCache(client, namespace="stalled", timeout=0.3, retry_interval=0.0)
    for key in range(3):
        await cache.set(CallKey("m.f", (key,)), key)
    scan = client.scan
    stalled = False

    async def scan_then_stall(cursor: int = 0, **kwargs: object) -> object:
        nonlocal stalled
        reply = await scan(cursor, **kwargs)  # type: ignore[arg-type]
        os.kill(pid, signal.SIGSTOP)  # the server hangs: the UNLINK that follows times out
        stalled = True
        return reply

    client.scan = scan_then_stall  # type: ignore[method-assign,assignment]
    try:
        with caplog.at_level("WARNING", logger="wq_memo"):
            async with asyncio.timeout(10):
                await cache.clear()  # Redis errors never propagate: logged and counted
    finally:
        if stalled:
            os.kill(pid, signal.SIGCONT)
        await cache.aclose()
        await client.aclose()
    assert stalled
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name == "wq_memo"
        and r.levelname == "WARNING"
        and "clear() did not complete" in r.getMessage()
    ]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "call clear() again" in said[0]
    admin = redis.Redis.from_url(own_redis.url, socket_timeout=10)
    try:
        epoch = Namespace("stalled").epoch
        assert admin.exists(epoch) == 1  # the clear stopped before removing it...
        assert admin.pttl(epoch) > 0  # ...but it expires
    finally:
        admin.close()
