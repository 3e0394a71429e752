"""Behaviour, side by side: small probes run against every contender, printed as a matrix.

Each probe calls the memoized function the way an application would and reports what
happened, so that the feature comparison in the README rests on something that ran:
deduplication, bounded concurrency, cancellation isolation, exception caching, None caching,
a change of event loop, typing and shutdown. Every wait is bounded; a probe that does not
finish in time reports "hung".
"""

from __future__ import annotations

import asyncio
import importlib.resources
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ._harness import Config, Table
from .contenders import PEERS, WQ_MEMO, AsyncFn, Contender, Setup

PROBE_TIMEOUT = 2.0
CALLERS = 10
MAXSIZE = 3


@dataclass
class Probe:
    """A function to memoize: counts computations, how many run at once; can be held."""

    fail_first: bool = False
    result: Any = "value"
    gate: asyncio.Event | None = None
    computations: int = 0
    finished: int = 0
    active: int = 0
    peak: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, x: int) -> Any:
        self.computations += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_first and self.computations == 1:
                raise ValueError("first call fails")
            self.finished += 1
            return self.result
        finally:
            self.active -= 1


def wrap(contender: Contender, probe: Probe) -> AsyncFn:
    return contender.wrap(probe.call, Setup(cache="dict", maxsize=MAXSIZE))


async def deduplication(contender: Contender) -> str:
    probe = Probe(gate=asyncio.Event())
    f = wrap(contender, probe)
    calls = [asyncio.ensure_future(f(1)) for _ in range(CALLERS)]
    await probe.started.wait()
    await asyncio.sleep(0)
    probe.gate.set()  # type: ignore[union-attr]
    await asyncio.gather(*calls)
    n = probe.computations
    verdict = "yes" if n == 1 else "no"
    return f"{verdict} ({n} computation{'s' if n > 1 else ''} for {CALLERS} callers)"


async def bounded_concurrency(contender: Contender) -> str:
    probe = Probe(gate=asyncio.Event())
    f = wrap(contender, probe)
    calls = [asyncio.ensure_future(f(i)) for i in range(CALLERS)]
    for _ in range(200):  # let every call get as far as it can (a bounded number of turns)
        if probe.active == CALLERS:
            break
        await asyncio.sleep(0)
    probe.gate.set()  # type: ignore[union-attr]
    await asyncio.gather(*calls)
    verdict = "yes" if probe.peak < CALLERS else "no"
    return f"{verdict} ({probe.peak} of {CALLERS} at once)"


async def _cancelled(call: Awaitable[Any]) -> bool:
    """Await call; whether it ended in CancelledError (this task is not being cancelled)."""
    try:
        await call
    except asyncio.CancelledError:
        return True
    return False


async def cancellation(contender: Contender) -> str:
    # Two callers of one key; the first is cancelled. The second must get the value.
    probe = Probe(gate=asyncio.Event())
    f = wrap(contender, probe)
    first = asyncio.ensure_future(f(1))
    await probe.started.wait()
    second = asyncio.ensure_future(f(1))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    probe.gate.set()  # type: ignore[union-attr]
    if await _cancelled(second):
        return "no: the other caller is cancelled too"
    # One caller, cancelled: does the computation still finish and serve the next call?
    lone = Probe(gate=asyncio.Event())
    g = wrap(contender, lone)
    only = asyncio.ensure_future(g(1))
    await lone.started.wait()
    only.cancel()
    await asyncio.sleep(0)
    lone.gate.set()  # type: ignore[union-attr]
    if await _cancelled(g(1)):
        return "no: the next caller gets CancelledError"
    if lone.computations == 1 and lone.finished == 1:
        return "yes"
    return "partly: the computation is cancelled with its last caller"


async def exceptions(contender: Contender) -> str:
    probe = Probe(fail_first=True)
    f = wrap(contender, probe)
    with_error = 0
    for _ in range(2):
        try:
            await f(1)
        except ValueError:
            with_error += 1
    if with_error == 2 and probe.computations == 1:
        return "cached"
    return "never cached"


async def none_results(contender: Contender) -> str:
    probe = Probe(result=None)
    f = wrap(contender, probe)
    await f(1)
    await f(1)
    return "cached" if probe.computations == 1 else "not cached (recomputed)"


def loop_change(contender: Contender) -> str:
    """Call the same memoized function under two successive asyncio.run()."""
    probe = Probe()
    f = wrap(contender, probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for _ in range(2):
                asyncio.run(asyncio.wait_for(f(1), PROBE_TIMEOUT))
        except TimeoutError:
            return "hung"
        except Exception as exc:
            return f"fails: {type(exc).__name__}"
    note = f", warns {caught[0].category.__name__}" if caught else ""
    if probe.computations == 1:
        return f"works, cache kept{note}"
    return f"works, cache lost{note}"


def typing(contender: Contender) -> str:
    try:
        typed = importlib.resources.files(contender.module).joinpath("py.typed").is_file()
    except (ModuleNotFoundError, TypeError):
        typed = False
    return "py.typed" if typed else "untyped"


SHUTDOWN_APIS = {
    "wq_memo": "yes: f.queue.aclose(), worker_queue.aclose_all()",
    "async-lru": "partly: f.cache_close() cancels or awaits tasks",
}


def shutdown(contender: Contender) -> str:
    """Whether the memoizer offers a way to finish or cancel its computations at shutdown."""
    probe = Probe()
    f: Any = wrap(contender, probe)
    if hasattr(getattr(f, "queue", None), "aclose"):
        return SHUTDOWN_APIS["wq_memo"]
    if hasattr(f, "cache_close"):
        return SHUTDOWN_APIS["async-lru"]
    return "no"


ASYNC_PROBES: dict[str, Callable[[Contender], Awaitable[str]]] = {
    "deduplication": deduplication,
    "bounded concurrency": bounded_concurrency,
    "cancellation isolation": cancellation,
    "exceptions": exceptions,
    "None results": none_results,
}
SYNC_PROBES: dict[str, Callable[[Contender], str]] = {
    "event-loop change": loop_change,
    "typing": typing,
    "shutdown": shutdown,
}


async def _bounded(probe: Callable[[Contender], Awaitable[str]], contender: Contender) -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await probe(contender)
    except TimeoutError:
        return "hung"


def probe_all() -> dict[str, dict[str, str]]:
    """feature -> contender -> what happened. Runs its own event loops: call it off-loop."""
    results: dict[str, dict[str, str]] = {f: {} for f in [*ASYNC_PROBES, *SYNC_PROBES]}
    for contender in [WQ_MEMO, *PEERS]:
        status = contender.status()
        for feature in results:
            if status is not None:
                results[feature][contender.name] = status
            elif feature in ASYNC_PROBES:
                results[feature][contender.name] = asyncio.run(
                    _bounded(ASYNC_PROBES[feature], contender)
                )
            else:
                results[feature][contender.name] = SYNC_PROBES[feature](contender)
    return results


async def features(config: Config) -> Table:
    """The matrix, one row per contender (columns would be too wide to read)."""
    results = await asyncio.to_thread(probe_all)
    table = Table("features", "Behaviour, probed", ["contender", *results])
    for contender in [WQ_MEMO, *PEERS]:
        table.add(contender.name, *(results[f][contender.name] for f in results))
    table.data = {"probes": results}
    table.notes.append(
        f"{CALLERS} callers per probe, wq_memo with maxsize={MAXSIZE}; see benchmarks/features.py"
    )
    return table
