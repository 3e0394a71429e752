"""Where a flight is in its life (only _flight.py changes it; the other modules read it)."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ("FINISHED", "RUNNING", "WAITING", "Status")


class Status(enum.Enum):
    """Where an item is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# Module-level names: reading an Enum member through its class is slow on the hot path.
WAITING: Final = Status.WAITING
RUNNING: Final = Status.RUNNING
FINISHED: Final = Status.FINISHED
