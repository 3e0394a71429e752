"""python -m benchmarks [--quick] [--out DIR] [--only SCENARIO ...] [--loop uvloop]: one run.

Runs every scenario on the current interpreter, prints each scenario's table as it finishes,
then the targets met or missed; writes results.json, results.md and the growth chart
(growth.png) to DIR. ``python -m benchmarks.matrix`` runs this on every Python it finds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import bursts, features, growth, head_of_line, hit_path, memory, refresh_ahead, ttl_lookup
from ._harness import Config, Table, cpu_model, load_average
from .contenders import versions

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"

SCENARIOS: dict[str, Callable[[Config], Awaitable[Table]]] = {
    "hit_path": hit_path.measure,
    "ttl_lookup": ttl_lookup.ttl_lookup,
    "stampede": bursts.stampede,
    "miss_throughput": bursts.miss_throughput,
    "head_of_line": head_of_line.head_of_line,
    "memory": memory.memory,
    "hit_growth": growth.hit_growth,
    "stampede_growth": growth.stampede_growth,
    "features": features.features,
    "refresh_ahead": refresh_ahead.refresh_ahead,
    "redis_processes": importlib.import_module(".redis_processes", __package__).measure,
}
"""The scenarios measured in this process, in the order they run; each returns a Table."""


@dataclass(frozen=True)
class Section:
    """A benchmark kept in a module of its own, run after the scenarios when it can run.

    The module (benchmarks/<module>.py) has ``async def measure(quick: bool) -> str``, which
    returns a printable table.
    """

    module: str
    needs_redis: bool = False


SECTIONS: dict[str, Section] = {
    "redis_backends": Section("redis_backends", needs_redis=True),
    "batching": Section("batching"),
}
"""Benchmarks with their own modules and tables (--only takes their names too)."""

LOOPS = ("asyncio", "uvloop")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="wq_memo side by side with the peers: every scenario, medians and ratios.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: fewer rounds, smaller sizes"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where results.json, results.md and growth.png go (default: benchmarks/results)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*SCENARIOS, *SECTIONS],
        help="run only these scenarios",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="the event loop: asyncio's own (default) or uvloop's (the bench extra installs it)",
    )
    return parser.parse_args(argv)


def machine(loop: str = "asyncio") -> dict[str, Any]:
    """What the figures were measured on."""
    load = load_average()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(terse=True),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loop": loop,
        "load_average_at_start": load[0] if load else None,
        "load_averages_at_start": load,
        "versions": versions(),
    }


def describe(m: dict[str, Any]) -> str:
    peers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = m["load_averages_at_start"]
    load_text = f"; load average {'/'.join(f'{x:.2f}' for x in load)} at start" if load else ""
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; {m['python']}, "
        f"{m['loop']} event loop{load_text}\n"
        f"Versions: {peers}"
    )


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def redis_reachable() -> bool:
    url = urlsplit(os.environ.get("WQ_MEMO_REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), 1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


async def run_section(name: str, quick: bool) -> str:
    """A section's table, when its module and what it needs are there; else why not."""
    section = SECTIONS[name]
    if not (HERE / f"{section.module}.py").exists():
        return f"{name}: skipped (benchmarks/{section.module}.py is not there)"
    if section.needs_redis:
        if not installed("redis.asyncio"):
            return f"{name}: skipped (the redis package is not installed: the redis extra)"
        if not redis_reachable():
            return f"{name}: skipped (no Redis answering at WQ_MEMO_REDIS_URL)"
    module: Any = importlib.import_module(f"benchmarks.{section.module}")
    text: str = await module.measure(quick)
    return text


async def run(config: Config, out: Path, only: list[str] | None, loop: str = "asyncio") -> int:
    m = machine(loop)
    command = (
        "python -m benchmarks"
        + (" --quick" if config.quick else "")
        + (f" --loop {loop}" if loop != "asyncio" else "")
        + (f" --only {' '.join(only)}" if only else "")
    )
    header = f"# wq_memo benchmarks\n\n`{command}`\n\n{describe(m)}"
    print(header, end="\n\n", flush=True)
    tables: list[Table] = []
    started = time.perf_counter()
    for name, scenario in SCENARIOS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        table = await scenario(config)
        tables.append(table)
        print(table.render(), flush=True)
        print(f"({time.perf_counter() - t0:.1f} s)", end="\n\n", flush=True)

    status = 0
    extra: list[str] = []
    sections: dict[str, str] = {}
    for name in SECTIONS:
        if only and name not in only:
            continue
        try:
            sections[name] = await run_section(name, config.quick)
        except Exception:
            traceback.print_exc()
            sections[name] = f"{name}: FAILED (traceback above)"
            status = 1
        extra.append(sections[name])
        print(extra[-1], end="\n\n", flush=True)

    by_key = {t.key: t for t in tables}
    if "hit_growth" in by_key and "stampede_growth" in by_key:
        extra.append(
            growth.write_chart(by_key["hit_growth"], by_key["stampede_growth"], out / "growth.png")
        )
        print(extra[-1], flush=True)

    targets = [t for table in tables for t in table.targets]
    summary = ["## Targets", ""] + [f"- {t.describe()}" for t in targets]
    print("\n".join(summary), flush=True)
    elapsed = time.perf_counter() - started
    m["load_averages_at_end"] = load_average()
    print(f"\nall done in {elapsed:.0f} s; results in {out}", flush=True)

    save(
        out,
        "\n\n".join([header, *(t.render() for t in tables), *extra, "\n".join(summary)]) + "\n",
        {
            "command": command,
            "machine": m,
            "config": config.__dict__,
            "seconds": elapsed,
            "tables": {t.key: t.as_json() for t in tables},
            "sections": sections,
            "notes": extra,
        },
    )
    return status


def save(out: Path, markdown: str, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None, config: Config | None = None) -> int:
    args = parse_args(argv)
    if config is None:
        config = Config.quick_run() if args.quick else Config.full()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "uvloop":
        try:
            uvloop: Any = importlib.import_module("uvloop")
        except ImportError:
            print("--loop uvloop: uvloop is not installed (the bench extra installs it)")
            return 2
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run(config, args.out, args.only, args.loop))


if __name__ == "__main__":
    sys.exit(main())
