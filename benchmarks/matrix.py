"""python -m benchmarks.matrix [--quick] [--out DIR]: every scenario on every Python, one table.

For each CPython from 3.11 to 3.13 found on this machine (``pythonX.Y`` on the PATH, or under
``pyenv root``), in a fresh virtual environment of its own, with the current tree installed:

1. the bench extra (the peers on the cachetools a new install gets, and uvloop):
   ``python -m benchmarks`` on asyncio's event loop, then again on uvloop's (the scenarios
   with ratios only);
2. asyncache, which requires cachetools < 6, with async-lru and uvloop beside it in another
   environment: the scenarios asyncache appears in, on both loops. Only asyncache's rows are
   taken from these runs, each a ratio to async-lru measured in the same run; they also give
   the TTLCache lookup figures on that older cachetools.

Runs follow each other, never overlapping. Each run writes its own results (``runs/``); this
script prints the machine, the versions and the load average before and after, and writes
``matrix.md`` (a table with the range of each figure over the Pythons, ready for the README)
and ``matrix.json`` to DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._harness import UNITS, cpu_model, load_average, show

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "matrix"
PYTHONS = ("3.11", "3.12", "3.13")

UVLOOP_SCENARIOS = ("hit_path", "stampede", "miss_throughput", "head_of_line", "memory")
"""What runs on uvloop too: the scenarios whose figures are ratios or targets."""
ASYNCACHE_SCENARIOS = (
    "hit_path",
    "ttl_lookup",
    "stampede",
    "miss_throughput",
    "memory",
    "features",
)
"""The scenarios asyncache appears in (head-of-line: it bounds nothing, like every peer)."""
ASYNCACHE = "asyncache"
ASYNCACHE_ENV = ("asyncache", "async-lru", "uvloop; sys_platform != 'win32'")
"""What the asyncache environment gets besides wq_memo: pip settles on a cachetools < 6."""


@dataclass
class Environment:
    """One virtual environment: its name, what is installed into it, and which runs it gets."""

    name: str
    requirements: list[str]
    runs: list[tuple[str, list[str] | None]]
    """(loop, the scenarios to run, or None for all)."""


@dataclass
class Run:
    """One ``python -m benchmarks`` run and what it saved."""

    python: str
    env: str
    loop: str
    out: Path
    status: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.python + ("" if self.loop == "asyncio" else f" {self.loop}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.matrix",
        description="python -m benchmarks on every CPython 3.11-3.13 found, in fresh "
        "virtual environments, on asyncio and uvloop; one table with ranges over the Pythons.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke runs (python -m benchmarks --quick)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="where matrix.md, matrix.json and runs/ go (default: benchmarks/results/matrix)",
    )
    parser.add_argument(
        "--pythons", nargs="+", default=list(PYTHONS), metavar="X.Y", help="default: %(default)s"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        help="run only these scenarios (names as python -m benchmarks --only takes them)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's event loop only")
    parser.add_argument("--no-asyncache", action="store_true", help="skip asyncache's runs")
    return parser.parse_args(argv)


# -- interpreters and environments --------------------------------------------------------------


def _runs(command: Sequence[str]) -> str | None:
    """The output of a short command, or None if it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def find_python(version: str) -> str | None:
    """A working interpreter for version X.Y: pythonX.Y on the PATH, else one of pyenv's."""
    candidates: list[str] = []
    if found := shutil.which(f"python{version}"):
        candidates.append(found)
    pyenv_root = _runs(["pyenv", "root"]) if shutil.which("pyenv") else None
    pyenv_root = pyenv_root or os.environ.get("PYENV_ROOT")
    if pyenv_root:
        installs = sorted(Path(pyenv_root, "versions").glob(f"{version}.*"), reverse=True)
        candidates += [str(p / "bin" / f"python{version}") for p in installs]
    check = "import sys; print('%d.%d' % sys.version_info[:2])"
    for candidate in candidates:
        # A pyenv shim for a version that pyenv does not select fails here: skip it.
        if _runs([candidate, "-c", check]) == version:
            return candidate
    return None


def environments(args: argparse.Namespace) -> list[Environment]:
    only: list[str] | None = args.only
    uvloop = not args.no_uvloop

    def pick(*allowed: Sequence[str]) -> list[str] | None:
        """The scenarios of --only that each of allowed has (None: every scenario)."""
        names = only
        for scenarios in allowed:
            names = [n for n in (scenarios if names is None else names) if n in scenarios]
        return names

    def runs(*allowed: Sequence[str]) -> list[tuple[str, list[str] | None]]:
        chosen = [("asyncio", pick(*allowed))]
        if uvloop:
            chosen.append(("uvloop", pick(*allowed, UVLOOP_SCENARIOS)))
        return [(loop, names) for loop, names in chosen if names != []]

    envs = [Environment("latest", [f"{ROOT}[bench]"], runs())]
    if not args.no_asyncache:
        envs.append(Environment(ASYNCACHE, [str(ROOT), *ASYNCACHE_ENV], runs(ASYNCACHE_SCENARIOS)))
    return [env for env in envs if env.runs]


def make_venv(python: str, where: Path, requirements: list[str], log: Path) -> Path:
    """A fresh virtual environment at where, with requirements installed; its python."""
    with log.open("a") as out:
        subprocess.run([python, "-m", "venv", str(where)], check=True, stdout=out, stderr=out)
        venv_python = where / ("Scripts" if os.name == "nt" else "bin") / "python"
        install = [str(venv_python), "-m", "pip", "install", "--disable-pip-version-check"]
        editable = [a for r in requirements if r.startswith(str(ROOT)) for a in ("-e", r)]
        others = [r for r in requirements if not r.startswith(str(ROOT))]
        subprocess.run([*install, *editable, *others], check=True, stdout=out, stderr=out)
    return venv_python


def run_benchmarks(
    venv_python: Path, run: Run, quick: bool, only: list[str] | None, log: Path
) -> None:
    command = [str(venv_python), "-m", "benchmarks", "--out", str(run.out), "--loop", run.loop]
    if quick:
        command.append("--quick")
    if only:
        command += ["--only", *only]
    run.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        run.status = subprocess.run(command, cwd=ROOT, stdout=out, stderr=out).returncode
    results = run.out / "results.json"
    if results.exists():
        run.results = json.loads(results.read_text())
    targets = [t for table in run.results.get("tables", {}).values() for t in table["targets"]]
    missed = sum(not t["met"] for t in targets)
    print(
        f"  {run.label} ({run.env}): {time.perf_counter() - started:.0f} s, "
        f"{len(targets) - missed} targets met, {missed} missed"
        + (f"; FAILED with status {run.status}, see {log}" if run.status else ""),
        flush=True,
    )


# -- combining the runs -------------------------------------------------------------------------


@dataclass
class Row:
    """One figure over every run: its values by run label, and its limits if it is a target."""

    what: str
    unit: str
    contender: str
    limit: float | None = None
    stretch: float | None = None
    table: str = ""
    """The scenario it comes from."""
    order: tuple[int, int, bool, int] = (0, 0, False, 0)
    """Where it goes: the scenario's place, wq_memo's figures before its targets before the
    others', the asyncache environment's last, then its place in the run's table."""
    values: dict[str, float] = field(default_factory=dict)
    separate: bool = False
    """Measured in the asyncache environment."""


def collect(runs: list[Run]) -> list[Row]:
    """The rows of the combined table, in the order the scenarios print them.

    From the asyncache environment, only asyncache's figures and those on cachetools itself
    (the TTLCache lookups, named with its version) are taken.
    """
    rows: dict[str, Row] = {}
    scenarios: dict[str, int] = {}
    for run in runs:
        separate = run.env == ASYNCACHE
        for key, table in run.results.get("tables", {}).items():
            place = scenarios.setdefault(key, len(scenarios))
            groups: list[list[dict[str, Any]]] = [
                [f for f in table["figures"] if f["contender"] == "wq_memo"],
                [{**t, "contender": "wq_memo"} for t in table["targets"]],
                [f for f in table["figures"] if f["contender"] != "wq_memo"],
            ]
            for group, entries in enumerate(groups):
                for index, entry in enumerate(entries):
                    if separate and not (entry["contender"] == ASYNCACHE or key == "ttl_lookup"):
                        continue
                    row = rows.setdefault(
                        entry["what"],
                        Row(
                            entry["what"],
                            entry["unit"],
                            entry["contender"],
                            entry.get("limit"),
                            entry.get("stretch"),
                            key,
                            (place, group, separate, index),
                            separate=separate,
                        ),
                    )
                    row.values[run.label] = entry["value"]
    return sorted(rows.values(), key=lambda row: row.order)


def span(values: Iterable[float], unit: str) -> str:
    """Lowest-highest of the values, as the tables print them; one value if they print alike."""
    values = list(values)
    if not values:
        return "-"
    low, high = show(min(values), unit), show(max(values), unit)
    if low == high:
        return low
    return f"{low.removesuffix(UNITS[unit])}\N{EN DASH}{high}"


def verdict(row: Row, labels: list[str]) -> str:
    if row.limit is None:
        return ""
    values = {label: row.values[label] for label in labels if label in row.values}
    if not values:
        return "not measured"
    missed = {k: v for k, v in values.items() if v > row.limit}
    text = (
        f"met on all {len(values)} runs"
        if not missed
        else "missed on " + ", ".join(f"{k} ({show(v, row.unit)})" for k, v in missed.items())
    )
    if row.stretch is not None:
        reached = sum(v <= row.stretch for v in values.values())
        text += f"; stretch {show(row.stretch, row.unit)}: {reached} of {len(values)}"
    return text


def loop_labels(runs: list[Run], loop: str) -> list[str]:
    labels = [r.label for r in runs if r.loop == loop]
    return list(dict.fromkeys(labels))


def markdown_table(header: list[str], body: list[list[str]], numeric: int = 0) -> str:
    """A markdown table; the numeric columns (after the first) are aligned right."""
    rule = ["--:" if 0 < i <= numeric else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *body])


def describe_versions(runs: list[Run]) -> tuple[str, str]:
    """The versions in the bench environments, and asyncache's own environment."""

    def versions(env: str) -> dict[str, dict[str, str]]:
        by_name: dict[str, dict[str, str]] = {}
        for run in runs:
            if run.env != env or not run.results:
                continue
            for name, version in run.results["machine"]["versions"].items():
                if version != "not installed":
                    by_name.setdefault(name, {})[run.python] = version
        return by_name

    def text(by_name: dict[str, dict[str, str]], names: Iterable[str]) -> str:
        parts = []
        for name in names:
            found = by_name.get(name, {})
            if len(set(found.values())) == 1:
                parts.append(f"{name} {next(iter(found.values()))}")
            elif found:
                parts.append(f"{name} " + ", ".join(f"{v} ({p})" for p, v in found.items()))
        return ", ".join(parts)

    latest = versions("latest")
    separate = versions(ASYNCACHE)
    return (
        text(latest, [n for n in latest if n != ASYNCACHE]),
        text(separate, [ASYNCACHE, "cachetools", "async-lru", "uvloop"]),
    )


def behaviour(runs: list[Run]) -> list[str]:
    """The features table of the first Python's run, asyncache's row from its own run."""
    first = next((r for r in runs if r.results and "features" in r.results["tables"]), None)
    if first is None:
        return []
    table = first.results["tables"]["features"]
    rows = [list(row) for row in table["rows"]]
    for run in runs:
        if run.python == first.python and run.env == ASYNCACHE and run.results:
            theirs = run.results["tables"].get("features", {}).get("rows", [])
            for i, row in enumerate(rows):
                for other in theirs:
                    if row[0] == other[0] == ASYNCACHE:
                        rows[i] = [f"{ASYNCACHE} †", *other[1:]]
    return [
        "",
        f"### {table['title']}, Python {first.python}",
        "",
        markdown_table(table["columns"], rows),
    ]


def render(
    runs: list[Run],
    rows: list[Row],
    command: str,
    started: datetime.datetime,
    seconds: float,
    loads: tuple[list[float] | None, list[float] | None],
    pythons: dict[str, str],
) -> str:
    asyncio_labels = loop_labels(runs, "asyncio")
    uvloop_labels = loop_labels(runs, "uvloop")
    every = asyncio_labels + uvloop_labels
    names = ", ".join(pythons)
    latest, separate = describe_versions(runs)
    rounds = next((r.results["config"]["rounds"] for r in runs if r.results), "?")

    def load(values: list[float] | None) -> str:
        return "/".join(f"{x:.2f}" for x in values) if values else "?"

    interpreters = ", ".join(
        next(
            (r.results["machine"]["python"] for r in runs if r.python == p and r.results),
            p,
        )
        for p in pythons
    )
    lines = [
        f"## Benchmarks: CPython {names}, asyncio and uvloop",
        "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC with `{command}` ({seconds / 60:.0f} min). "
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"{next((r.results['machine']['os'] for r in runs if r.results), '?')}. "
        f"Load average (1/5/15 min): {load(loads[0])} before, {load(loads[1])} after.",
        "",
        f"Interpreters: {interpreters}, each in a fresh virtual environment with the bench "
        f"extra: {latest}.",
    ]
    if separate:
        lines += [
            "",
            f"Rows marked † come from environments of their own ({separate}): asyncache "
            "requires cachetools < 6, so it is measured there, each figure a ratio to "
            "async-lru measured in the same run; these runs also time TTLCache lookups on "
            "that cachetools.",
        ]
    lines += [
        "",
        f"Each figure is the median of {rounds} interleaved rounds within one run (a ratio: "
        "the median of the per-round ratios); a range spans the Pythons, lowest to highest "
        "of those medians.",
        "",
    ]
    header = ["figure", f"asyncio ({names})"]
    if uvloop_labels:
        header.append(f"uvloop ({names})")
    header += ["target", "verdict"]
    groups: list[tuple[str, Callable[[Row], bool]]] = [
        ("wq_memo", lambda r: r.contender == "wq_memo" and r.table != "ttl_lookup"),
        (
            "The peers, and the bare call (ratios to async-lru in the same run)",
            lambda r: r.contender != "wq_memo",
        ),
        ("TTLCache lookups, by cachetools version", lambda r: r.table == "ttl_lookup"),
    ]
    for title, belongs in groups:
        body = []
        for row in rows:
            if not belongs(row):
                continue
            cells = [row.what + (" †" if row.separate else "")]
            cells += [
                span((row.values[k] for k in labels if k in row.values), row.unit)
                for labels in (
                    [asyncio_labels, uvloop_labels] if uvloop_labels else [asyncio_labels]
                )
            ]
            target = "" if row.limit is None else f"≤ {show(row.limit, row.unit)}"
            if row.stretch is not None:
                target += f" (stretch ≤ {show(row.stretch, row.unit)})"
            cells += [target, verdict(row, every)]
            body.append(cells)
        if body:
            lines += [f"### {title}", "", markdown_table(header, body, len(header) - 3), ""]
    lines += ["### Each run", ""]
    detail = [[row.what + (" †" if row.separate else "")] for row in rows]
    for cells, row in zip(detail, rows, strict=True):
        cells += [show(row.values[k], row.unit) if k in row.values else "-" for k in every]
    lines.append(markdown_table(["figure", *every], detail, len(every)))
    lines += behaviour(runs)
    for run in runs:
        if run.env == "latest" and run.loop == "asyncio":
            for name, text in run.results.get("sections", {}).items():
                lines += ["", f"### {name}, Python {run.python}", "", "```", text, "```"]
    failed = [f"{r.label} ({r.env})" for r in runs if r.status]
    if failed:
        lines += ["", f"**Runs that failed: {', '.join(failed)}** (see runs/*/log.txt)"]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    load_before = load_average()
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores; load average {load_before} before")
    pythons = {v: p for v in args.pythons if (p := find_python(v)) is not None}
    for v in args.pythons:
        print(f"Python {v}: {pythons.get(v, 'not found on this machine; skipped')}")
    if not pythons:
        print("no Python to run on")
        return 1
    if out.exists():
        shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="wq_memo-matrix-") as work:
        for version, python in pythons.items():
            for env in environments(args):
                where = Path(work, f"{env.name}-{version}")
                log = out / "runs" / f"{version}-{env.name}-install.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                print(f"Python {version}, {env.name}: installing into a fresh venv", flush=True)
                try:
                    venv_python = make_venv(python, where, env.requirements, log)
                except subprocess.CalledProcessError:
                    print(f"  install FAILED, see {log}")
                    runs.append(Run(version, env.name, "asyncio", where, status=1))
                    continue
                for loop, only in env.runs:
                    run = Run(
                        version, env.name, loop, out / "runs" / f"{version}-{env.name}-{loop}"
                    )
                    runs.append(run)
                    run_benchmarks(venv_python, run, args.quick, only, run.out / "log.txt")
                shutil.rmtree(where, ignore_errors=True)
    load_after = load_average()
    seconds = time.perf_counter() - t0
    rows = collect(runs)
    command = "python -m benchmarks.matrix" + (" --quick" if args.quick else "")
    if args.only:
        command += f" --only {' '.join(args.only)}"
    text = render(runs, rows, command, started, seconds, (load_before, load_after), pythons)
    (out / "matrix.md").write_text(text)
    first_chart = out / "runs" / f"{next(iter(pythons))}-latest-asyncio" / "growth.png"
    if first_chart.exists():
        shutil.copyfile(first_chart, out / "growth.png")
    (out / "matrix.json").write_text(
        json.dumps(
            {
                "command": command,
                "started": started.isoformat(timespec="seconds"),
                "seconds": seconds,
                "load_averages": {"before": load_before, "after": load_after},
                "pythons": pythons,
                "runs": [
                    {"python": r.python, "env": r.env, "loop": r.loop, "status": r.status}
                    for r in runs
                ],
                "rows": [r.__dict__ for r in rows],
            },
            indent=2,
        )
        + "\n"
    )
    print()
    print(text)
    print(f"load average {load_after} after; written to {out / 'matrix.md'}")
    return 1 if any(r.status for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
