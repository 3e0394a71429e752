"""worker_queue.batch with the per-result policy (cache_if, ttl, cache_errors, stale_if_error),
applied per key on a fake clock (issue 20 for batch functions).

Every value names the call of the batch function that made it ("k#n": key k, call n), so that
an outcome tells which batch it came from.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import cachetools
import pytest
from _policy_harness import MAPPINGS, Clock, ClockedAsyncCache, bounded, settle

from wq_memo import MISSING, CachedError, ShutdownTimeout, worker_queue
from wq_memo._batch import check as check_batches

Answer = Callable[[list[int], int], Any]


class Loader:
    """A batch function: its n-th call records its keys, waits for its gate if ``hold`` is
    set, then answers ``answers[n](keys, n)`` (or ``answer(keys, n)``, or {k: "k#n"})."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.answers: dict[int, Answer] = {}
        self.answer: Answer | None = None

    async def __call__(self, keys: list[int]) -> Any:
        n = len(self.calls)
        self.calls.append(list(keys))
        gate = asyncio.Event()
        self.gates.append(gate)
        if self.hold:
            await gate.wait()
        answer = self.answers.get(n, self.answer)
        if answer is not None:
            return answer(keys, n)
        return {k: f"{k}#{n}" for k in keys}

    async def wait_calls(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.calls) < count:  # noqa: ASYNC110 - every step yields to the callers
                await asyncio.sleep(0)


def values(keys: list[int], n: int) -> dict[int, Any]:
    return {k: f"{k}#{n}" for k in keys}


def loading(clock: Clock, kind: str = "dict", hold: bool = False, **options: Any) -> Any:
    loader = Loader(hold)
    load = worker_queue.batch(cache=MAPPINGS[kind](clock), timer=clock, **options)(loader)
    return loader, load


async def outcome(awaitable: Any) -> Any:
    """What awaitable returns, or the exception it raises."""
    try:
        return await bounded(awaitable)
    except Exception as exc:
        return exc


# -- cache_if --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_cache_if_is_called_once_per_key_and_a_refused_key_is_not_stored(kind: str) -> None:
    clock = Clock()
    asked: list[str] = []

    def keep(value: str) -> bool:
        asked.append(value)
        return not value.startswith("2#")

    loader, load = loading(clock, kind, hold=True, cache_if=keep)
    first = asyncio.create_task(load.many([1, 2, 3]))
    joined = asyncio.create_task(load(2))
    await loader.wait_calls(1)
    await settle()
    loader.gates[0].set()
    # The refused key's value reaches every caller of it, the one who joined too.
    assert await bounded(first) == ["1#0", "2#0", "3#0"]
    assert await bounded(joined) == "2#0"
    assert sorted(asked) == ["1#0", "2#0", "3#0"]  # once per key result
    assert (load.cache_peek(1), load.cache_peek(2), load.cache_peek(3)) == ("1#0", MISSING, "3#0")
    info = load.cache_info()
    assert (info.uncached, info.misses, info.joined, info.batches) == (1, 3, 1, 1)
    loader.hold = False
    assert await bounded(load.many([1, 2, 3])) == ["1#0", "2#1", "3#0"]
    assert loader.calls == [[1, 2, 3], [2]]  # only the refused key loads again
    assert load.cache_info().uncached == 2


async def test_a_failing_cache_if_leaves_only_that_key_uncached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()

    def keep(value: str) -> bool:
        if value.startswith("1#"):
            raise RuntimeError("cache_if broke")
        return True

    loader, load = loading(clock, cache_if=keep)
    with caplog.at_level(logging.ERROR, logger="wq_memo"):
        assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    assert "cache_if failed" in caplog.text
    assert loader.calls == [[1, 2]]
    assert (load.cache_peek(1), load.cache_peek(2)) == (MISSING, "2#0")
    assert load.cache_info().uncached == 1


async def test_a_prime_is_stored_whatever_cache_if_says() -> None:
    clock = Clock()
    loader, load = loading(clock, cache_if=lambda v: False)
    load.cache_prime("primed", 1)
    assert await bounded(load(1)) == "primed"
    assert loader.calls == []


# -- ttl -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_a_ttl_function_gives_each_key_of_a_batch_its_lifetime(kind: str) -> None:
    clock = Clock()
    lifetimes = {1: 1.0, 2: 10.0, 3: None}
    loader, load = loading(clock, kind, ttl=lambda v: lifetimes[int(v.split("#")[0])])
    assert await bounded(load.many([1, 2, 3])) == ["1#0", "2#0", "3#0"]
    clock.now = 0.99
    assert await bounded(load.many([1, 2, 3])) == ["1#0", "2#0", "3#0"]
    clock.now = 1.0
    assert await bounded(load.many([1, 2, 3])) == ["1#1", "2#0", "3#0"]
    clock.now = 10.0
    assert await bounded(load.many([1, 2, 3])) == ["1#2", "2#2", "3#0"]
    assert loader.calls == [[1, 2, 3], [1], [1, 2]]


async def test_a_ttl_number_applies_to_every_key() -> None:
    clock = Clock()
    loader, load = loading(clock, "lru", ttl=2)
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    clock.now = 1.0
    assert await bounded(load(3)) == "3#1"
    clock.now = 2.0
    assert await bounded(load.many([1, 2, 3])) == ["1#2", "2#2", "3#1"]
    assert loader.calls == [[1, 2], [3], [1, 2]]


async def test_with_a_ttl_cache_the_shorter_lifetime_wins() -> None:
    clock = Clock()
    loader = Loader()
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(10, ttl=5, timer=clock)
    load = worker_queue.batch(cache=cache, ttl=lambda v: 2 if v.startswith("1#") else 50)(loader)
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    clock.now = 2.0
    assert await bounded(load.many([1, 2])) == ["1#1", "2#0"]
    clock.now = 5.0  # the TTLCache's own ttl, shorter than 50
    assert await bounded(load.many([1, 2])) == ["1#2", "2#2"]


async def test_a_bad_ttl_for_one_key_is_logged_once_and_that_key_returned_uncached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    loader, load = loading(clock, ttl=lambda v: math.nan if v.startswith("1#") else 5)
    with caplog.at_level(logging.DEBUG, logger="wq_memo"):
        assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
        assert await bounded(load.many([1, 2])) == ["1#1", "2#0"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "nan" in errors[0].getMessage()
    assert (load.cache_peek(1), load.cache_peek(2)) == (MISSING, "2#0")
    assert load.cache_info().uncached == 2
    assert loader.calls == [[1, 2], [1]]


async def test_a_prime_takes_the_ttl() -> None:
    clock = Clock()
    loader, load = loading(clock, ttl=lambda v: 3)
    load.cache_prime("primed", 1)
    clock.now = 2.9
    assert await bounded(load(1)) == "primed"
    clock.now = 3.0
    assert load.cache_peek(1) is MISSING
    assert await bounded(load(1)) == "1#0"
    assert loader.calls == [[1]]


# -- cache_errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MAPPINGS))
async def test_an_exception_as_a_keys_value_is_remembered_for_that_key_only(kind: str) -> None:
    clock = Clock()
    loader, load = loading(clock, kind, cache_errors={TimeoutError: 2.0})
    loader.answers[0] = lambda keys, n: {1: TimeoutError("slow", 1), 2: f"2#{n}"}
    with pytest.raises(TimeoutError) as first:
        await bounded(load.many([1, 2]))
    assert load.cache_peek(1) == CachedError(TimeoutError, ("slow", 1))
    assert load.cache_peek(2) == "2#0"
    raised = []
    for _ in range(2):
        clock.now += 0.9
        with pytest.raises(TimeoutError) as again:
            await bounded(load(1))
        raised.append(again.value)
    assert loader.calls == [[1, 2]]  # raised anew without entering a batch
    assert all(e.args == ("slow", 1) for e in raised)
    assert len({id(first.value), *map(id, raised)}) == 3  # a new exception each time
    assert load.cache_info().hits == 2  # counted as hits
    clock.now = 2.0
    assert await bounded(load.many([1, 2])) == ["1#1", "2#0"]
    assert loader.calls == [[1, 2], [1]]


async def test_a_whole_batch_failure_is_remembered_for_every_key_of_it() -> None:
    clock = Clock()
    loader, load = loading(clock, cache_errors={ConnectionError: 3.0})

    def down(keys: list[int], n: int) -> Any:
        raise ConnectionRefusedError("db down")

    loader.answers[0] = down
    assert isinstance(await outcome(load.many([1, 2, 3])), ConnectionRefusedError)
    for k in (1, 2, 3):
        assert load.cache_peek(k) == CachedError(ConnectionRefusedError, ("db down",))
        assert isinstance(await outcome(load(k)), ConnectionRefusedError)
    assert isinstance(await outcome(load.many([3, 1])), ConnectionRefusedError)
    assert loader.calls == [[1, 2, 3]]
    assert await bounded(load(4)) == "4#1"  # other keys load as ever
    clock.now = 3.0
    assert await bounded(load.many([1, 2])) == ["1#2", "2#2"]


async def test_an_exception_outside_cache_errors_is_never_remembered() -> None:
    clock = Clock()
    loader, load = loading(clock, cache_errors={TimeoutError: 2.0})
    loader.answers[0] = lambda keys, n: {1: ValueError("bad"), 2: f"2#{n}"}
    assert isinstance(await outcome(load(1)), ValueError)
    assert load.cache_peek(1) is MISSING
    assert await bounded(load(1)) == "1#1"


@pytest.mark.parametrize(
    ("errors", "remembered"),
    [
        ({KeyError: 2.0}, True),
        ({LookupError: 2.0}, True),
        ({TimeoutError: 2.0}, False),
    ],
)
async def test_a_missing_key_is_remembered_only_if_cache_errors_names_keyerror(
    errors: dict[type[Exception], float], remembered: bool
) -> None:
    clock = Clock()
    loader, load = loading(clock, cache_errors=errors)
    loader.answers[0] = lambda keys, n: {2: f"2#{n}"}
    missing = await outcome(load.many([1, 2]))
    assert isinstance(missing, KeyError)
    peeked = load.cache_peek(1)
    if remembered:
        assert peeked == CachedError(KeyError, missing.args)
        again = await outcome(load(1))
        assert type(again) is KeyError
        assert again.args == missing.args
        assert loader.calls == [[1, 2]]
    else:
        assert peeked is MISSING
        assert await bounded(load(1)) == "1#1"


@pytest.mark.parametrize("how", ["invalidate", "clear", "prime"])
async def test_invalidate_clear_and_prime_forget_a_keys_remembered_error(how: str) -> None:
    clock = Clock()
    loader, load = loading(clock, cache_errors={TimeoutError: 5.0})
    loader.answers[0] = lambda keys, n: dict.fromkeys(keys, TimeoutError("t"))
    assert isinstance(await outcome(load.many([1, 2])), TimeoutError)
    if how == "invalidate":
        assert load.cache_invalidate(1)
        assert await bounded(load(1)) == "1#1"
    elif how == "clear":
        await load.acache_clear()
        assert await bounded(load(1)) == "1#1"
    else:
        load.cache_prime("primed", 1)
        assert await bounded(load(1)) == "primed"
    if how == "clear":
        assert load.cache_peek(2) is MISSING
    else:  # the other key's error is still remembered
        assert load.cache_peek(2) == CachedError(TimeoutError, ("t",))


async def test_many_raises_the_failure_of_the_first_key_in_order_remembered_or_not() -> None:
    clock = Clock()
    loader, load = loading(clock, cache_errors={TimeoutError: 5.0})
    loader.answers[0] = lambda keys, n: {1: TimeoutError("remembered"), 2: f"2#{n}"}
    assert isinstance(await outcome(load.many([1, 2])), TimeoutError)
    loader.answers[1] = lambda keys, n: {3: ValueError("loaded")}
    # 3 comes first: its load's failure, though 1's remembered error was known at once.
    failure = await outcome(load.many([3, 1]))
    assert isinstance(failure, ValueError)
    assert loader.calls == [[1, 2], [3]]
    loader.answers[2] = lambda keys, n: {3: ValueError("loaded")}
    failure = await outcome(load.many([1, 3]))
    assert isinstance(failure, TimeoutError)
    assert await bounded(load.many([2, 2])) == ["2#0", "2#0"]


async def test_a_key_whose_error_cannot_be_rebuilt_is_not_remembered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NotFound(LookupError):
        def __init__(self, key: int) -> None:
            super().__init__(f"{key} not found")

    clock = Clock()
    loader, load = loading(clock, cache_errors={LookupError: 5.0})
    loader.answers[0] = lambda keys, n: {1: NotFound(1)}
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert isinstance(await outcome(load(1)), NotFound)
    assert "cannot be rebuilt" in caplog.text
    assert load.cache_peek(1) is MISSING


async def test_a_shutdown_is_never_remembered_even_with_exception_named() -> None:
    clock = Clock()
    loader, load = loading(clock, hold=True, cache_errors={Exception: 5.0}, finish_timeout=0.0)
    caller = asyncio.create_task(load(1))
    await loader.wait_calls(1)
    await bounded(load.queue.aclose())
    assert isinstance(await outcome(caller), ShutdownTimeout)
    assert load.cache_peek(1) is MISSING


# -- stale_if_error --------------------------------------------------------------------------------


def failing(how: str) -> Answer:
    """A batch answer in which key 1 fails: the whole batch raises, 1's value is an exception,
    or 1 is missing; key 2 gets a value unless the whole batch raises."""

    def answer(keys: list[int], n: int) -> Any:
        if how == "batch":
            raise ConnectionError("down")
        result: dict[int, Any] = {k: f"{k}#{n}" for k in keys if k != 1}
        if how == "value":
            result[1] = ConnectionError("down")
        return result

    return answer


@pytest.mark.parametrize("kind", ["dict", "lru"])
@pytest.mark.parametrize("how", ["batch", "value", "missing"])
async def test_a_failing_batch_serves_the_keys_expired_value(
    kind: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    loader, load = loading(clock, kind, ttl=5, stale_if_error=10, refresh_backoff=2)
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    clock.now = 6.0
    loader.answer = failing(how)
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        got = await bounded(load.many([1, 2]))
    second = "2#0" if how == "batch" else "2#1"
    assert got == ["1#0", second]
    assert load.cache_info().stale == (2 if how == "batch" else 1)
    assert "stale_if_error" in caplog.text
    clock.now = 7.9  # the back-off: the stale value is served without a batch
    assert await bounded(load(1)) == "1#0"
    assert len(loader.calls) == 2
    clock.now = 8.0  # then the next attempt
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await bounded(load(1)) == "1#0"
    assert loader.calls[2] == [1]
    warnings = [r for r in caplog.records if "stale_if_error" in r.getMessage()]
    assert len(warnings) == (2 if how == "batch" else 1)  # once per key per window
    loader.answer = None
    clock.now = 10.0
    assert await bounded(load(1)) == "1#3"


async def test_past_the_window_the_failure_reaches_the_keys_callers() -> None:
    clock = Clock()
    loader, load = loading(clock, ttl=5, stale_if_error=10, cache_errors={ConnectionError: 1})
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    clock.now = 14.9
    loader.answer = failing("value")
    assert await bounded(load(1)) == "1#0"
    clock.now = 15.0
    assert isinstance(await outcome(load(1)), ConnectionError)
    # Past the window the error is remembered, as cache_errors names it.
    assert load.cache_peek(1) == CachedError(ConnectionError, ("down",))


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_an_invalidated_key_is_never_served_stale(how: str) -> None:
    clock = Clock()
    loader, load = loading(clock, ttl=5, stale_if_error=10)
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    clock.now = 6.0
    if how == "invalidate":
        load.cache_invalidate(1)
    else:
        load.cache_clear()
    loader.answer = failing("batch")
    failure = await outcome(load.many([1, 2]))
    assert isinstance(failure, ConnectionError)
    if how == "invalidate":  # the other key is still served stale
        assert await bounded(load(2)) == "2#0"


# -- invalidation wins, per key, with every option -------------------------------------------------


@pytest.mark.parametrize("action", ["invalidate", "prime", "clear"])
async def test_a_forgotten_keys_value_is_not_stored_and_the_others_are(action: str) -> None:
    clock = Clock()
    asked: list[str] = []

    def keep(value: str) -> bool:
        asked.append(value)
        return True

    loader, load = loading(clock, hold=True, cache_if=keep, ttl=5)
    batch = asyncio.create_task(load.many([1, 2]))
    await loader.wait_calls(1)
    if action == "invalidate":
        load.cache_invalidate(1)
    elif action == "prime":
        load.cache_prime("primed", 1)
    else:
        load.cache_clear()
    loader.gates[0].set()
    assert await bounded(batch) == ["1#0", "2#0"]
    assert load.cache_peek(1) == ("primed" if action == "prime" else MISSING)
    if action == "clear":
        assert load.cache_peek(2) is MISSING
        assert asked == []
    else:
        assert load.cache_peek(2) == "2#0"
        assert asked == ["2#0"]  # cache_if is not asked about the forgotten key's value


@pytest.mark.parametrize("how", ["batch", "value"])
async def test_a_forgotten_keys_error_is_not_remembered_and_the_others_are(how: str) -> None:
    clock = Clock()
    loader, load = loading(clock, hold=True, cache_errors={ConnectionError: 5})
    loader.answer = failing(how)
    batch = asyncio.create_task(load.many([2, 1]))
    await loader.wait_calls(1)
    load.cache_invalidate(1)
    loader.gates[0].set()
    if how == "batch":
        assert isinstance(await outcome(batch), ConnectionError)
        assert load.cache_peek(2) == CachedError(ConnectionError, ("down",))
    else:
        assert isinstance(await outcome(batch), ConnectionError)
        assert load.cache_peek(2) == "2#0"
    assert load.cache_peek(1) is MISSING
    loader.answer = None
    loader.hold = False
    assert await bounded(load(1)) == "1#1"


async def test_a_key_invalidated_during_its_failing_batch_gets_nothing_stale() -> None:
    clock = Clock()
    loader, load = loading(clock, ttl=5, stale_if_error=10)
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    clock.now = 6.0
    loader.hold = True
    loader.answer = failing("batch")
    one = asyncio.create_task(load(1))
    two = asyncio.create_task(load(2))
    await loader.wait_calls(2)
    assert loader.calls[1] == [1, 2]
    load.cache_invalidate(1)
    loader.gates[1].set()
    assert isinstance(await outcome(one), ConnectionError)
    assert await bounded(two) == "2#0"  # the other key of the batch: served stale
    assert load.cache_info().stale == 1
    check_batches(load)


async def test_an_explicit_refresh_that_fails_leaves_a_fresh_value() -> None:
    clock = Clock()
    loader, load = loading(clock, ttl=5, cache_errors={ConnectionError: 5}, stale_if_error=5)
    assert await bounded(load(1)) == "1#0"
    loader.answer = failing("value")
    assert isinstance(await outcome(load.refresh(1)), ConnectionError)
    assert load.cache_peek(1) == "1#0"


# -- counts ----------------------------------------------------------------------------------------


async def test_uncached_and_stale_count_keys_and_a_clear_sets_them_to_zero() -> None:
    clock = Clock()
    loader, load = loading(
        clock, ttl=5, stale_if_error=10, cache_if=lambda v: not v.startswith("3#")
    )
    assert await bounded(load.many([1, 2, 3])) == ["1#0", "2#0", "3#0"]
    clock.now = 6.0
    loader.answer = failing("batch")
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    info = load.cache_info()
    assert (info.uncached, info.stale, info.batches) == (1, 2, 2)
    load.cache_clear()
    info = load.cache_info()
    assert (info.uncached, info.stale, info.batches) == (0, 0, 0)


# -- refused at decoration -------------------------------------------------------------------------


async def batch_fn(keys: list[int]) -> list[int]:
    return keys


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"cache_errors": {"TimeoutError": 1}}, TypeError, "exception classes"),
        ({"cache_errors": {asyncio.CancelledError: 1}}, TypeError, "cancellation"),
        ({"cache_errors": {BaseException: 1}}, TypeError, "cancellation"),
        ({"cache_errors": [TimeoutError]}, TypeError, "map exception classes"),
        ({"cache_errors": {TimeoutError: -1}}, ValueError, "TimeoutError"),
        ({"cache_errors": {TimeoutError: math.nan}}, ValueError, "TimeoutError"),
        ({"ttl": -1}, ValueError, "ttl"),
        ({"ttl": math.nan}, ValueError, "ttl"),
        ({"ttl": "5"}, ValueError, "ttl"),
        ({"stale_if_error": -1}, ValueError, "stale_if_error"),
        ({"stale_if_error": math.inf}, ValueError, "finite"),
        ({"cache_if": True}, TypeError, "cache_if"),
    ],
)
def test_bad_options_are_clear_errors_at_decoration(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        worker_queue.batch(cache={}, **options)


async def async_keep(value: object) -> bool:
    return True


def test_an_async_cache_if_is_refused() -> None:
    with pytest.raises(TypeError, match="plain function"):
        worker_queue.batch(cache={}, cache_if=async_keep)


@pytest.mark.parametrize(
    ("cache", "options", "match"),
    [
        (None, {"ttl": 5}, "need a cache"),
        ("async", {"cache_if": bool}, "in-process cache"),
        ("async", {"ttl": 5}, "in-process cache"),
        ("async", {"cache_errors": {TimeoutError: 1}}, "in-process cache"),
        ("ttlcache", {"stale_if_error": 5}, "TTLCache"),
        ("tlru", {"ttl": 5}, "TLRUCache"),
        ("tlru", {"cache_errors": {TimeoutError: 1}}, "TLRUCache"),
        ("sized", {"ttl": 5}, "getsizeof"),
        ("sized", {"stale_if_error": 5}, "getsizeof"),
    ],
)
def test_options_not_supported_with_a_cache_are_refused(
    cache: Any, options: dict[str, Any], match: str
) -> None:
    made: Any = cache
    if isinstance(cache, str):
        made = {
            "async": ClockedAsyncCache(Clock()),
            "ttlcache": cachetools.TTLCache(10, ttl=5),
            "tlru": cachetools.TLRUCache(10, ttu=lambda k, v, now: now + 5),
            "sized": cachetools.LRUCache(10, getsizeof=len),
        }[cache]
    with pytest.raises(ValueError, match=match):
        worker_queue.batch(cache=made, **options)


@pytest.mark.parametrize(
    ("cache", "options"),
    [
        ("tlru", {"cache_if": bool}),
        ("sized", {"cache_if": bool}),
        ("ttlcache", {"ttl": 5, "cache_errors": {TimeoutError: 1}}),
        ("lru", {"stale_if_error": 5, "ttl": 1}),
    ],
)
async def test_options_supported_with_a_cache_are_taken(
    cache: str, options: dict[str, Any]
) -> None:
    made: Any = {
        "tlru": cachetools.TLRUCache(10, ttu=lambda k, v, now: now + 5),
        "sized": cachetools.LRUCache(10, getsizeof=len),
        "ttlcache": cachetools.TTLCache(10, ttl=5),
        "lru": cachetools.LRUCache(10),
    }[cache]
    loader = Loader()
    load = worker_queue.batch(cache=made, **options)(loader)
    assert await bounded(load.many([1, 2])) == ["1#0", "2#0"]
    assert await bounded(load(1)) == "1#0"
    assert loader.calls == [[1, 2]]


# -- found in review ----------------------------------------------------------------------------


async def test_an_entry_the_policy_did_not_date_is_loaded_again_not_an_error() -> None:
    # A dict shared with code that writes plain values (or filled before decorating): as with
    # @worker_queue, an entry that is not dated is a miss, never an AttributeError on the hit.
    clock = Clock()
    shared: dict[Any, Any] = {1: "plain", 2: "plain"}
    loader = Loader()
    load = worker_queue.batch(cache=shared, timer=clock, ttl=5, cache_errors={KeyError: 5})(loader)
    assert await bounded(load(1)) == "1#0"
    assert await bounded(load.many([2, 3])) == ["2#1", "3#1"]
    assert loader.calls == [[1], [2, 3]]
    assert [load.cache_peek(k) for k in (1, 2, 3)] == ["1#0", "2#1", "3#1"]
    assert await bounded(load.many([1, 2, 3])) == ["1#0", "2#1", "3#1"]  # hits now
    assert load.cache_info().hits == 3


class _Coded(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


async def test_an_error_that_cannot_be_rebuilt_is_logged_once_not_once_per_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A whole batch failure reaches every key: an error that cannot be remembered is a property
    # of its type, said once at WARNING, not once per key of every batch that fails with it.
    clock = Clock()
    loader, load = loading(clock, cache_errors={Exception: 5.0})

    def down(keys: list[int], n: int) -> Any:
        raise _Coded("down", code=n)

    loader.answer = down
    with caplog.at_level(logging.DEBUG, logger="wq_memo"):
        assert isinstance(await outcome(load.many(range(20))), _Coded)
        assert isinstance(await outcome(load.many(range(20, 30))), _Coded)
    warned = [r for r in caplog.records if "cannot be rebuilt" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING] + [logging.DEBUG] * 29
    assert all(load.cache_peek(k) is MISSING for k in range(30))  # nothing remembered
    assert len(loader.calls) == 2


def test_the_policy_without_a_cache_names_only_the_caches_a_batch_function_takes() -> None:
    # An async cache is refused for batch functions: the error for cache=None must not offer one.
    with pytest.raises(ValueError, match=r"@worker_queue\.batch: .*need a cache") as refused:
        worker_queue.batch(cache=None, ttl=5)
    assert "async" not in str(refused.value)
    assert "a cachetools cache or a dict" in str(refused.value)


async def test_many_with_duplicates_mixes_remembered_stale_and_fresh_keys_in_key_order() -> None:
    # One call of many(): a fresh key, a stale key whose load fails (served its old value), a
    # key whose error is remembered, each given twice; each distinct key is looked up once.
    clock = Clock()
    loader, load = loading(clock, ttl=5, stale_if_error=10, cache_errors={LookupError: 20})
    loader.answers[0] = lambda keys, n: {1: "1#0", 2: "2#0"}  # 3 missing: remembered
    assert isinstance(await outcome(load.many([1, 2, 3])), KeyError)
    clock.now = 5.0  # 1 and 2 expire; 3's error is remembered until 20
    load.cache_prime("1#p", 1)  # 1 fresh again
    loader.answers[1] = lambda keys, n: {k: ValueError(k) for k in keys}  # 2's load fails
    got = await outcome(load.many([2, 1, 2, 1]))
    assert got == ["2#0", "1#p", "2#0", "1#p"]
    assert loader.calls[1] == [2]
    error = await outcome(load.many([1, 2, 3, 1, 3]))
    assert isinstance(error, KeyError)
    assert "3" in str(error)
    assert len(loader.calls) == 2  # 2 in its back-off, 3 remembered: no batch
    info = load.cache_info()
    assert (info.hits, info.misses, info.stale) == (1 + 3, 3 + 1, 1)
