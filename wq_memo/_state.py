"""Where a flight is in its life. Only _flight.py changes a flight's state; the rest reads it.

::

    WAITING ──► RUNNING ◄──────────► AWAITING_ELSEWHERE
       │  ╲       ▲  (hold / give_back)     │
       │   ╲      │ (its lender ends)       │ (a caller lends it its slot)
       │    ╲──► RUNNING_LENT ◄─────────────┘
       ▼          │
    FINISHED ◄────┘ (from any state: result, failure, cancellation, drop, close)

An item in line is WAITING. Its computation runs in a slot of its own (RUNNING; RUNNING_SPARE
for a background refresh in a spare slot, one no caller's computation could use), in the slot
of a computation of the same table that awaits it (RUNNING_LENT: a nested call), or, with a
single-flight cache, in no slot while it may wait for another process (AWAITING_ELSEWHERE: its
computation takes a slot of its own with ``FlightTable.slot()`` only when it computes here).
RUNNING_SPARE is RUNNING for a background refresh, which it enters instead (from WAITING, or
from AWAITING_ELSEWHERE through ``take_spare``; ``give_back`` leads back there).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = (
    "AWAITING_ELSEWHERE",
    "FINISHED",
    "RUNNING",
    "RUNNING_LENT",
    "RUNNING_SPARE",
    "WAITING",
    "State",
)


class State(enum.Enum):
    """Where an item is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    RUNNING_SPARE = "running in a spare slot"
    RUNNING_LENT = "running in a lent slot"
    AWAITING_ELSEWHERE = "awaiting elsewhere"
    FINISHED = "finished"


# Module-level names: reading an Enum member through its class is slow on the hot path.
WAITING: Final = State.WAITING
RUNNING: Final = State.RUNNING
RUNNING_SPARE: Final = State.RUNNING_SPARE
RUNNING_LENT: Final = State.RUNNING_LENT
AWAITING_ELSEWHERE: Final = State.AWAITING_ELSEWHERE
FINISHED: Final = State.FINISHED
