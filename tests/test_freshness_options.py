"""The freshness parameters (refresh_backoff, jitter, timer) are checked at decoration, with
refresh_after or without it, and the error says what to pass instead."""

from __future__ import annotations

import time
from typing import Any

import cachetools
import pytest
from test_decorator_async_cache import MemoryAsyncCache

from wq_memo import worker_queue


async def g(x: int) -> int:
    return x


CACHES: dict[str, Any] = {
    "dict": dict,
    "TTLCache": lambda: cachetools.TTLCache(10, ttl=60),
    "none": lambda: None,
    "async": MemoryAsyncCache,
}

BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"refresh_backoff": -5}, ValueError, r"refresh_backoff must be .* got -5; pass how long"),
    ({"refresh_backoff": 0}, ValueError, "refresh_backoff must be a number of seconds > 0"),
    ({"refresh_backoff": float("inf")}, ValueError, "refresh_backoff"),
    ({"refresh_backoff": "1"}, ValueError, "refresh_backoff"),
    ({"refresh_backoff": True}, ValueError, "refresh_backoff"),
    ({"jitter": 7}, ValueError, r"jitter must be a fraction .* got 7; pass jitter=0.1"),
    ({"jitter": -0.1}, ValueError, "jitter must be a fraction"),
    ({"jitter": 1}, ValueError, "jitter must be a fraction"),
    ({"jitter": "0.1"}, ValueError, "jitter must be a fraction"),
    ({"timer": "x"}, TypeError, r"timer must be a function .* got 'x'; pass a clock"),
    ({"timer": 5.0}, TypeError, "timer must be a function returning seconds"),
]


SETUPS = [(kind, after) for kind in CACHES for after in (None, 5) if kind != "none" or not after]
"""Each kind of cache, without refresh_after and with it (which needs a cache)."""


@pytest.mark.parametrize(("kind", "refresh_after"), SETUPS, ids=[f"{k}-{a}" for k, a in SETUPS])
@pytest.mark.parametrize(("options", "error", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_a_bad_freshness_parameter_is_refused(
    kind: str,
    refresh_after: float | None,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        worker_queue(cache=CACHES[kind](), name="checked", refresh_after=refresh_after, **options)(
            g
        )


def test_good_freshness_parameters_are_accepted_without_refresh_after() -> None:
    f = worker_queue(cache={}, refresh_backoff=0.5, jitter=0.25, timer=time.monotonic)(g)
    assert f.cache_info().refreshes == 0


def test_a_bad_refresh_after_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="or None for no refresh-ahead"):
        worker_queue(cache={}, refresh_after=-1)(g)
