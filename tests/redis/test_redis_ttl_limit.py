"""A ttl (or lease) too long for Redis is refused when the cache is made, saying what to do.

Redis keeps a key's expiry as milliseconds since the epoch in a signed 64-bit integer; a longer
ttl was accepted, and then nothing was ever stored (every SET refused), or with secret= every
call raised OverflowError (the signed entry's expiry did not fit its 8 bytes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("redis.asyncio")

from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import _MAX_EXPIRY, RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
KEY = CallKey("m.f", ("long",))
SECRET = "t" * 32


@pytest.mark.parametrize("ttl", [1e16, float(sys.maxsize), sys.maxsize, 2**64, 9.3e15])
@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_ttl_past_what_redis_keeps_is_refused(ttl: float, secret: str | None) -> None:
    with pytest.raises(ValueError, match=r"ttl must be at most 9\.2e\+15 seconds") as caught:
        RedisCache("redis://127.0.0.1:6379/0", ttl=ttl, secret=secret)
    message = str(caught.value)
    assert "signed 64-bit" in message
    assert "ttl=None" in message


def test_a_lease_past_what_redis_keeps_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lease must be at most 9\.2e\+15 seconds"):
        RedisCache("redis://127.0.0.1:6379/0", lease=1e16)


async def test_a_ttl_per_store_past_what_redis_keeps_is_refused(make_redis_cache: Make) -> None:
    cache = make_redis_cache()
    with pytest.raises(ValueError, match=r"ttl must be at most 9\.2e\+15 seconds"):
        await cache.set(KEY, "v", ttl=1e16)


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_the_longest_ttl_and_lease_work(
    secret: str | None, make_redis_cache: Make, sync_redis: Any
) -> None:
    cache = make_redis_cache(ttl=_MAX_EXPIRY, lease=_MAX_EXPIRY, secret=secret)
    computed = 0

    async def compute() -> str:
        nonlocal computed
        computed += 1
        return "kept"

    assert await cache.get_or_compute(KEY, compute) == "kept"
    assert await cache.get_or_compute(KEY, compute) == "kept"
    assert computed == 1  # stored, under the longest expiry
    other = CallKey("m.f", ("set",))
    await cache.set(other, "set", ttl=_MAX_EXPIRY)
    assert await cache.get(other) == "set"
    stats = cache.stats()
    assert (stats.redis_errors, stats.bad_entries) == (0, 0)
    pttl = sync_redis.pttl(key_names(cache.namespace, KEY).value)
    assert pttl > (_MAX_EXPIRY - 60) * 1000


def test_the_bound_is_below_what_redis_refuses(redis_namespace: str, sync_redis: Any) -> None:
    """The bound is Redis's own, with room for the clock: Redis takes the longest ttl, and
    refuses an expiry one second past 2**63 - 1 ms since the epoch."""
    import redis

    name = f"{redis_namespace}:probe"
    assert sync_redis.set(name, "v", px=round(_MAX_EXPIRY * 1000))
    past = 2**63 - 1 - int(time.time() * 1000) + 1000
    with pytest.raises(redis.ResponseError, match="invalid expire time"):
        sync_redis.set(name, "v", px=past)
    assert _MAX_EXPIRY < past / 1000 < (2**63 - 1) / 1000
