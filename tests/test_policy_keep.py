"""cache_if and ttl: which results are stored, and for how long, with every kind of cache."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import cachetools
import pytest
from _policy_harness import MAPPINGS, Clock, ClockedAsyncCache, Source, bounded, settle

from wq_memo import MISSING, worker_queue
from wq_memo._policy import Kept


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_cache_if_false_goes_to_every_caller_and_is_not_stored(kind: str) -> None:
    clock = Clock()
    source = Source()
    source.results["empty"] = None
    asked: list[Any] = []

    def keep(value: Any) -> bool:
        asked.append(value)
        return value is not None

    f = worker_queue(cache=MAPPINGS[kind](clock), cache_if=keep, timer=clock)(source)
    source.gate = asyncio.Event()
    first = asyncio.ensure_future(f("empty"))
    await bounded(source.started.wait())
    joined = asyncio.ensure_future(f("empty"))
    await settle()
    source.gate.set()
    assert await bounded(asyncio.gather(first, joined)) == [None, None]
    assert asked == [None]  # once per computation
    assert f.cache_peek("empty") is MISSING
    assert await bounded(f("empty")) is None
    assert source.calls == ["empty", "empty"]
    info = f.cache_info()
    assert (info.misses, info.joined, info.uncached) == (2, 1, 2)
    # A result it keeps is stored and hit.
    assert await bounded(f("full")) == "full@2"
    assert await bounded(f("full")) == "full@2"
    assert f.cache_info().hits == 1


async def test_cache_if_with_an_async_cache() -> None:
    clock = Clock()
    cache = ClockedAsyncCache(clock)
    source = Source()
    source.results["none"] = None
    f = worker_queue(cache=cache, cache_if=lambda v: v is not None, name="t.cache_if")(source)
    assert await bounded(f("none")) is None
    assert await bounded(f("none")) is None
    assert await bounded(f("x")) == "x@2"
    assert await bounded(f("x")) == "x@2"
    assert source.calls == ["none", "none", "x"]
    assert f.cache_info().uncached == 2
    assert await f.acache_peek("none") is MISSING


async def test_cache_if_failing_is_logged_and_the_result_returned_uncached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(value: Any) -> bool:
        raise RuntimeError("bad predicate")

    source = Source()
    f = worker_queue(cache={}, cache_if=broken)(source)
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert await bounded(f("a")) == "a@0"
    assert f.cache_peek("a") is MISSING
    assert "cache_if failed" in caplog.text
    assert f.cache_info().uncached == 1


async def test_prime_is_stored_whatever_cache_if_says() -> None:
    f = worker_queue(cache={}, cache_if=lambda v: False)(Source())
    f.cache_prime("primed", "a")
    assert f.cache_peek("a") == "primed"
    assert await bounded(f("a")) == "primed"


async def test_without_a_policy_the_cache_holds_plain_values() -> None:
    """No policy option, or cache_if alone: entries are the values, read by the usual hit path."""
    plain = worker_queue(cache={})(Source())
    only_if = worker_queue(cache={}, cache_if=lambda v: True)(Source())
    for f in (plain, only_if):
        await bounded(f("a"))
        assert f.cache == {("a",): "a@0"}
    dated = worker_queue(cache={}, ttl=5)(Source())
    await bounded(dated("a"))
    assert dated.cache is not None
    assert type(dated.cache[("a",)]) is Kept  # type: ignore[index]
    # The hit path is chosen at decoration: the plain one reads no clock.
    code: Any = plain
    assert "now" not in code.__code__.co_freevars
    code = dated
    assert "now" in code.__code__.co_freevars


@pytest.mark.parametrize("kind", ["dict", "lru"])
async def test_a_number_ttl_is_enforced_with_a_dict_or_an_lru_cache(kind: str) -> None:
    clock = Clock()
    source = Source()
    f = worker_queue(cache=MAPPINGS[kind](clock), ttl=5, timer=clock)(source)
    assert await bounded(f("a")) == "a@0"
    clock.now = 4.999
    assert await bounded(f("a")) == "a@0"
    assert f.cache_peek("a") == "a@0"
    clock.now = 5.0
    assert f.cache_peek("a") is MISSING
    assert await bounded(f("a")) == "a@1"
    assert f.cache_info().hits == 1


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_a_ttl_function_gives_each_result_its_lifetime(kind: str) -> None:
    clock = Clock()
    source = Source()
    source.results = {"short": "", "long": "full"}
    f = worker_queue(
        cache=MAPPINGS[kind](clock), ttl=lambda v: 5 if v == "" else 3600, timer=clock
    )(source)
    await bounded(f("short"))
    await bounded(f("long"))
    clock.now = 10
    await bounded(f("short"))
    await bounded(f("long"))
    assert source.calls == ["short", "long", "short"]
    clock.now = 999  # below the TTLCache's own 1000 too
    await bounded(f("long"))
    assert source.calls == ["short", "long", "short"]


async def test_with_a_ttl_cache_the_shorter_lifetime_wins() -> None:
    clock = Clock()
    source = Source()
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(100, ttl=10, timer=clock)
    f = worker_queue(cache=cache, ttl=lambda v: 3 if v == "a@0" else 30)(source)
    await bounded(f("a"))  # lives 3 (its own)
    await bounded(f("b"))  # lives 10 (the cache's)
    clock.now = 3
    assert f.cache_peek("a") is MISSING
    assert f.cache_peek("b") == "b@1"
    clock.now = 10
    assert f.cache_peek("b") is MISSING
    assert await bounded(f("b")) == "b@2"


async def test_a_ttl_of_none_is_the_caches_own_lifetime() -> None:
    clock = Clock()
    source = Source()
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(100, ttl=10, timer=clock)
    f = worker_queue(cache=cache, ttl=lambda v: None)(source)
    await bounded(f("a"))
    clock.now = 9.9
    assert f.cache_peek("a") == "a@0"
    clock.now = 10
    assert f.cache_peek("a") is MISSING
    g = worker_queue(cache={}, ttl=lambda v: None, timer=clock)(Source())
    await bounded(g("a"))
    clock.now = 1e9
    assert g.cache_peek("a") == "a@0"


@pytest.mark.parametrize("bad", [-1, math.nan, "5", True, [1]])
async def test_a_bad_ttl_value_is_logged_once_and_the_result_returned_uncached(
    bad: object, caplog: pytest.LogCaptureFixture
) -> None:
    source = Source()
    ttl: Any = lambda v: bad  # noqa: E731  # a bad value, as a function may return one
    f = worker_queue(cache={}, ttl=ttl)(source)
    with caplog.at_level(logging.DEBUG, logger="wq_memo"):
        assert await bounded(f("a")) == "a@0"
        assert await bounded(f("a")) == "a@1"
    assert f.cache_peek("a") is MISSING
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert repr(bad) in errors[0].getMessage()
    assert f.cache_info().uncached == 2


async def test_a_failing_ttl_function_is_logged_and_the_result_returned_uncached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def ttl(value: Any) -> float:
        raise KeyError("no field")

    f = worker_queue(cache={}, ttl=ttl)(Source())
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert await bounded(f("a")) == "a@0"
    assert f.cache_peek("a") is MISSING
    assert "ttl(result) failed" in caplog.text


async def test_a_ttl_of_zero_stores_nothing() -> None:
    f = worker_queue(cache={}, ttl=lambda v: 0)(Source())
    await bounded(f("a"))
    assert f.cache_peek("a") is MISSING
    assert f.cache_info().uncached == 1


async def test_a_prime_takes_the_ttl_and_a_bad_one_fails_the_prime() -> None:
    clock = Clock()
    f = worker_queue(cache={}, ttl=lambda v: 2 if v == "short" else -1, timer=clock)(Source())
    f.cache_prime("short", "a")
    assert f.cache_peek("a") == "short"
    clock.now = 2
    assert f.cache_peek("a") is MISSING
    with pytest.raises(ValueError, match="ttl"):
        f.cache_prime("bad", "b")
    assert f.cache_peek("b") is MISSING


async def test_with_an_async_cache_the_ttl_is_sets_ttl() -> None:
    clock = Clock()
    cache = ClockedAsyncCache(clock)
    source = Source()
    source.results = {"short": "", "none": None}
    f = worker_queue(
        cache=cache, ttl=lambda v: 5 if v == "" else (-1 if v is None else None), name="t.ttl"
    )(source)
    await bounded(f("short"))
    await bounded(f("long"))
    await bounded(f("none"))  # a bad ttl: returned, not stored
    assert cache.ttls == [5.0, None]
    clock.now = 5
    await bounded(f("short"))
    await bounded(f("long"))
    assert source.calls == ["short", "long", "none", "short"]
    assert f.cache_info().uncached == 1
    await f.acache_prime("p", "primed")
    assert cache.ttls[-1] is None
    g = worker_queue(cache=ClockedAsyncCache(clock), ttl=7, name="t.ttl7")(Source())
    await bounded(g("a"))
    assert g.cache.ttls == [7.0]  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_one_computation_per_key_with_a_ttl(kind: str) -> None:
    clock = Clock()
    source = Source()
    source.gate = asyncio.Event()
    f = worker_queue(cache=MAPPINGS[kind](clock), ttl=lambda v: 5, timer=clock)(source)
    calls = [asyncio.ensure_future(f("a")) for _ in range(5)]
    await bounded(source.started.wait())
    await settle()
    source.gate.set()
    assert await bounded(asyncio.gather(*calls)) == ["a@0"] * 5
    assert source.calls == ["a"]


async def test_an_invalidated_computation_stores_nothing_with_a_ttl() -> None:
    clock = Clock()
    source = Source()
    source.gate = asyncio.Event()
    f = worker_queue(cache={}, ttl=5, timer=clock)(source)
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    assert not f.cache_invalidate("a")
    source.gate.set()
    assert await bounded(call) == "a@0"
    assert f.cache_peek("a") is MISSING


async def test_listeners_are_told_of_fresh_entries_only_as_hits() -> None:
    from wq_memo.metrics import Listener, add_listener, remove_listener

    class Hits(Listener):
        def __init__(self) -> None:
            self.hits = 0

        def on_hit(self, name: str) -> None:
            self.hits += 1

    clock = Clock()
    listener = Hits()
    add_listener(listener)
    try:
        f = worker_queue(cache={}, ttl=5, timer=clock, name="told")(Source())
        await bounded(f("a"))
        await bounded(f("a"))
        clock.now = 5
        await bounded(f("a"))  # expired: a miss
        info = f.cache_info()
        assert (info.hits, info.misses) == (1, 2)
        assert listener.hits == 1
    finally:
        remove_listener(listener)


async def test_a_prime_with_a_bad_ttl_leaves_the_computation_under_way_alone() -> None:
    clock = Clock()
    source = Source()
    source.gate = asyncio.Event()
    f = worker_queue(cache={}, ttl=lambda v: -1 if v == "bad" else 5, timer=clock)(source)
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    with pytest.raises(ValueError, match="ttl"):
        f.cache_prime("bad", "a")
    source.gate.set()
    assert await bounded(call) == "a@0"
    assert f.cache_peek("a") == "a@0"  # stored: the failed prime forgot nothing
