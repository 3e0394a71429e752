"""What every scenario shares: the run's settings, interleaved timing, medians, tables.

Only the standard library: benchmarks.matrix imports it before any environment is made.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Config:
    """How big and how often: the full run, the quick one, or a tiny one for the tests."""

    quick: bool
    rounds: int
    """Interleaved rounds per scenario; each figure is the median over them."""
    batch_seconds: float
    """About how long one hit-path batch of calls runs."""
    callers: int
    """Concurrent callers of one cold key in the stampede."""
    keys: int
    """Distinct cold keys requested at once in the miss-throughput scenario."""
    memory_entries: int
    """Entries cached (and calls held in flight) for the memory scenario."""
    growth_sizes: tuple[int, ...]
    """Cache sizes for the hit path's growth."""
    growth_callers: tuple[int, ...]
    """Caller counts for the stampede's growth."""
    growth_rounds: int
    hol_slow: float = 1.0
    """Head-of-line: how long the one slow item takes, in seconds."""
    hol_fast: float = 0.010
    """Head-of-line: how long each of the twelve quick items takes."""
    refresh_seconds: float = 5.0
    """Refresh-ahead: how long each run of each contender lasts, warm-up included."""
    refresh_rounds: int = 2
    """Refresh-ahead: runs per contender, interleaved."""
    refresh_warm_up: float = 1.0
    """Refresh-ahead: the first seconds of each run, left out of the figures."""

    @classmethod
    def full(cls) -> Config:
        return cls(
            quick=False,
            rounds=9,
            batch_seconds=0.04,
            callers=10_000,
            keys=10_000,
            memory_entries=10_000,
            growth_sizes=(100, 1_000, 10_000, 100_000, 1_000_000),
            growth_callers=(100, 1_000, 10_000, 100_000),
            growth_rounds=5,
        )

    @classmethod
    def quick_run(cls) -> Config:
        return cls(
            quick=True,
            rounds=2,
            batch_seconds=0.005,
            callers=2_000,
            keys=2_000,
            memory_entries=1_000,
            growth_sizes=(100, 10_000),
            growth_callers=(100, 2_000),
            growth_rounds=2,
            hol_slow=0.3,
            refresh_seconds=1.5,
            refresh_rounds=1,
        )

    def scaled(self, **changes: Any) -> Config:
        """A copy with some settings changed (the tests use tiny sizes)."""
        return dataclasses.replace(self, **changes)


def load_average() -> list[float] | None:
    """The load averages over 1, 5 and 15 minutes, where the OS reports them."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the collector out of the timed section (as timeit does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


Trial = Callable[[], Awaitable[float]]
"""One measurement of one contender: returns seconds per operation."""


async def interleave(trials: Sequence[tuple[str, Trial]], rounds: int) -> dict[str, list[float]]:
    """Run every contender's trial once per round, rotating the order from round to round.

    Interleaving spreads the machine's slow moments over every contender instead of letting
    them land on whichever happened to run then.
    """
    samples: dict[str, list[float]] = {name: [] for name, _ in trials}
    for r in range(rounds):
        shift = r % len(trials)
        for name, trial in [*trials[shift:], *trials[:shift]]:
            samples[name].append(await trial())
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of name's time divided by reference's time in the same round."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[reference], strict=True))


def clock() -> float:
    return time.perf_counter()


def ns(seconds: float) -> str:
    return f"{seconds * 1e9:,.0f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.2f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


UNITS: dict[str, str] = {"x": "x", "ns": " ns", "us": " us", "B": " B", "s": " s", "": ""}


def show(value: float, unit: str) -> str:
    """A figure as the tables print it: 0.62x, 1,234 ns, 7.80 us, 3,882 B, 0.062 s, 10,000."""
    if unit == "x":
        text = f"{value:.2f}"
    elif unit == "us":
        text = f"{value:,.2f}"
    elif unit == "s":
        text = f"{value:.3f}"
    else:
        text = f"{value:,.0f}"
    return text + UNITS[unit]


@dataclass
class Table:
    """One scenario's result: printed as a markdown table, saved as JSON."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """The raw figures behind the rows, for the JSON file and the tests."""
    targets: list[Target] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    """The figures that runs on other Pythons or loops are compared on (benchmarks.matrix)."""

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            padded = (
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            return "| " + " | ".join(padded) + " |"

        rule = (
            "|"
            + "|".join(
                "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
            )
            + "|"
        )
        out = [f"### {self.title}", "", line(self.columns), rule]
        out += [line(row) for row in self.rows]
        if self.notes or self.targets:
            out.append("")
            out += [f"- {note}" for note in self.notes]
            out += [f"- target: {t.describe()}" for t in self.targets]
        return "\n".join(out)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "data": self.data,
            "targets": [t.as_json() for t in self.targets],
            "figures": [dataclasses.asdict(f) for f in self.figures],
        }


@dataclass(frozen=True)
class Figure:
    """One figure of a run, named the same in every run so that runs can be set side by side."""

    what: str
    value: float
    unit: str
    """One of UNITS: "x" for a ratio."""
    contender: str = "wq_memo"


@dataclass(frozen=True)
class Target:
    """A target from the issue, and whether this run met it."""

    what: str
    value: float
    limit: float
    unit: str = "x"
    stretch: float | None = None
    """A tighter limit worth reaching, reported beside the target."""

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    @property
    def stretch_met(self) -> bool | None:
        return None if self.stretch is None else self.value <= self.stretch

    def describe(self) -> str:
        verdict = "met" if self.met else f"MISSED by {show(self.value - self.limit, self.unit)}"
        limit = f"target <= {show(self.limit, self.unit)}"
        if self.stretch is not None:
            limit += f", stretch <= {show(self.stretch, self.unit)}"
            verdict += ", stretch met" if self.stretch_met else ", stretch missed"
        return f"{self.what}: {show(self.value, self.unit)} ({limit}): {verdict}"

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met, "stretch_met": self.stretch_met}
