"""Nested calls: which computation awaits which, lending slots to them, and cycles.

A memoized call made inside a computation of the same queue is *nested*: its caller (the
*parent*) holds a slot and is suspended until the nested computation ends. Two things follow:

- Lending. Were the nested computation to wait in line for a slot, a recursion deeper than
  ``maxsize`` would wait for ever on slots its own callers hold. So it runs in the slot of the
  nearest computation of the same table among its callers (its *lender*), which awaits it anyway.
  When a lender ends before a computation running in its slot (its caller left), that borrower
  moves to the lender's own lender, or takes a slot of its own, over the bound until it ends.
- Cycles. A computation that awaits, directly or through others, a computation that awaits it
  would wait for ever: the call that would close the cycle raises RecursionError instead.

The edges of the graph are the callers' futures: an edge is live while its future is pending,
so a caller that left (cancelled) is no edge, whatever happens to the computation later.
"""

from __future__ import annotations

import contextvars
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING, Any, Final

from ._state import FINISHED, RUNNING_LENT, RUNNING_SPARE

if TYPE_CHECKING:
    import asyncio

    from ._flight import Flight

__all__ = (
    "awaits",
    "check_no_cycle",
    "current",
    "hand_over",
    "leave_lender",
    "lend",
    "lender_of",
    "on_spare",
    "reaches",
)

current: Final[contextvars.ContextVar[Flight[Any, Any] | None]] = contextvars.ContextVar(
    "wq_memo_current_flight", default=None
)
"""The computation whose task the running code belongs to (None outside any computation)."""


def reaches(start: Flight[Any, Any], target: Flight[Any, Any]) -> bool:
    """Whether start's computation awaits target, directly or through other computations."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        flight = stack.pop()
        if flight is target:
            return True
        if id(flight) in seen or flight.state is FINISHED:
            continue
        seen.add(id(flight))
        if flight.awaiting:
            stack.extend(f for f, waiter in flight.awaiting if not waiter.done())
    return False


def check_no_cycle(parent: Flight[Any, Any], flight: Flight[Any, Any]) -> None:
    """Raise RecursionError if parent's computation awaiting flight would close a cycle."""
    if flight is parent or reaches(flight, parent):
        raise RecursionError(
            f"computing {parent.key!r} requires {flight.key!r}, whose computation "
            f"is waiting for it: a memoized call depends on itself"
        )


def awaits(parent: Flight[Any, Any], flight: Flight[Any, Any], waiter: asyncio.Future[Any]) -> None:
    """Record that parent's computation awaits flight through waiter. A wait that has ended
    (waiter done, even cancelled a moment ago) is no edge, whatever happens to flight later."""
    awaiting = parent.awaiting
    if awaiting is None:
        parent.awaiting = [(flight, waiter)]
        return
    if len(awaiting) >= 64:
        awaiting[:] = [(f, w) for f, w in awaiting if not w.done() and f.state is not FINISHED]
    awaiting.append((flight, waiter))


def lender_of(
    parent: Flight[Any, Any],
    flights: Mapping[Any, Flight[Any, Any]],
    forgotten: Container[Flight[Any, Any]],
) -> Flight[Any, Any] | None:
    """The nearest of parent and its own callers that computes in a slot and belongs to the
    table whose key map is ``flights`` (and ``forgotten`` its forgotten flights), or None."""
    flight: Flight[Any, Any] | None = parent
    while flight is not None:
        if (
            flight.computing
            and flight.state is not FINISHED
            and (flights.get(flight.key) is flight or flight in forgotten)
        ):
            return flight
        flight = flight.parent
    return None


def lend(flight: Flight[Any, Any], lender: Flight[Any, Any]) -> None:
    """flight computes in lender's slot (lender awaits it)."""
    flight.lender = lender
    if lender.borrowers is None:
        lender.borrowers = [flight]
    else:
        lender.borrowers.append(flight)


def leave_lender(flight: Flight[Any, Any]) -> None:
    """flight, which computed in its lender's slot, has ended."""
    lender = flight.lender
    if lender is not None and lender.borrowers and flight in lender.borrowers:
        lender.borrowers.remove(flight)


def hand_over(flight: Flight[Any, Any], lender: Flight[Any, Any] | None) -> list[Flight[Any, Any]]:
    """flight ends: the computations still running in its slot move to ``lender`` (flight's own
    lender), or with None they are to take slots of their own (the caller counts those).
    Returns the computations moved."""
    borrowers = flight.borrowers
    flight.borrowers = None
    live = [b for b in borrowers or () if b.state is RUNNING_LENT]
    for borrower in live:
        borrower.lender = lender
        if lender is not None:
            lend(borrower, lender)
    return live


def on_spare(lender: Flight[Any, Any]) -> bool:
    """Whether lender computes in a spare slot (a background refresh's), its own or its own
    lender's: the slot a nested call of it must share, since a slot it took would be a caller's."""
    flight: Flight[Any, Any] | None = lender
    while flight is not None:
        if flight.state is RUNNING_SPARE:
            return True
        flight = flight.lender
    return False
