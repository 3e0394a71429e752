"""Examples the machines once got wrong, or that caught a broken library: each is replayed
step by step, with every invariant checked after each rule."""

from __future__ import annotations

from ._machinery import replay
from .test_decorator_machine import SingleFlightMachine


def test_two_computations_returning_none_are_told_apart() -> None:
    # The older computation is forgotten and returns None; the newer one returns None too and
    # stores it, rightly. A model telling results apart by value blamed the older one.
    replay(
        SingleFlightMachine,
        "decorate(maxsize=1, yielding=False); calls(batch=['a']);"
        "invalidate(key='a', use_async=True); release(pick=0, fail=False, none=True);"
        "calls(batch=['a']); release(pick=0, fail=False, none=True)",
    )
