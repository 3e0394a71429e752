"""Caches with asynchronous operations, and the protocol they follow.

The Redis backend lives in ``wq_memo.backends.redis`` and is imported only when asked for, so
that wq_memo works without the ``redis`` package.
"""

from ._protocol import MISSING, AsyncCache, CallKey, Missing, RefreshingCache, SingleFlightCache

__all__ = (
    "MISSING",
    "AsyncCache",
    "CallKey",
    "Missing",
    "RefreshingCache",
    "SingleFlightCache",
)
