"""fast_lookup() against TTLCache's own ``cache[key]``: same answers, same state afterwards.

A state machine drives two TTLCaches built alike on one fake clock: the reference is read with
``cache[key]``, the other with the lookup. Every other operation (stores, deletions, expiry,
eviction, freezing the timer with ``with cache.timer:``) goes to both through cachetools' own
methods; after each step their LRU order, expiry times and contents must be equal. Times and
TTLs are small integers, so that a lookup lands exactly on an expiry time often.

These tests check the cachetools installed. To check another version as well, install it into
a directory of its own (``pip install --target DIR cachetools==5.5.2``) and name the directory
in ``WQ_MEMO_OTHER_CACHETOOLS`` (several: separated by ``os.pathsep``); the last test then runs
this file again with that cachetools first on the path. CI does so for cachetools 5.5.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import cachetools
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from wq_memo._ttl_lookup import SUPPORTED_CACHETOOLS, fast_lookup
from wq_memo.backends import MISSING

VERSION = tuple(int(p) for p in cachetools.__version__.split(".")[:2])
SUPPORTED = SUPPORTED_CACHETOOLS[0] <= VERSION < SUPPORTED_CACHETOOLS[1]
OTHER_CACHETOOLS = "WQ_MEMO_OTHER_CACHETOOLS"

KEYS = ("a", "b", "c", "d", "e", (1,), (2, "x"))
keys = st.sampled_from(KEYS)


class Clock:
    """A timer for the caches: time moves only when a rule moves it."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def internals(cache: cachetools.TTLCache[Any, Any]) -> tuple[list[Any], dict[Any, Any], int]:
    """LRU order with each key's expiry, the stored items, and the timer's nesting."""
    state = vars(cache)
    links: collections.OrderedDict[Any, Any] = state["_TTLCache__links"]
    timer_state = vars(state["_TimedCache__timer"])
    order = [(key, link.expires) for key, link in links.items()]
    return order, dict(state["_Cache__data"]), timer_state["_Timer__nesting"]


def outcome(action: Callable[[], Any]) -> Any:
    """What an operation returned, or the type of what it raised."""
    try:
        return action()
    except Exception as exc:
        return type(exc)


not_recognised = pytest.mark.skipif(
    not SUPPORTED, reason=f"cachetools {cachetools.__version__}: not recognised"
)


class TTLLookupMachine(RuleBasedStateMachine):
    """The reference cache read with cache[key], the other with the lookup, kept in step."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.reference: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(1, 1)
        self.cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(1, 1)
        self.lookup: Callable[[Hashable], Any] = lambda key: MISSING
        self.frozen = 0

    @initialize(
        maxsize=st.integers(1, 5),
        ttl=st.integers(1, 4),
        sized=st.booleans(),
    )
    def build(self, maxsize: int, ttl: int, sized: bool) -> None:
        getsizeof: Callable[[Any], int] | None = len if sized else None
        self.reference = cachetools.TTLCache(maxsize, ttl, timer=self.clock, getsizeof=getsizeof)
        self.cache = cachetools.TTLCache(maxsize, ttl, timer=self.clock, getsizeof=getsizeof)
        lookup = fast_lookup(self.cache)
        assert lookup is not None
        self.lookup = lookup

    def both(self, action: Callable[[cachetools.TTLCache[Any, Any]], Any]) -> None:
        expected = outcome(lambda: action(self.reference))
        assert outcome(lambda: action(self.cache)) == expected

    @rule(key=keys, size=st.integers(1, 3))
    def store(self, key: Hashable, size: int) -> None:
        value = "v" * size  # with getsizeof=len, a value may take more than one slot
        self.both(lambda cache: cache.__setitem__(key, value))

    @rule(key=keys)
    def look_up(self, key: Hashable) -> None:
        try:
            expected = self.reference[key]
        except KeyError:
            expected = MISSING
        assert self.lookup(key) is expected

    @rule(key=keys)
    def look_up_twice(self, key: Hashable) -> None:
        """The second lookup sees what the first left: the key moved to the end, or nothing."""
        self.look_up(key)
        self.look_up(key)

    @rule(key=keys)
    def delete(self, key: Hashable) -> None:
        self.both(lambda cache: cache.__delitem__(key))

    @rule(key=keys)
    def contains(self, key: Hashable) -> None:
        self.both(lambda cache: key in cache)

    @rule(ticks=st.integers(0, 5))
    def advance(self, ticks: int) -> None:
        self.clock.now += ticks

    @rule()
    def expire(self) -> None:
        self.both(lambda cache: cache.expire())

    @rule()
    def evict(self) -> None:
        self.both(lambda cache: cache.popitem())

    @rule()
    def count(self) -> None:
        self.both(len)

    @rule()
    def clear(self) -> None:
        self.both(lambda cache: cache.clear())

    @precondition(lambda self: self.frozen < 3)
    @rule()
    def freeze(self) -> None:
        """Enter ``with cache.timer:`` on both: the time stays what it is until the last exit."""
        self.both(lambda cache: cache.timer.__enter__())
        self.frozen += 1

    @precondition(lambda self: self.frozen > 0)
    @rule()
    def thaw(self) -> None:
        self.both(lambda cache: cache.timer.__exit__(None, None, None))
        self.frozen -= 1

    @invariant()
    def same_state(self) -> None:
        assert internals(self.cache) == internals(self.reference)

    def teardown(self) -> None:
        while self.frozen:
            self.thaw()
        # Which key goes next, and after it: both must give up their items in the same order.
        while True:
            expected = outcome(self.reference.popitem)
            assert outcome(self.cache.popitem) == expected
            if expected is KeyError:
                break


TestTTLLookupMachine = not_recognised(TTLLookupMachine.TestCase)


@not_recognised
def test_a_hit_a_miss_and_the_boundary() -> None:
    clock = Clock()
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(2, 10, timer=clock)
    lookup = fast_lookup(cache)
    assert lookup is not None
    cache["a"] = 1
    cache["b"] = 2
    assert lookup("a") == 1
    assert lookup("z") is MISSING
    cache["c"] = 3  # "a" was used last: "b" goes
    assert set(cache) == {"a", "c"}
    clock.now = 9
    with cache.timer:
        clock.now = 10  # frozen at 9: still there
        assert lookup("a") == 1
    assert lookup("a") is MISSING  # expires at 10, exactly
    with pytest.raises(TypeError):
        lookup(["unhashable"])


def test_recognises_exactly_a_supported_ttlcache() -> None:
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(2, 10)
    assert (fast_lookup(cache) is not None) == SUPPORTED
    assert fast_lookup({}) is None
    assert fast_lookup(cachetools.LRUCache(2)) is None
    assert fast_lookup(cachetools.TLRUCache(2, lambda k, v, now: now + 1)) is None


class Overriding(cachetools.TTLCache[Any, Any]):
    def __missing__(self, key: Any) -> Any:
        return "default"


class Plain(cachetools.TTLCache[Any, Any]):
    pass


def test_subclasses_are_not_recognised() -> None:
    # Even one that overrides nothing: its methods may be replaced later.
    assert fast_lookup(Overriding(2, 10)) is None
    assert fast_lookup(Plain(2, 10)) is None


@pytest.mark.parametrize("version", ["5.4.0", "9.0.0", "8", "x.y", ""])
def test_other_versions_are_not_recognised(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(cachetools, "__version__", version)
    assert fast_lookup(cachetools.TTLCache(2, 10)) is None


@pytest.mark.parametrize("attribute", ["_TTLCache__links", "_Cache__data", "_TimedCache__timer"])
def test_unknown_internals_are_not_recognised(attribute: str) -> None:
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(2, 10)
    vars(cache)[attribute] = []  # present, but not of the expected type
    assert fast_lookup(cache) is None
    del vars(cache)[attribute]
    assert fast_lookup(cache) is None


def test_a_timer_without_the_expected_state_is_not_recognised() -> None:
    cache: cachetools.TTLCache[Any, Any] = cachetools.TTLCache(2, 10)
    del vars(cache.timer)["_Timer__nesting"]
    assert fast_lookup(cache) is None


def _other_cachetools() -> list[str]:
    return [d for d in os.environ.get(OTHER_CACHETOOLS, "").split(os.pathsep) if d]


@pytest.mark.skipif(
    not _other_cachetools(),
    reason=f"{OTHER_CACHETOOLS} names no directory holding another cachetools",
)
@pytest.mark.parametrize("directory", _other_cachetools())
def test_on_another_cachetools(directory: str) -> None:
    """This file again, in a fresh interpreter whose cachetools comes from directory."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([directory, os.environ.get("PYTHONPATH", "")]),
    }
    env.pop(OTHER_CACHETOOLS)
    probe = subprocess.run(
        [sys.executable, "-c", "import cachetools; print(cachetools.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    other = probe.stdout.strip()
    assert other != cachetools.__version__, f"{directory} holds the same cachetools"
    tests = [__file__, "-k", "not test_on_another_cachetools"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"cachetools {other}:\n{done.stdout}\n{done.stderr}"
    assert " skipped" not in done.stdout.splitlines()[-1], done.stdout
