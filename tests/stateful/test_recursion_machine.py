"""Model-based test of recursion under @worker_queue: computations await the memoized function
on smaller keys ("b" awaits "a"; "c" awaits "b" and "a" at once; "d" awaits "c" and "b"), with
a TTLCache on a fake clock.

Beyond the decorator machine's invariants (one computation per key and generation, each caller
gets the outcome of a computation it could have joined, context isolation, arrival order):
- a nested call never waits for a slot: every key a computation awaits is being computed;
- computations started by callers stay within maxsize (a nested one never waits for a slot);
- a nested computation runs in a copy of the context of the computation that called it.
"""

from __future__ import annotations

import asyncio
import contextvars

from hypothesis import settings
from hypothesis.stateful import invariant, run_state_machine_as_test

from wq_memo import QueueShutDown, ShutdownTimeout

from ._machinery import KEYS, Computation, ComputationFailed
from .test_decorator_machine import DecoratorMachine, SingleFlightMachine

BELOW: dict[str, tuple[str, ...]] = {"a": (), "b": ("a",), "c": ("b", "a"), "d": ("c", "b")}
"""The keys each key's computation awaits, all at once, before it waits on its gate."""
assert set(BELOW) == set(KEYS)

NESTED_IN: contextvars.ContextVar[int | None] = contextvars.ContextVar("nested_in", default=None)
"""The computation whose nested call the running code belongs to."""


class RecursionMachine(DecoratorMachine):
    """Drives f(key) where f's computations call f on smaller keys."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited: dict[int, set[str]] = {}
        """Per computation, the keys its nested calls still await."""

    def takes_a_slot(self, comp: Computation) -> bool:
        # Started by a nested call, or taken out of the line when a nested call joined it: it
        # runs without waiting for a slot (in a free one, or in that of its caller).
        return NESTED_IN.get() is None and not any(
            comp.key in keys for keys in self.awaited.values()
        )

    def check_starter(self, comp: Computation) -> None:
        parent = NESTED_IN.get()
        if parent is None:
            super().check_starter(comp)
        elif comp.tenant != self.comps[parent].tenant:
            self.violations.append(
                f"nested computation #{comp.id} of {comp.key!r} ran as tenant {comp.tenant}, "
                f"not in the context of #{parent}, which called it"
            )

    async def before_gate(self, comp: Computation) -> None:
        below = BELOW[comp.key]
        if not below:
            return
        NESTED_IN.set(comp.id)
        self.awaited[comp.id] = set(below)
        self.inner_calls += len(below)
        try:
            await asyncio.gather(*(self.nested(comp, key) for key in below))
        finally:
            del self.awaited[comp.id]

    async def nested(self, comp: Computation, key: str) -> None:
        """One nested call; whatever it gets, the calling computation goes on."""
        try:
            await self.f(key)
        except (ComputationFailed, QueueShutDown, ShutdownTimeout):
            pass
        except Exception as exc:
            self.violations.append(f"#{comp.id}'s nested call of {key!r} raised {exc!r}")
        finally:
            self.awaited[comp.id].discard(key)

    @invariant()
    def no_nested_call_waits_for_a_slot(self) -> None:
        computing = {c.key for c in self.active}
        stuck = [
            (comp_id, key)
            for comp_id, keys in self.awaited.items()
            for key in keys
            if key not in computing
        ]
        assert not stuck, (
            f"computations await keys nobody computes (a nested call waits for a slot its "
            f"caller holds): {stuck}"
        )


def test_recursion_machine() -> None:
    run_state_machine_as_test(
        RecursionMachine, settings=settings(max_examples=150, stateful_step_count=30)
    )


class SingleFlightRecursionMachine(RecursionMachine, SingleFlightMachine):
    """As RecursionMachine, with a cache that computes through get_or_compute, as RedisCache
    does: a nested call may join a flight that holds the key's claim and waits for a slot, and
    must lend it its own instead of waiting for a slot its caller holds."""


def test_recursion_machine_over_a_single_flight_cache() -> None:
    run_state_machine_as_test(
        SingleFlightRecursionMachine, settings=settings(max_examples=150, stateful_step_count=30)
    )
