"""Fixtures for the tests against a real Redis server (a plugin the Redis test modules load).

The server is the one at WQ_MEMO_REDIS_URL, else redis://127.0.0.1:6379/0 if it answers. Without
a reachable server these tests skip, saying why, except under CI=true where they fail. Every test
works in a namespace of its own (under a prefix unique to the run) and removes its keys after.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis_names import delete_namespace
from redis_server import RedisServer
from redis_spawn import Procs

if os.environ.get("CI") == "true":
    import redis.asyncio  # noqa: F401  # in CI the Redis tests must run, not skip

DEFAULT_URL = "redis://127.0.0.1:6379/0"
RUN_PREFIX = f"wq_memo_test:{uuid.uuid4().hex[:12]}"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, so the Redis tests must run, but {reason}")
    pytest.skip(reason)


def _ping(url: str) -> str | None:
    """Return None if a Redis server answers at url, else why not."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a reachable Redis server."""
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("the redis package is not installed (pip install -e '.[redis]')")
    url = os.environ.get("WQ_MEMO_REDIS_URL") or DEFAULT_URL
    problem = _ping(url)
    if problem is not None:
        _unavailable(
            f"no Redis server answers at {url} ({problem}); start one or set WQ_MEMO_REDIS_URL"
        )
    return url


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    """A namespace used by this test only; its keys are deleted afterwards."""
    ns = f"{RUN_PREFIX}:{uuid.uuid4().hex[:12]}"
    yield ns
    delete_namespace(redis_url, ns)


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[Any]:
    """A synchronous client on the test server, to look at and tamper with entries."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    client.close()


@pytest.fixture
async def make_redis_cache(
    redis_url: str, redis_namespace: str
) -> AsyncIterator[Callable[..., Any]]:
    """Build RedisCaches on the test server and namespace; they are closed afterwards."""
    from wq_memo.backends.redis import RedisCache

    made: list[RedisCache] = []

    def make(**kwargs: Any) -> RedisCache:
        kwargs.setdefault("namespace", redis_namespace)
        cache = RedisCache(kwargs.pop("url", redis_url), **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


@pytest.fixture
def own_redis(redis_url: str) -> Iterator[RedisServer]:
    """A started redis-server that the test may stop, pause and restart."""
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not installed (Debian: apt-get install redis-server)")
        raise AssertionError  # unreachable
    # DEBUG SLEEP stalls the server in the fault tests (Redis 7 refuses DEBUG unless enabled).
    server = RedisServer(binary, "--enable-debug-command", "yes")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Spawned processes, ended (by pid) after the test."""
    p = Procs()
    yield p
    p.end()
