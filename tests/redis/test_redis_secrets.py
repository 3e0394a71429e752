"""Secrets stay secret, and signed entries expire on their own (issue 11, items 7 and 8)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest

pytest.importorskip("redis.asyncio")

from redis_server import RedisServer, free_port

from wq_memo.backends import MISSING, CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
SECRET = "k" * 32
KEY = CallKey("m.f", ("secret",))
PASSWORD = "hunter2:p@ss/w?rd&x=1"
"""A wrong password for the server below: every form of URL carries it, percent-encoded."""


def _forms(port: int) -> list[str]:
    pw = quote(PASSWORD, safe="")
    return [
        f"redis://user:{pw}@127.0.0.1:{port}/0",
        f"redis://:{pw}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={pw}",
        f"redis://someone@127.0.0.1:{port}/0?db=0&password={pw}",
        f"rediss://default:{pw}@127.0.0.1:{port}/0",
        f"unix://:{pw}@/nonexistent/wq_memo.sock?db=0",
        f"unix:///nonexistent/wq_memo.sock?db=0&password={pw}",
    ]


def _leaks(text: str) -> list[str]:
    pw = quote(PASSWORD, safe="")
    return [form for form in (PASSWORD, pw, "hunter2") if form in text]


@pytest.fixture
def guarded_redis() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(binary, "--requirepass", "the-right-one")
    server.start_unchecked()
    yield server
    server.stop()


@pytest.mark.parametrize("form", range(7))
async def test_the_password_never_shows_in_repr_logs_or_errors(
    form: int, guarded_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = _forms(guarded_redis.port)[form]
    cache = RedisCache(url, namespace="secrets", timeout=0.5, retry_interval=0)

    async def compute() -> str:
        return "computed"

    with caplog.at_level(logging.DEBUG):
        async with asyncio.timeout(20):
            assert await cache.get_or_compute(KEY, compute) == "computed"
            assert await cache.get(KEY) is MISSING
            await cache.set(KEY, "v")
            assert await cache.delete(KEY) is False
            await cache.clear()
            await cache.aclose()
    assert cache.stats().redis_errors >= 5  # refused each time, and said so ...
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "wq_memo" in logged
    assert _leaks(logged) == []  # ... without the password
    assert _leaks(repr(cache)) == []
    assert "***" in repr(cache)


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:hunter2@[::1/0",
        "redis://user:hunter2@127.0.0.1:notaport/0",
        "http://user:hunter2@127.0.0.1/0",
        "redis://127.0.0.1/0?socket_timeout=abc&password=hunter2",
    ],
)
def test_a_bad_url_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ValueError, match="bad Redis URL") as raised:
        RedisCache(url)
    shown = "".join(traceback.format_exception(raised.value))
    assert "hunter2" not in shown
    assert "***" in shown


async def test_a_given_client_with_a_password_is_shown_without_it(
    guarded_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=guarded_redis.port, password=PASSWORD)
    cache = RedisCache(client, namespace="secrets", timeout=0.5)
    with caplog.at_level(logging.DEBUG):
        assert await cache.get(KEY) is MISSING
    await client.aclose()
    assert cache.stats().redis_errors == 1
    assert _leaks(repr(cache) + caplog.text) == []
    assert f"127.0.0.1:{guarded_redis.port}" in repr(cache)


async def test_a_signed_entry_past_its_expiry_is_a_miss_whatever_redis_says(
    make_redis_cache: Make, sync_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_redis_cache(secret=SECRET, ttl=0.3)
    name = key_names(cache.namespace, KEY).value
    await cache.set(KEY, ("a", "tuple"))
    sync_redis.persist(name)  # Redis's TTL removed: Redis would keep it for ever
    written = sync_redis.get(name)
    assert await cache.get(KEY) == ("a", "tuple")
    await asyncio.sleep(0.35)  # past the entry's own expiry
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await cache.get(KEY) is MISSING
        sync_redis.set(name, written)  # an old entry written back
        assert await cache.get(KEY) is MISSING
    assert cache.stats().bad_entries == 2
    assert "expired" in caplog.text

    async def fresh() -> str:
        return "fresh"

    assert await cache.get_or_compute(KEY, fresh) == "fresh"  # computed over it
    assert await cache.get(KEY) == "fresh"


async def test_the_expiry_is_under_the_signature(make_redis_cache: Make, sync_redis: Any) -> None:
    cache = make_redis_cache(secret=SECRET, ttl=60)
    name = key_names(cache.namespace, KEY).value
    await cache.set(KEY, "v")
    data = bytearray(sync_redis.get(name))
    data[4 + 32 : 4 + 32 + 8] = (2**63).to_bytes(8, "big")  # pushed to the far future
    sync_redis.set(name, bytes(data))
    assert await cache.get(KEY) is MISSING
    assert cache.stats().bad_entries == 1


def test_nothing_listening_is_a_miss_not_an_error() -> None:
    """The password forms above fail for a reason; without a password they work as usual."""
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", retry_interval=0)

    async def run() -> Any:
        try:
            return await cache.get(KEY)
        finally:
            await cache.aclose()

    assert asyncio.run(run()) is MISSING
