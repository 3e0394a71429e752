"""cache_errors and stale_if_error with in-process caches; the options refused at decoration."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import cachetools
import pytest
from _policy_harness import MAPPINGS, Clock, ClockedAsyncCache, Source, bounded, settle

from wq_memo import MISSING, CachedError, worker_queue

V = TypeVar("V")


class Unbuildable(Exception):
    def __init__(self, code: int, *, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def remembering(clock: Clock, kind: str = "dict", **options: Any) -> tuple[Source, Any]:
    source = Source()
    options.setdefault("cache_errors", {TimeoutError: 2.0})
    f = worker_queue(cache=MAPPINGS[kind](clock), timer=clock, **options)(source)
    return source, f


# -- cache_errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_a_remembered_error_is_raised_anew_without_computing(kind: str) -> None:
    clock = Clock()
    source, f = remembering(clock, kind)
    source.failures["a"] = TimeoutError("slow", 3)
    with pytest.raises(TimeoutError) as first:
        await bounded(f("a"))
    raised = []
    for _ in range(2):
        clock.now += 0.9
        with pytest.raises(TimeoutError) as again:
            await bounded(f("a"))
        raised.append(again.value)
    assert source.calls == ["a"]
    assert [type(e) for e in raised] == [TimeoutError, TimeoutError]
    assert all(e.args == ("slow", 3) for e in raised)
    # A new exception each time, with a traceback of its own.
    assert len({id(first.value), *map(id, raised)}) == 3
    assert raised[0].__traceback__ is not raised[1].__traceback__
    clock.now = 2.0
    with pytest.raises(TimeoutError):
        await bounded(f("a"))
    assert source.calls == ["a", "a"]
    del source.failures["a"]
    clock.now = 4.0
    assert await bounded(f("a")) == "a@2"


async def test_exceptions_outside_cache_errors_are_never_cached() -> None:
    clock = Clock()
    source, f = remembering(clock)
    source.failures["a"] = ValueError("nope")
    for _ in range(2):
        with pytest.raises(ValueError, match="nope"):
            await bounded(f("a"))
    assert source.calls == ["a", "a"]
    assert f.cache_peek("a") is MISSING


async def test_a_subclass_is_remembered_as_itself_for_its_base_classes_time() -> None:
    clock = Clock()
    source, f = remembering(clock, cache_errors={OSError: 1.0, ConnectionError: 5.0})
    source.failures["a"] = ConnectionResetError("reset")
    with pytest.raises(ConnectionResetError):
        await bounded(f("a"))
    assert f.cache_peek("a") == CachedError(ConnectionResetError, ("reset",))
    clock.now = 1.0  # the first of the types it is an instance of gives its time
    assert f.cache_peek("a") is MISSING


async def test_cache_peek_reports_a_remembered_error_apart_from_values_and_misses() -> None:
    clock = Clock()
    source, f = remembering(clock)
    source.failures["a"] = TimeoutError("t")
    assert f.cache_peek("a") is MISSING
    with pytest.raises(TimeoutError):
        await bounded(f("a"))
    peeked = f.cache_peek("a")
    assert isinstance(peeked, CachedError)
    assert peeked.type is TimeoutError
    assert peeked.args == ("t",)
    rebuilt = peeked.rebuild()
    assert type(rebuilt) is TimeoutError
    assert rebuilt.args == ("t",)
    assert await bounded(f("b")) == "b@1"
    assert f.cache_peek("b") == "b@1"
    assert await f.acache_peek("a") == peeked
    clock.now = 2.0
    assert f.cache_peek("a") is MISSING


@pytest.mark.parametrize("how", ["invalidate", "clear", "prime"])
async def test_invalidate_clear_and_prime_forget_a_remembered_error(how: str) -> None:
    clock = Clock()
    source, f = remembering(clock)
    source.failures["a"] = TimeoutError("t")
    with pytest.raises(TimeoutError):
        await bounded(f("a"))
    del source.failures["a"]
    if how == "invalidate":
        assert f.cache_invalidate("a")
        assert await bounded(f("a")) == "a@1"
    elif how == "clear":
        f.cache_clear()
        assert await bounded(f("a")) == "a@1"
    else:
        f.cache_prime("primed", "a")
        assert await bounded(f("a")) == "primed"


async def test_every_caller_of_the_failing_computation_gets_the_error_once_remembered() -> None:
    clock = Clock()
    source, f = remembering(clock)
    source.failures["a"] = TimeoutError("t")
    source.gate = asyncio.Event()
    calls = [asyncio.ensure_future(f("a")) for _ in range(3)]
    await bounded(source.started.wait())
    await settle()
    source.gate.set()
    outcomes = await bounded(asyncio.gather(*calls, return_exceptions=True))
    assert all(isinstance(o, TimeoutError) for o in outcomes)
    assert source.calls == ["a"]
    assert f.cache_info().joined == 2
    with pytest.raises(TimeoutError):
        await bounded(f("a"))
    assert source.calls == ["a"]


async def test_an_invalidated_computation_remembers_nothing() -> None:
    clock = Clock()
    source, f = remembering(clock)
    source.failures["a"] = TimeoutError("t")
    source.gate = asyncio.Event()
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    f.cache_invalidate("a")
    source.gate.set()
    with pytest.raises(TimeoutError):
        await bounded(call)
    assert f.cache_peek("a") is MISSING
    del source.failures["a"]
    assert await bounded(f("a")) == "a@1"


async def test_an_error_that_cannot_be_rebuilt_is_not_remembered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    source, f = remembering(clock, cache_errors={Unbuildable: 5.0})
    source.failures["a"] = Unbuildable(3, detail="x")
    with caplog.at_level(logging.WARNING, logger="wq_memo"), pytest.raises(Unbuildable):
        await bounded(f("a"))
    assert "cannot be rebuilt" in caplog.text
    assert f.cache_peek("a") is MISSING


async def test_a_remembered_error_of_zero_seconds_is_not_remembered() -> None:
    clock = Clock()
    source, f = remembering(clock, cache_errors={TimeoutError: 0})
    source.failures["a"] = TimeoutError()
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await bounded(f("a"))
    assert source.calls == ["a", "a"]


async def test_a_remembered_error_on_a_method_is_per_instance() -> None:
    clock = Clock()

    class Service:
        def __init__(self, fail: bool) -> None:
            self.fail = fail
            self.calls = 0

        @worker_queue(cache={}, cache_errors={TimeoutError: 5}, timer=clock)
        async def get(self, k: str) -> str:
            self.calls += 1
            if self.fail:
                raise TimeoutError(k)
            return k

    bad, good = Service(True), Service(False)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await bounded(bad.get("k"))
    assert await bounded(good.get("k")) == "k"
    assert (bad.calls, good.calls) == (1, 1)
    assert isinstance(bad.get.cache_peek("k"), CachedError)


# -- stale_if_error -------------------------------------------------------------------------------


def staling(clock: Clock, kind: str = "dict", **options: Any) -> tuple[Source, Any]:
    options.setdefault("ttl", 10)
    options.setdefault("stale_if_error", 60)
    options.setdefault("refresh_backoff", 5)
    options.setdefault("cache_errors", None)
    return remembering(clock, kind, **options)


@pytest.mark.parametrize("kind", ["dict", "lru"])
async def test_a_failing_recomputation_serves_the_expired_value(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    source, f = staling(clock, kind)
    assert await bounded(f("a")) == "a@0"
    source.failures["a"] = ConnectionError("down")
    clock.now = 10  # expired
    assert f.cache_peek("a") is MISSING
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await bounded(f("a")) == "a@0"
        assert source.calls == ["a", "a"]
        # The next attempt waits refresh_backoff: the stale value is served meanwhile.
        clock.now = 14.9
        assert await bounded(f("a")) == "a@0"
        assert source.calls == ["a", "a"]
        clock.now = 15
        assert await bounded(f("a")) == "a@0"
        assert source.calls == ["a", "a", "a"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per key per window
    assert "stale_if_error" in warnings[0].getMessage()
    assert f.cache_info().stale == 2
    del source.failures["a"]
    clock.now = 20
    assert await bounded(f("a")) == "a@3"
    clock.now = 29.9
    assert await bounded(f("a")) == "a@3"


async def test_past_the_window_the_exception_reaches_the_callers() -> None:
    clock = Clock()
    source, f = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    clock.now = 70  # expired at 10, window to 70
    with pytest.raises(ConnectionError):
        await bounded(f("a"))
    # Backoffs do not stretch the window.
    clock.now = 68
    g_source, g = staling(clock)
    clock.now = 0
    await bounded(g("a"))
    g_source.failures["a"] = ConnectionError("down")
    clock.now = 66
    assert await bounded(g("a")) == "a@0"
    clock.now = 70
    with pytest.raises(ConnectionError):
        await bounded(g("a"))
    assert f.cache_info().stale == 0


async def test_every_caller_of_the_failing_recomputation_gets_the_stale_value() -> None:
    clock = Clock()
    source, f = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    source.gate = asyncio.Event()
    source.started.clear()
    clock.now = 11
    calls = [asyncio.ensure_future(f("a")) for _ in range(3)]
    await bounded(source.started.wait())
    await settle()
    source.gate.set()
    assert await bounded(asyncio.gather(*calls)) == ["a@0"] * 3
    assert source.calls == ["a", "a"]


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_an_invalidated_value_is_never_served_stale(how: str) -> None:
    clock = Clock()
    source, f = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    clock.now = 11
    if how == "invalidate":
        f.cache_invalidate("a")
    else:
        f.cache_clear()
    with pytest.raises(ConnectionError):
        await bounded(f("a"))


async def test_invalidating_during_the_failing_recomputation_serves_nothing_stale() -> None:
    clock = Clock()
    source, f = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    source.gate = asyncio.Event()
    source.started.clear()
    clock.now = 11
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    f.cache_invalidate("a")
    source.gate.set()
    with pytest.raises(ConnectionError):
        await bounded(call)
    assert f.cache_peek("a") is MISSING
    assert f.cache_info().stale == 0


async def test_a_prime_during_the_failing_recomputation_wins() -> None:
    clock = Clock()
    source, f = staling(clock, cache_errors={ConnectionError: 30})
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    source.gate = asyncio.Event()
    source.started.clear()
    clock.now = 11
    call = asyncio.ensure_future(f("a"))
    await bounded(source.started.wait())
    f.cache_prime("primed", "a")
    source.gate.set()
    with pytest.raises(ConnectionError):
        await bounded(call)
    assert f.cache_peek("a") == "primed"  # neither the error nor a stale value replaced it


async def test_a_stale_value_is_served_rather_than_an_error_remembered() -> None:
    clock = Clock()
    source, f = staling(clock, cache_errors={ConnectionError: 30})
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    clock.now = 11
    assert await bounded(f("a")) == "a@0"
    clock.now = 71  # past the window: the error reaches the caller, and is remembered
    with pytest.raises(ConnectionError):
        await bounded(f("a"))
    assert isinstance(f.cache_peek("a"), CachedError)


async def test_an_explicit_refresh_that_fails_raises_while_the_entry_is_fresh() -> None:
    clock = Clock()
    source, f = staling(clock)
    await bounded(f("a"))
    source.failures["a"] = ConnectionError("down")
    with pytest.raises(ConnectionError):
        await bounded(f.refresh("a"))
    assert f.cache_peek("a") == "a@0"


# -- refused at decoration ------------------------------------------------------------------------


class CancelledFailure(asyncio.CancelledError, Exception):
    """A cancellation that is an Exception too."""


class FakeSingleFlight(ClockedAsyncCache):
    async def get_or_compute(self, key: Hashable, compute: Callable[[], Awaitable[V]]) -> V:
        return await compute()


async def source_fn(k: str) -> str:
    return k


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"cache_errors": {"TimeoutError": 1}}, TypeError, "exception classes"),
        ({"cache_errors": {int: 1}}, TypeError, "exception classes"),
        ({"cache_errors": {asyncio.CancelledError: 1}}, TypeError, "cancellation"),
        ({"cache_errors": {KeyboardInterrupt: 1}}, TypeError, "cancellation"),
        ({"cache_errors": {BaseException: 1}}, TypeError, "cancellation"),
        ({"cache_errors": {CancelledFailure: 1}}, TypeError, "cancellation"),
        ({"cache_errors": [TimeoutError]}, TypeError, "map exception classes"),
        ({"cache_errors": {TimeoutError: -1}}, ValueError, "TimeoutError"),
        ({"cache_errors": {TimeoutError: math.nan}}, ValueError, "TimeoutError"),
        ({"cache_errors": {TimeoutError: "1"}}, ValueError, "TimeoutError"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": math.nan}, ValueError, "ttl"),
        ({"ttl": "5"}, ValueError, "ttl"),
        ({"stale_if_error": -1}, ValueError, "stale_if_error"),
        ({"stale_if_error": math.nan}, ValueError, "stale_if_error"),
        ({"stale_if_error": math.inf}, ValueError, "finite"),
        ({"cache_if": True}, TypeError, "cache_if"),
    ],
)
def test_bad_options_are_clear_errors_at_decoration(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        worker_queue(cache={}, **options)(source_fn)


@pytest.mark.parametrize(
    ("cache", "options", "match"),
    [
        (None, {"ttl": 5}, "need a cache"),
        ({}, {"ttl": 5, "refresh_after": 5}, "must be below ttl=5"),
        ({}, {"ttl": 5, "refresh_after": 4, "jitter": 0.5}, "must be below ttl=5"),
        ("ttlcache", {"ttl": 60, "refresh_after": 5}, "below the cache's ttl=5"),
        ("ttlcache", {"stale_if_error": 5, "refresh_after": 1}, "TTLCache"),
        ("single", {"ttl": 5}, "not supported with FakeSingleFlight"),
        ("ttlcache", {"stale_if_error": 5}, "TTLCache"),
    ],
)
def test_options_not_supported_with_a_cache_are_refused(
    cache: Any, options: dict[str, Any], match: str
) -> None:
    clock = Clock()
    made: Any = (
        {
            "single": FakeSingleFlight(clock),
            "async": ClockedAsyncCache(clock),
            "ttlcache": cachetools.TTLCache(10, ttl=5),
        }.get(cache, cache)
        if isinstance(cache, str)
        else cache
    )
    with pytest.raises(ValueError, match=match):
        worker_queue(cache=made, name="t.refused", **options)(source_fn)


async def test_a_cancellation_is_never_remembered_even_with_exception_listed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    source, f = remembering(clock, cache_errors={Exception: 5.0})
    source.failures["a"] = asyncio.CancelledError()  # raised by the worker itself
    with caplog.at_level(logging.WARNING, logger="wq_memo"), pytest.raises(asyncio.CancelledError):
        await bounded(f("a"))
    assert f.cache_peek("a") is MISSING
    del source.failures["a"]
    assert await bounded(f("a")) == "a@1"


async def test_a_refresh_whose_result_cache_if_refuses_keeps_the_entry() -> None:
    clock = Clock()
    source = Source()
    f = worker_queue(cache={}, cache_if=lambda v: v != "", ttl=10, timer=clock)(source)
    assert await bounded(f("a")) == "a@0"
    source.results["a"] = ""
    assert await bounded(f.refresh("a")) == ""
    assert f.cache_peek("a") == "a@0"
    assert f.cache_info().uncached == 1
