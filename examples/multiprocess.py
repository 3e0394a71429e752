"""Four processes share one Redis: every key is computed once in total, not once per process.

    python examples/multiprocess.py          # Redis at $WQ_MEMO_REDIS_URL or 127.0.0.1:6379/0

Each process calls slow_square() 40 times at once on 5 distinct arguments. Within a process the
hidden queue deduplicates the calls; across processes RedisCache's lease lock lets one process
compute a key while the others wait for its result. The script exits with status 1 if any key
was computed more than once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from typing import Any

from wq_memo import worker_queue
from wq_memo.backends.redis import RedisCache

URL = os.environ.get("WQ_MEMO_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("WQ_MEMO_NAMESPACE", "wq_memo_example")

# Every process builds the same cache; set secret= (the same in every process) to store any
# picklable value signed, instead of JSON.
cache = RedisCache(URL, namespace=NAMESPACE, ttl=60)
computations: Any = None  # a multiprocessing queue, set in each process


@worker_queue(cache=cache)
async def slow_square(x: int) -> int:
    computations.put((os.getpid(), x))
    await asyncio.sleep(0.3)  # stands for real work: a query, an HTTP call, a model
    return x * x


async def calls() -> list[int]:
    try:
        return await asyncio.gather(*(slow_square(i % 5) for i in range(40)))
    finally:
        await cache.aclose()


def process(start: Any, queue: Any) -> None:
    global computations
    computations = queue
    start.wait()
    assert asyncio.run(calls()) == [(i % 5) ** 2 for i in range(40)]


def main() -> int:
    asyncio.run(slow_square.acache_clear())  # start cold
    asyncio.run(cache.aclose())
    ctx = multiprocessing.get_context("spawn")
    start, queue = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=process, args=(start, queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    computed = []
    while not queue.empty():
        computed.append(queue.get())
    for pid, x in sorted(computed, key=lambda c: c[1]):
        print(f"process {pid} computed slow_square({x})")
    keys = sorted(x for _, x in computed)
    print(f"4 processes x 40 calls: {len(computed)} computations for {len(set(keys))} keys")
    return 0 if not failed and keys == [0, 1, 2, 3, 4] else 1


if __name__ == "__main__":
    raise SystemExit(main())
