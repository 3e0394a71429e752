"""The exceptions wq_memo raises."""

from __future__ import annotations

__all__ = ("QueueShutDown", "ShutdownTimeout")


class QueueShutDown(RuntimeError):
    """Raised by a require() made while the queue is shutting down."""


class ShutdownTimeout(TimeoutError):
    """Raised to the callers of an item that was still unfinished when finish_timeout ran out."""
