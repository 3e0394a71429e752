"""RedisCache as an AsyncCache against a real Redis server."""

from __future__ import annotations

import asyncio
import logging
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from wq_memo.backends import MISSING, AsyncCache, CallKey, SingleFlightCache
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

SECRET = "s" * 32
Make = Callable[..., RedisCache]


class _SameRepr:
    def __repr__(self) -> str:
        return "same"


async def test_is_an_async_and_single_flight_cache(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    assert isinstance(cache, AsyncCache)
    assert isinstance(cache, SingleFlightCache)


async def test_get_set_delete_and_none_is_a_value(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    key = CallKey("m.f", (1,))
    assert await cache.get(key) is MISSING
    await cache.set(key, None)
    assert await cache.get(key) is None
    await cache.set(key, {"a": [1, 2]})
    assert await cache.get(key) == {"a": [1, 2]}
    assert await cache.delete(key) is True
    assert await cache.delete(key) is False
    assert await cache.get(key) is MISSING
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 2)


async def test_ttl_uses_redis_expiry(make_redis_cache: Make, sync_redis: Any) -> None:
    cache = make_redis_cache(ttl=100)
    key = CallKey("m.f", ("ttl",))
    await cache.set(key, 1)
    name = key_names(cache.namespace, key).value
    assert 99_000 < sync_redis.pttl(name) <= 100_000
    await cache.set(key, 1, ttl=5)
    assert 4_000 < sync_redis.pttl(name) <= 5_000
    await make_redis_cache().set(key, 1)
    assert sync_redis.pttl(name) == -1


async def test_values_keep_their_types_with_a_secret(make_redis_cache: Make) -> None:
    cache = make_redis_cache(secret=SECRET)
    value = ((1, 2.0), frozenset({"x"}), b"raw", None)
    await cache.set(CallKey("m.f", ()), value)
    assert await cache.get(CallKey("m.f", ())) == value


async def test_keys_with_equal_repr_or_equal_value_of_other_type_are_separate(
    make_redis_cache: Make,
) -> None:
    cache = make_redis_cache(secret=SECRET)
    keys = [(1,), (1.0,), (True,), ("1",), (b"1",), ("a,b",), ("a", "b"), ((1, 2),), ("(1, 2)",)]
    for i, key in enumerate(keys):
        await cache.set(CallKey("m.f", key), i)
    assert [await cache.get(CallKey("m.f", key)) for key in keys] == list(range(len(keys)))
    assert await cache.get(CallKey("m.g", (1,))) is MISSING


async def test_unencodable_key_raises_type_error(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    with pytest.raises(TypeError, match="pass key="):
        await cache.get(CallKey("m.f", (_SameRepr(),)))

    async def compute() -> int:
        raise AssertionError("must not run")

    with pytest.raises(TypeError, match="pass key="):
        await cache.get_or_compute(CallKey("m.f", (_SameRepr(),)), compute)


async def test_json_unencodable_value_is_returned_uncached_and_logged(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_redis_cache()
    key = CallKey("m.f", ("tuple",))
    calls = 0

    async def compute() -> tuple[int, int]:
        nonlocal calls
        calls += 1
        return (1, 2)

    with caplog.at_level(logging.DEBUG, logger="wq_memo"):
        assert await cache.get_or_compute(key, compute) == (1, 2)
        assert await cache.get_or_compute(key, compute) == (1, 2)
    assert calls == 2
    assert await cache.get(key) is MISSING
    assert cache.stats().unencodable == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per function, then at debug level
    assert "returned uncached" in warnings[0].getMessage()
    await cache.set(key, {1, 2})
    assert await cache.get(key) is MISSING


async def test_tampered_entry_is_a_logged_miss_and_is_recomputed(
    make_redis_cache: Make, sync_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_redis_cache(secret=SECRET)
    key = CallKey("m.f", ("tamper",))
    await cache.set(key, "good")
    name = key_names(cache.namespace, key).value
    data = sync_redis.get(name)
    sync_redis.set(name, data[:-1] + bytes([data[-1] ^ 1]))
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await cache.get(key) is MISSING
    assert "signature" in caplog.text
    assert cache.stats().bad_entries == 1

    async def compute() -> str:
        return "recomputed"

    assert await cache.get_or_compute(key, compute) == "recomputed"
    assert await cache.get(key) == "recomputed"


async def test_unsigned_entries_are_misses(make_redis_cache: Make, sync_redis: Any) -> None:
    signed = make_redis_cache(secret=SECRET)
    plain = make_redis_cache()
    key = CallKey("m.f", ("unsigned",))
    name = key_names(signed.namespace, key).value
    for data in (pickle.dumps("raw pickle"), b"wq1j1", b"garbage"):
        sync_redis.set(name, data)
        assert await signed.get(key) is MISSING
    await signed.set(key, "signed")
    assert await plain.get(key) is MISSING
    assert signed.stats().bad_entries == 3
    assert plain.stats().bad_entries == 1


NAMESPACE_TAILS = ["", ":v:sub", ":", "::v", "*", "?", "[ab]", "\\", ":l:x", "*:v:*"]


async def test_clear_touches_only_its_own_namespace_whatever_its_characters(
    make_redis_cache: Make, redis_namespace: str, sync_redis: Any
) -> None:
    caches = [make_redis_cache(namespace=redis_namespace + tail) for tail in NAMESPACE_TAILS]
    for cache in caches:
        for i in range(3):
            await cache.set(CallKey("m.f", (i,)), cache.namespace)
    for n, cache in enumerate(caches):
        await cache.clear()
        for m, other in enumerate(caches):
            expected = [MISSING] * 3 if m <= n else [other.namespace] * 3
            assert [await other.get(CallKey("m.f", (i,))) for i in range(3)] == expected, (n, m)
    for cache in caches:
        assert not sync_redis.exists(
            *(key_names(cache.namespace, CallKey("m.f", (i,))).value for i in range(3))
        )


async def test_namespaces_and_function_names_never_share_a_name(make_redis_cache: Make) -> None:
    # Namespace "X" with function "sub:v:f" against namespace "X:v:sub" with function "f".
    outer = make_redis_cache()
    inner = make_redis_cache(namespace=outer.namespace + ":v:sub")
    await outer.set(CallKey("sub:v:f", (1,)), "outer")
    await inner.set(CallKey("f", (1,)), "inner")
    assert await outer.get(CallKey("sub:v:f", (1,))) == "outer"
    assert await inner.get(CallKey("f", (1,))) == "inner"


async def test_int_keys_of_any_length_are_keys(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    huge = 10**10_000  # str() of it raises ValueError since Python 3.11

    async def compute() -> str:
        return "huge"

    assert await cache.get_or_compute(CallKey("m.f", (huge,)), compute) == "huge"
    assert await cache.get(CallKey("m.f", (huge,))) == "huge"
    assert await cache.get(CallKey("m.f", (-huge,))) is MISSING
    assert await cache.get(CallKey("m.f", (huge + 1,))) is MISSING


async def test_plain_keys_without_call_key_work(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    await cache.set(("a", 1), 5)
    assert await cache.get(("a", 1)) == 5
    assert await cache.get(CallKey("", ("a", 1))) == 5


def test_argument_checks() -> None:
    from redis.asyncio import Redis

    with pytest.raises(TypeError, match="URL"):
        RedisCache(6379)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad Redis URL"):
        RedisCache("http://127.0.0.1")
    with pytest.raises(ValueError, match="decode_responses"):
        RedisCache(Redis(decode_responses=True))
    with pytest.raises(ValueError, match="secret"):
        RedisCache("redis://127.0.0.1", secret="short")
    bad: dict[str, Any]
    for bad in ({"timeout": 0}, {"lease": -1}, {"wait": float("nan")}, {"ttl": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RedisCache("redis://127.0.0.1", **bad)


async def test_given_client_is_used_and_left_open(redis_url: str, redis_namespace: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        cache = RedisCache(client, namespace=redis_namespace)
        await cache.set(CallKey("m.f", ()), 1)
        await cache.aclose()
        assert await client.ping()
        assert await RedisCache(client, namespace=redis_namespace).get(CallKey("m.f", ())) == 1
    finally:
        await client.aclose()


def test_one_cache_serves_successive_event_loops(redis_url: str, redis_namespace: str) -> None:
    cache = RedisCache(redis_url, namespace=redis_namespace)

    async def roundtrip(i: int) -> Any:
        await cache.set(CallKey("m.f", ()), i)
        return await cache.get(CallKey("m.f", ()))

    assert asyncio.run(roundtrip(1)) == 1
    assert asyncio.run(roundtrip(2)) == 2  # the first loop's connections are dropped quietly
    asyncio.run(cache.aclose())
    assert cache.stats().redis_errors == 0


def test_repr_hides_the_password() -> None:
    text = repr(RedisCache("redis://user:hunter2@127.0.0.1:6379/0", namespace="n"))
    assert "hunter2" not in text
    assert "redis://user:***@127.0.0.1:6379/0" in text
    assert repr(RedisCache("redis://127.0.0.1/1")) == (
        "RedisCache('redis://127.0.0.1/1', namespace='wq_memo')"
    )


def test_cache_used_from_a_loop_that_is_still_running_elsewhere(
    redis_url: str, redis_namespace: str
) -> None:
    cache = RedisCache(redis_url, namespace=redis_namespace)
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever)
    thread.start()
    try:
        done = asyncio.run_coroutine_threadsafe(cache.set(CallKey("m.f", ()), 1), other)
        done.result(10)

        async def here() -> Any:
            return await cache.get(CallKey("m.f", ()))

        assert asyncio.run(here()) == 1  # the other loop's connections are aborted on it
        asyncio.run(cache.aclose())
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(10)
        other.run_until_complete(asyncio.sleep(0))  # let the aborts finish
        other.close()
    assert cache.stats().redis_errors == 0


def test_package_imports_without_redis() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import wq_memo, wq_memo.backends\n"
        "try:\n"
        "    import wq_memo.backends.redis\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "pip install 'wq_memo[redis]'" in out.stdout
