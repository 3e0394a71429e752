"""The policy options used the way services get them wrong: async functions passed as cache_if or
ttl, exceptions that do not rebuild as they were, times past what a float holds, an explicit
refresh failing over a fresh entry."""

from __future__ import annotations

import asyncio
import fractions
import functools
import logging
import warnings
from typing import Any

import cachetools
import pytest
from _policy_harness import MAPPINGS, Clock, ClockedAsyncCache, Source, bounded

from wq_memo import MISSING, CachedError, ShutdownTimeout, worker_queue


async def is_not_none(value: object) -> bool:
    return value is not None


async def five_seconds(value: object) -> float:
    return 5.0


# -- async functions where a plain one is expected ------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"cache_if": is_not_none},
        {"cache_if": functools.partial(is_not_none)},
        {"ttl": five_seconds},
    ],
    ids=["async-cache_if", "partial-of-async-cache_if", "async-ttl"],
)
def test_an_async_cache_if_or_ttl_is_refused_at_decoration(options: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="plain function"):
        worker_queue(cache={}, **options)(Source())


@pytest.mark.parametrize("option", ["cache_if", "ttl"])
async def test_a_cache_if_or_ttl_returning_an_awaitable_stores_nothing(
    option: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A lambda around an async function cannot be told apart at decoration: its coroutine is
    # closed (no "never awaited" warning), the failure logged, the result returned uncached.
    wrapped = is_not_none if option == "cache_if" else five_seconds
    source = Source()
    options: dict[str, Any] = {option: lambda v: wrapped(v)}
    f = worker_queue(cache={}, **options)(source)
    with (
        caplog.at_level(logging.ERROR, logger="wq_memo"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error", RuntimeWarning)
        assert await bounded(f("a")) == "a@0"
        assert await bounded(f("a")) == "a@1"
    assert f.cache_peek("a") is MISSING
    assert f.cache_info().uncached == 2
    assert "awaitable" in caplog.text


# -- exceptions that do not rebuild as they were --------------------------------------------------


class NotFound(Exception):
    """The common pattern: the constructor takes the id, the message is built from it."""

    def __init__(self, id: str) -> None:
        super().__init__(f"{id} not found")
        self.id = id


async def test_an_error_rebuilt_with_other_arguments_is_not_remembered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    source = Source()
    source.failures["a"] = NotFound("a")
    f = worker_queue(cache={}, cache_errors={NotFound: 5.0}, timer=clock)(source)
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        for _ in range(2):
            with pytest.raises(NotFound) as raised:
                await bounded(f("a"))
            assert raised.value.args == ("a not found",)
            assert raised.value.id == "a"
    assert source.calls == ["a", "a"]  # not remembered: computed again
    assert "cannot be rebuilt" in caplog.text


# -- times past what a float holds ----------------------------------------------------------------


async def test_a_ttl_too_large_for_a_float_is_forever() -> None:
    clock = Clock()
    source = Source()
    f = worker_queue(cache={}, ttl=10**400, timer=clock)(source)
    g = worker_queue(cache={}, ttl=lambda v: 10**400, timer=clock)(source)
    assert await bounded(f("a")) == "a@0"
    assert await bounded(g("b")) == "b@1"
    g.cache_prime("primed", "c")
    clock.now = 1e300
    assert await bounded(f("a")) == "a@0"
    assert await bounded(g("b")) == "b@1"
    assert g.cache_peek("c") == "primed"
    assert g.cache_info().uncached == 0


# -- an explicit refresh failing over a fresh entry -----------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_a_failed_refresh_of_a_fresh_entry_leaves_it_even_if_the_error_is_listed(
    kind: str,
) -> None:
    clock = Clock()
    source = Source()
    f = worker_queue(
        cache=MAPPINGS[kind](clock), ttl=10, cache_errors={ConnectionError: 5.0}, timer=clock
    )(source)
    assert await bounded(f("a")) == "a@0"
    source.failures["a"] = ConnectionError("down")
    with pytest.raises(ConnectionError):
        await bounded(f.refresh("a"))
    assert f.cache_peek("a") == "a@0"
    assert await bounded(f("a")) == "a@0"
    assert source.calls == ["a", "a"]
    clock.now = 10  # expired: the next failure is remembered
    with pytest.raises(ConnectionError):
        await bounded(f("a"))
    assert isinstance(f.cache_peek("a"), CachedError)


# -- a prime whose ttl is zero ----------------------------------------------------------------


def gone_at_once(value: object) -> float:
    return 0.0 if value == "gone" else 10.0


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_a_prime_that_lives_zero_seconds_forgets_what_the_key_held(kind: str) -> None:
    # A value primed with a ttl of 0 is not kept, and what the key held (a value, a remembered
    # error) goes, as with an invalidation: the prime must not leave the older entry served.
    clock = Clock()
    source = Source()
    f = worker_queue(
        cache=MAPPINGS[kind](clock),
        ttl=gone_at_once,
        cache_errors={TimeoutError: 5.0},
        timer=clock,
    )(source)
    source.failures["a"] = TimeoutError("slow")
    with pytest.raises(TimeoutError):
        await bounded(f("a"))
    assert await bounded(f("b")) == "b@1"
    f.cache_prime("gone", "a")
    f.cache_prime("gone", "b")
    assert f.cache_peek("a") is MISSING
    assert f.cache_peek("b") is MISSING
    del source.failures["a"]
    assert await bounded(f("a")) == "a@2"
    assert await bounded(f("b")) == "b@3"


async def test_a_prime_that_lives_zero_seconds_forgets_the_computation_under_way() -> None:
    clock = Clock()
    source = Source()
    source.gate = gate = asyncio.Event()
    f = worker_queue(cache={}, ttl=gone_at_once, timer=clock)(source)
    first = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    f.cache_prime("gone", "a")
    gate.set()
    assert await bounded(first) == "a@0"  # its caller still gets it
    assert f.cache_peek("a") is MISSING  # but it is not stored over the prime


async def test_an_async_prime_that_lives_zero_seconds_removes_the_entry() -> None:
    clock = Clock()
    source = Source()
    cache = ClockedAsyncCache(clock)
    f = worker_queue(cache=cache, ttl=gone_at_once, name="gone")(source)
    assert await bounded(f("a")) == "a@0"
    await bounded(f.acache_prime("gone", "a"))
    assert await bounded(f.acache_peek("a")) is MISSING
    assert await bounded(f("a")) == "a@1"


# -- listeners on a clock that moves between two reads ----------------------------------------


class Ticking:
    """A clock that moves one second at each read, as a real one moves a little."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def test_listeners_count_each_call_once_when_the_entry_expires_between_two_reads() -> None:
    from wq_memo.metrics import Listener, add_listener, remove_listener

    class Told(Listener):
        def __init__(self) -> None:
            self.hits = 0
            self.misses = 0

        def on_hit(self, name: str) -> None:
            self.hits += 1

        def on_miss(self, name: str) -> None:
            self.misses += 1

    listener = Told()
    add_listener(listener)
    try:
        f = worker_queue(cache={}, ttl=4, timer=Ticking(), name="ticking")(Source())
        for _ in range(12):
            await bounded(f("a"))
        info = f.cache_info()
        assert info.hits + info.misses == 12
        assert (listener.hits, listener.misses) == (info.hits, info.misses)
    finally:
        remove_listener(listener)


# -- a TLRUCache, whose ttu reads the values ------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"ttl": 5}, {"cache_errors": {KeyError: 3.0}}, {"stale_if_error": 10}],
    ids=["ttl", "cache_errors", "stale_if_error"],
)
def test_options_that_date_entries_are_refused_with_a_tlru_cache(options: dict[str, Any]) -> None:
    # Its ttu(key, value, now) would be handed wq_memo's dated entry, not the result.
    cache: cachetools.TLRUCache[Any, Any] = cachetools.TLRUCache(
        10, ttu=lambda k, v, now: now + v["max_age"]
    )
    with pytest.raises(ValueError, match="TLRUCache"):
        worker_queue(cache=cache, **options)(Source())


async def test_cache_if_alone_works_with_a_tlru_cache() -> None:
    cache: cachetools.TLRUCache[Any, Any] = cachetools.TLRUCache(10, ttu=lambda k, v, now: now + 60)
    f = worker_queue(cache=cache, cache_if=lambda v: v != "a@0")(Source())
    assert await bounded(f("a")) == "a@0"
    assert await bounded(f("a")) == "a@1"
    assert await bounded(f("a")) == "a@1"


@pytest.mark.parametrize(
    "options",
    [{"ttl": 5}, {"cache_errors": {KeyError: 3.0}}, {"stale_if_error": 10}],
    ids=["ttl", "cache_errors", "stale_if_error"],
)
def test_options_that_date_entries_are_refused_with_a_cache_that_sizes_values(
    options: dict[str, Any],
) -> None:
    # Its getsizeof(value) would be handed wq_memo's dated entry: len() of it fails every store.
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(1000, getsizeof=len)
    with pytest.raises(ValueError, match="getsizeof"):
        worker_queue(cache=cache, **options)(Source())


async def test_cache_if_alone_works_with_a_cache_that_sizes_values() -> None:
    cache: cachetools.LRUCache[Any, Any] = cachetools.LRUCache(1000, getsizeof=len)
    f = worker_queue(cache=cache, cache_if=lambda v: v != "a@0")(Source())
    assert await bounded(f("a")) == "a@0"
    assert await bounded(f("a")) == "a@1"
    assert await bounded(f("a")) == "a@1"
    assert f.cache_info().currsize == 3


# -- a number of seconds that is neither an int nor a float -------------------------------------


async def test_a_ttl_may_be_any_real_number() -> None:
    # A numpy scalar, a Fraction: numbers, though not int or float (Fraction stands in here).
    clock = Clock()
    source = Source()
    ttl_of: Any = lambda v: fractions.Fraction(5, 2)  # noqa: E731
    three: Any = fractions.Fraction(3)
    f = worker_queue(cache={}, ttl=ttl_of, timer=clock)(source)
    g = worker_queue(cache={}, ttl=three, timer=clock)(source)
    assert await bounded(f("a")) == "a@0"
    assert await bounded(g("b")) == "b@1"
    clock.now = 2
    assert (f.cache_peek("a"), g.cache_peek("b")) == ("a@0", "b@1")
    clock.now = 2.5
    assert (f.cache_peek("a"), g.cache_peek("b")) == (MISSING, "b@1")
    clock.now = 3
    assert g.cache_peek("b") is MISSING
    assert f.cache_info().uncached == 0


# -- the queue's own shutdown errors ----------------------------------------------------------


async def test_a_shutdown_error_from_a_nested_call_is_never_remembered() -> None:
    # ShutdownTimeout is a TimeoutError, QueueShutDown a RuntimeError: a computation that fails
    # with one because another function's queue closed under it must not have that failure
    # raised from the cache once the queue is back.
    clock = Clock()
    started = asyncio.Event()
    hold = asyncio.Event()
    calls: list[str] = []

    @worker_queue(finish_timeout=0.0)
    async def inner(k: str) -> str:
        started.set()
        await hold.wait()
        return k

    @worker_queue(cache={}, cache_errors={TimeoutError: 60.0, RuntimeError: 60.0}, timer=clock)
    async def outer(k: str) -> str:
        calls.append(k)
        return await inner(k)

    call = asyncio.ensure_future(outer("a"))
    await bounded(started.wait())
    await bounded(inner.queue.aclose())  # its callers get ShutdownTimeout
    with pytest.raises(ShutdownTimeout):
        await bounded(call)
    assert outer.cache_peek("a") is MISSING
    hold.set()
    assert await bounded(outer("a")) == "a"
    assert calls == ["a", "a"]
