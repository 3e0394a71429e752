"""cache_errors and stale_if_error with RedisCache, shared between processes: two RedisCaches on
one namespace, each with its own memoized function of the same name, stand for two processes
(as in test_redis_single_flight.py). A remembered error is stored as its type's name and JSON
arguments and rebuilt only for a type the reader's own cache_errors names; a value is kept in
Redis for its stale window, with its expiry in the entry. The hostile-input tests write forged
entries straight into Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import sys
from collections.abc import Callable
from typing import Any

import cachetools.keys
import pytest

pytest.importorskip("redis.asyncio")

from redis_waits import until, waiting_anywhere

from wq_memo import MISSING, CachedError, Memoized, worker_queue
from wq_memo.backends import CallKey
from wq_memo.backends._redis_keys import key_names
from wq_memo.backends.redis import RedisCache

pytest_plugins = ("redis_fixtures",)

Make = Callable[..., RedisCache]
WAIT = 10.0
SECRET = "a test secret of 32 bytes, at least"


class Throttled(TimeoutError):
    """A failure the functions below remember."""


class Other(ValueError):
    """A failure of a type only some of the functions below remember."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """The computations of one "process": what each returns or raises, in turn."""

    def __init__(self) -> None:
        self.plan: list[Any] = []
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, key: str) -> Any:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.plan.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def memoize(
    cache: RedisCache, source: Source, clock: Clock, **options: Any
) -> Memoized[[str], Any]:
    options.setdefault("cache_errors", {Throttled: 30.0})
    options.setdefault("stale_if_error", 100.0)
    options.setdefault("refresh_backoff", 5.0)

    @worker_queue(cache=cache, name="shared.rate", ttl=10.0, timer=clock, **options)
    async def rate(key: str) -> Any:
        return await source(key)

    return rate


def value_name(cache: Any, *args: Any) -> bytes:
    return key_names(cache.namespace, CallKey("shared.rate", cachetools.keys.hashkey(*args))).value


async def outcome(call: Any) -> Any:
    try:
        async with asyncio.timeout(WAIT):
            return await call
    except Exception as exc:
        return exc


async def test_another_process_raises_the_remembered_error_without_computing(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    f_there = memoize(make_redis_cache(), there, clock)
    here.plan = [Throttled("eur", 3)]
    first = await outcome(f_here("eur"))
    assert type(first) is Throttled
    assert first.args == ("eur", 3)
    got = await outcome(f_there("eur"))
    assert type(got) is Throttled
    assert got.args == ("eur", 3)
    again = await outcome(f_there("eur"))
    assert again is not got
    assert again.__traceback__ is not got.__traceback__
    assert there.calls == 0
    assert await f_there.acache_peek("eur") == CachedError(Throttled, ("eur", 3))
    assert f_there.cache_info().hits == 2
    # Kept in Redis for its time; the remembered error carries the same expiry.
    assert 25_000 < int(sync_redis.pttl(value_name(f_there.cache, "eur"))) <= 30_000
    clock.now += 30
    there.plan = ["EUR"]
    assert await outcome(f_there("eur")) == "EUR"  # expired: computed again
    assert there.calls == 1


async def test_a_process_whose_cache_errors_does_not_name_the_type_computes(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    f_there = memoize(make_redis_cache(), there, clock, cache_errors={Other: 30.0})
    here.plan = [Throttled("eur")]
    assert type(await outcome(f_here("eur"))) is Throttled
    caplog.set_level(logging.DEBUG, logger="wq_memo")
    assert await f_there.acache_peek("eur") is MISSING
    there.plan = ["EUR"]
    assert await outcome(f_there("eur")) == "EUR"
    assert there.calls == 1
    assert any(
        r.levelno == logging.DEBUG and "is not of a type cache_errors names here" in r.message
        for r in caplog.records
    )
    # Its result replaced the remembered error, for every process.
    assert await outcome(f_here("eur")) == "EUR"
    assert here.calls == 1


async def test_a_process_without_the_options_reads_an_error_entry_as_a_miss(
    make_redis_cache: Make,
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock)
    plain_calls: list[str] = []
    other = make_redis_cache()

    @worker_queue(cache=other, name="shared.rate")
    async def plain(key: str) -> str:
        plain_calls.append(key)
        return key.upper()

    here.plan = [Throttled("eur")]
    assert type(await outcome(f_here("eur"))) is Throttled
    assert await other.get(CallKey("shared.rate", cachetools.keys.hashkey("eur"))) is MISSING
    assert await plain("eur") == "EUR"
    assert plain_calls == ["eur"]


async def test_a_remembered_subclass_of_a_named_type_is_rebuilt_elsewhere(
    make_redis_cache: Make,
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock, cache_errors={OSError: 30.0})
    f_there = memoize(make_redis_cache(), there, clock, cache_errors={OSError: 30.0})
    here.plan = [ConnectionRefusedError(111, "refused")]
    assert type(await outcome(f_here("eur"))) is ConnectionRefusedError
    got = await outcome(f_there("eur"))
    assert type(got) is ConnectionRefusedError
    assert got.args == (111, "refused")
    assert there.calls == 0


@pytest.mark.parametrize(
    "failure",
    [Throttled(("a", "tuple")), Throttled(b"bytes"), Throttled({1: "int key"})],
    ids=["tuple", "bytes", "int-keyed dict"],
)
async def test_an_error_whose_arguments_json_cannot_keep_is_not_remembered(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture, failure: Exception
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock)
    here.plan = [failure, "EUR"]
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await outcome(f_here("eur")) is failure
    assert any("is not remembered" in r.message for r in caplog.records)
    assert await f_here.acache_peek("eur") is MISSING
    assert await outcome(f_here("eur")) == "EUR"
    assert here.calls == 2


async def test_an_error_type_two_classes_share_the_name_of_is_not_remembered(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    def made() -> type[Exception]:
        class Twin(Throttled):
            pass

        return Twin

    first, second = made(), made()
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock, cache_errors={first: 30.0, second: 30.0})
    here.plan = [first("x"), "X"]
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert type(await outcome(f_here("eur"))) is first
    assert any("not found by its name" in r.message for r in caplog.records)
    assert await outcome(f_here("eur")) == "X"


async def test_another_process_serves_the_stale_value_when_its_recomputation_fails(
    make_redis_cache: Make, sync_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    f_there = memoize(make_redis_cache(), there, clock)
    here.plan = ["EUR"]
    assert await outcome(f_here("eur")) == "EUR"
    # Kept in Redis for the ttl and the stale window: 10 + 100 seconds.
    assert 100_000 < int(sync_redis.pttl(value_name(f_here.cache, "eur"))) <= 110_000
    clock.now += 15  # expired 5 s ago, within the window
    assert await f_there.acache_peek("eur") is MISSING
    there.plan = [Other("down")]
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await outcome(f_there("eur")) == "EUR"
    assert f_there.cache_info().stale == 1
    warned = [r for r in caplog.records if "stale_if_error" in r.message]
    assert len(warned) == 1
    # The next attempt waits refresh_backoff, in every process: the stale value is served.
    assert await outcome(f_here("eur")) == "EUR"
    assert here.calls == 1
    clock.now += 5
    here.plan = [Other("still down")]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await outcome(f_here("eur")) == "EUR"
    assert not [r for r in caplog.records if "stale_if_error" in r.message]  # once a window
    clock.now += 200  # past the window: the exception reaches the callers
    there.plan = [Other("gone")]
    got = await outcome(f_there("eur"))
    assert type(got) is Other
    assert got.args == ("gone",)


@pytest.mark.parametrize("how", ["invalidate", "clear"])
async def test_an_invalidation_in_another_process_removes_the_stale_value(
    make_redis_cache: Make, how: str
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    f_there = memoize(make_redis_cache(), there, clock)
    here.plan = ["EUR"]
    assert await outcome(f_here("eur")) == "EUR"
    clock.now += 15
    if how == "invalidate":
        assert await f_there.acache_invalidate("eur")
    else:
        await f_there.acache_clear()
    here.plan = [Other("down")]
    got = await outcome(f_here("eur"))
    assert type(got) is Other


async def test_the_waiting_process_gets_the_remembered_error_of_the_one_computing(
    make_redis_cache: Make,
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    there_cache = make_redis_cache()
    f_there = memoize(there_cache, there, clock)
    here.gate = asyncio.Event()
    here.plan = [Throttled("eur", 1)]
    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(outcome(f_here("eur")))
        await here.started.wait()
        second = asyncio.create_task(outcome(f_there("eur")))
        await until(lambda: waiting_anywhere(there_cache) == 1)
        here.gate.set()
        a, b = await asyncio.gather(first, second)
    assert type(a) is Throttled
    assert type(b) is Throttled
    assert b.args == ("eur", 1)
    assert (here.calls, there.calls) == (1, 0)  # one computation across the two


async def test_the_waiting_process_gets_the_stale_value_the_computing_one_served(
    make_redis_cache: Make,
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    there_cache = make_redis_cache()
    f_there = memoize(there_cache, there, clock)
    here.plan = ["EUR", Other("down")]
    assert await outcome(f_here("eur")) == "EUR"
    clock.now += 15
    here.gate = asyncio.Event()
    here.started.clear()
    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(outcome(f_here("eur")))
        await here.started.wait()
        second = asyncio.create_task(outcome(f_there("eur")))
        await until(lambda: waiting_anywhere(there_cache) == 1)
        here.gate.set()
        assert list(await asyncio.gather(first, second)) == ["EUR", "EUR"]
    assert (here.calls, there.calls) == (2, 0)


# -- hostile input ------------------------------------------------------------------------------


def forged_error(type_id: str, args: Any, expires: float = 1e12, tag: bytes = b"wq4e") -> bytes:
    body = json.dumps([type_id, args]).encode()
    return tag + struct.pack(">d", expires) + (0).to_bytes(8, "big") + body


@pytest.mark.parametrize(
    "type_id",
    [
        "wq_memo_never_imported_module:Boom",
        "os:system",
        "builtins:Exception",  # a base of Throttled, not named
        "builtins:TimeoutError",  # a base of Throttled, not named
        "subprocess:CalledProcessError",
        "tests.redis.test_redis_policy_errors:Other",
    ],
)
async def test_a_forged_type_name_is_a_miss_and_nothing_is_imported(
    make_redis_cache: Make, sync_redis: Any, type_id: str
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock)
    sync_redis.set(value_name(f_here.cache, "eur"), forged_error(type_id, ["rm -rf /"]))
    before = set(sys.modules)
    assert await f_here.acache_peek("eur") is MISSING
    here.plan = ["EUR"]
    assert await outcome(f_here("eur")) == "EUR"
    assert here.calls == 1
    assert set(sys.modules) - before == set()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x05cos\nsystem\n.",  # a pickle: never unpickled
        b"not json",
        b'{"type": "x"}',
        b'["mod:Throttled", "not a list"]',
        b"[1, []]",
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["pickle", "text", "dict", "args-not-list", "type-not-str", "deep"],
)
async def test_a_forged_arguments_payload_is_refused_and_never_unpickled(
    make_redis_cache: Make, sync_redis: Any, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an error entry was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    clock = Clock()
    here = Source()
    cache = make_redis_cache(max_value_bytes=1 << 20)
    f_here = memoize(cache, here, clock)
    data = b"wq4e" + struct.pack(">d", 1e12) + (0).to_bytes(8, "big") + payload
    sync_redis.set(value_name(cache, "eur"), data)
    assert await f_here.acache_peek("eur") is MISSING
    assert cache.stats().bad_entries >= 1
    here.plan = ["EUR"]
    assert await outcome(f_here("eur")) == "EUR"


async def test_with_a_secret_an_unsigned_or_tampered_error_entry_is_refused(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(secret=SECRET), here, clock)
    f_there = memoize(make_redis_cache(secret=SECRET), there, clock)
    here.plan = [Throttled("eur", 1)]
    assert type(await outcome(f_here("eur"))) is Throttled
    name = value_name(f_here.cache, "eur")
    stored = sync_redis.get(name)
    assert stored[:4] == b"wq4E"
    assert await f_there.acache_peek("eur") == CachedError(Throttled, ("eur", 1))
    # The arguments changed, the signature kept: refused.
    sync_redis.set(name, stored.replace(b'"eur"', b'"usd"'))
    assert await f_there.acache_peek("eur") is MISSING
    # Unsigned, as a cache without a secret writes it: refused too.
    own_id = f"{Throttled.__module__}:{Throttled.__qualname__}"
    sync_redis.set(name, forged_error(own_id, ["eur", 2]))
    assert await f_there.acache_peek("eur") is MISSING
    there.plan = ["EUR"]
    assert await outcome(f_there("eur")) == "EUR"


async def test_with_a_secret_a_kept_value_is_signed_and_a_forged_one_refused(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(secret=SECRET), here, clock)
    here.plan = [("a", "tuple")]  # pickled, under the signature
    assert await outcome(f_here("eur")) == ("a", "tuple")
    name = value_name(f_here.cache, "eur")
    stored = sync_redis.get(name)
    assert stored[:4] == b"wq4K"
    # The expiry pushed far out, the signature kept: refused.
    at = 4 + 32
    forged = stored[:at] + struct.pack(">dd", 1e15, 1e15) + stored[at + 16 :]
    sync_redis.set(name, forged)
    assert await f_here.acache_peek("eur") is MISSING


async def test_a_kept_entry_holding_another_is_refused(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock)
    inner = forged_error(f"{Throttled.__module__}:{Throttled.__qualname__}", ["x"])
    data = b"wq4k" + struct.pack(">dd", 1e12, 1e12) + b"\x00" + inner
    sync_redis.set(value_name(f_here.cache, "eur"), data)
    assert await f_here.acache_peek("eur") is MISSING


async def test_an_error_with_an_int_too_long_for_json_is_not_remembered_and_frees_the_key(
    make_redis_cache: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # An int past the interpreter's limit on digits (sys.get_int_max_str_digits) is an int all
    # the same, yet json.dumps refuses it: the caller gets its own error, and the other process
    # computes at once rather than waiting out the lock of a computation that never finished.
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock)
    f_there = memoize(make_redis_cache(wait=WAIT * 3), there, clock)
    failure = Throttled(10**5000)
    here.plan = [failure]
    with caplog.at_level(logging.WARNING, logger="wq_memo"):
        assert await outcome(f_here("eur")) is failure
    assert any("is not remembered" in r.message for r in caplog.records)
    assert await f_here.acache_peek("eur") is MISSING
    there.plan = ["EUR"]
    assert await outcome(f_there("eur")) == "EUR"
    assert there.calls == 1


class CancelledFailure(asyncio.CancelledError, Exception):
    """A cancellation that is an Exception too: never remembered, never answered stale."""


async def test_a_cancellation_that_is_also_an_exception_is_never_remembered(
    make_redis_cache: Make,
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock, cache_errors={Exception: 30.0})
    here.plan = [CancelledFailure("stop"), CancelledFailure("stop"), "EUR"]
    for _ in range(2):
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(WAIT):
                await f_here("eur")
    assert await f_here.acache_peek("eur") is MISSING
    assert await outcome(f_here("eur")) == "EUR"
    assert here.calls == 3


async def test_a_cancellation_that_is_also_an_exception_is_never_answered_stale(
    make_redis_cache: Make,
) -> None:
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock)
    here.plan = ["old", CancelledFailure("stop")]
    assert await outcome(f_here("eur")) == "old"
    clock.now += 11  # expired, inside the stale window
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT):
            await f_here("eur")
    assert f_here.cache_info().stale == 0


class NeedsTwo(TimeoutError):
    """A later version of a remembered type, whose constructor takes two arguments."""

    def __init__(self, pair: str, attempt: int) -> None:
        super().__init__(pair, attempt)


@pytest.mark.parametrize(
    ("cache_errors", "entry"),
    [
        ({ValueError: 30.0}, ("builtins:UnicodeDecodeError", [])),
        ({NeedsTwo: 30.0}, (f"{__name__}:NeedsTwo", ["eur"])),
    ],
    ids=["forged-loaded-subclass", "another-version"],
)
async def test_an_error_entry_that_cannot_be_rebuilt_here_is_a_miss(
    make_redis_cache: Make,
    sync_redis: Any,
    cache_errors: dict[type[Exception], float],
    entry: tuple[str, list[Any]],
) -> None:
    # A type this function names (or a loaded subclass of one) whose constructor refuses the
    # stored arguments: a miss, computed over, never a TypeError out of the cache.
    clock = Clock()
    here = Source()
    f_here = memoize(make_redis_cache(), here, clock, cache_errors=cache_errors)
    sync_redis.set(value_name(f_here.cache, "eur"), forged_error(*entry))
    assert await f_here.acache_peek("eur") is MISSING
    here.plan = ["EUR"]
    assert await outcome(f_here("eur")) == "EUR"
    assert here.calls == 1


async def test_with_no_ttl_option_the_caches_own_ttl_is_the_expiry_stale_if_error_extends(
    make_redis_cache: Make, sync_redis: Any
) -> None:
    # ttl None is the cache's own lifetime: the entry expires then, and is kept in Redis for
    # the stale window past it, as with a ttl= of the same length.
    clock = Clock()
    here = Source()
    cache = make_redis_cache(ttl=10.0)

    @worker_queue(
        cache=cache,
        name="shared.rate",
        timer=clock,
        stale_if_error=100.0,
        refresh_backoff=5.0,
    )
    async def rate(key: str) -> Any:
        return await here(key)

    here.plan = ["old", Other("down")]
    assert await outcome(rate("eur")) == "old"
    assert 100_000 < int(sync_redis.pttl(value_name(cache, "eur"))) <= 110_000
    clock.now += 11  # past the cache's ttl, inside the window
    assert await outcome(rate("eur")) == "old"
    assert rate.cache_info().stale == 1
    await rate.acache_prime("primed", "eur")  # a prime is kept for the window too
    assert 100_000 < int(sync_redis.pttl(value_name(cache, "eur"))) <= 110_000


async def test_stats_count_an_entry_past_its_expiry_as_a_miss(make_redis_cache: Make) -> None:
    clock = Clock()
    here = Source()
    cache = make_redis_cache()
    f_here = memoize(cache, here, clock)
    here.plan = ["old", "new"]
    assert await outcome(f_here("eur")) == "old"
    assert await outcome(f_here("eur")) == "old"
    assert (cache.stats().hits, cache.stats().misses) == (1, 1)
    clock.now += 11  # expired: computed again, a miss for the function and the cache alike
    assert await outcome(f_here("eur")) == "new"
    info = f_here.cache_info()
    assert (info.hits, info.misses) == (1, 2)
    assert cache.stats().misses == 2


@pytest.mark.parametrize("computing", ["with the options", "without"])
async def test_a_mixed_fleet_gets_plain_values_from_each_others_entries(
    make_redis_cache: Make, computing: str
) -> None:
    # One process with stale_if_error (its entries carry their expiry, on the wall clock), one
    # without: each gets the other's result as a plain value, as a hit and as a waiter.
    here = Source()
    kept_cache, plain_cache = make_redis_cache(), make_redis_cache()

    @worker_queue(cache=kept_cache, name="shared.rate", ttl=60.0, stale_if_error=100.0)
    async def kept(key: str) -> Any:
        return await here(key)

    @worker_queue(cache=plain_cache, name="shared.rate")
    async def plain(key: str) -> Any:
        return await here(key)

    first, second = (kept, plain) if computing == "with the options" else (plain, kept)
    waiting_cache = plain_cache if first is kept else kept_cache
    here.gate = asyncio.Event()
    here.plan = ["EUR"]
    async with asyncio.timeout(WAIT):
        computing_call = asyncio.ensure_future(first("eur"))
        await here.started.wait()
        waiting_call = asyncio.ensure_future(second("eur"))
        await until(lambda: waiting_anywhere(waiting_cache) == 1)
        here.gate.set()
        assert await computing_call == "EUR"
        assert await waiting_call == "EUR"
        assert await second("eur") == "EUR"
        assert await second.acache_peek("eur") == "EUR"
        assert await plain_cache.get(CallKey("shared.rate", cachetools.keys.hashkey("eur"))) == (
            "EUR"
        )
    assert here.calls == 1


@pytest.mark.parametrize(
    "args",
    [
        ([1, [2, [3, []]]], {"k": [None, True, 1.5, -0.0]}),
        (2**100, -(2**64), 1.0, 1, True),
        ("\ud800 lone surrogate", "\x00", "é"),
        ({},),
        (),
    ],
    ids=["nested", "numbers", "strings", "empty-dict", "no-args"],
)
async def test_a_remembered_errors_json_arguments_come_back_exactly_elsewhere(
    make_redis_cache: Make, args: tuple[Any, ...]
) -> None:
    # Other is a ValueError, which keeps every argument (an OSError, such as TimeoutError,
    # keeps two of three to five).
    clock = Clock()
    here, there = Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock, cache_errors={Other: 30.0})
    f_there = memoize(make_redis_cache(), there, clock, cache_errors={Other: 30.0})
    here.plan = [Other(*args)]
    assert type(await outcome(f_here("eur"))) is Other
    got = await outcome(f_there("eur"))
    assert type(got) is Other
    assert got.args == args
    assert [type(a) for a in got.args] == [type(a) for a in args]
    assert there.calls == 0


def _in_module(module: str) -> type[Throttled]:
    kind = type("Limited", (Throttled,), {"__module__": module, "__qualname__": "Limited"})
    return kind


async def test_types_of_one_qualname_in_two_modules_are_told_apart(make_redis_cache: Make) -> None:
    alpha, beta = _in_module("wq_memo_test_alpha"), _in_module("wq_memo_test_beta")
    clock = Clock()
    here, both, only_beta = Source(), Source(), Source()
    f_here = memoize(make_redis_cache(), here, clock, cache_errors={alpha: 30.0})
    f_both = memoize(make_redis_cache(), both, clock, cache_errors={Throttled: 30.0})
    f_beta = memoize(make_redis_cache(), only_beta, clock, cache_errors={beta: 30.0})
    here.plan = [alpha("eur")]
    assert type(await outcome(f_here("eur"))) is alpha
    got = await outcome(f_both("eur"))  # both are loaded subclasses: the module tells them apart
    assert type(got) is alpha
    assert both.calls == 0
    assert await f_beta.acache_peek("eur") is MISSING  # beta's reader does not name alpha's
