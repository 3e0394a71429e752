"""wq_memo: call async functions many times, compute each distinct call once.

``WorkerQueue`` deduplicates, bounds and caches the computations of an async worker;
``@worker_queue`` memoizes any async function through a hidden WorkerQueue.
"""

from ._batch import Batched, BatchInfo
from ._controls import BoundMemoized, CacheInfo, Memoized
from ._decorator import worker_queue
from ._errors import QueueShutDown, ShutdownTimeout
from ._policy import CachedError
from ._queue import WorkerQueue
from ._switch import disabled
from .backends._protocol import MISSING, Missing

__version__ = "0.1.0"

__all__ = (
    "MISSING",
    "BatchInfo",
    "Batched",
    "BoundMemoized",
    "CacheInfo",
    "CachedError",
    "Memoized",
    "Missing",
    "QueueShutDown",
    "ShutdownTimeout",
    "WorkerQueue",
    "disabled",
    "worker_queue",
)
