"""The benchmark runs end to end at a tiny size and reports what each contender did.

Only structure and counts are checked (computations, the concurrency bound), never speed.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import cachetools
import pytest

from benchmarks import __main__ as bench
from benchmarks import bursts, matrix, refresh_ahead
from benchmarks._harness import Config, Table, Target
from benchmarks.contenders import PEERS, WQ_MEMO, Contender, Setup

TINY = Config.quick_run().scaled(
    rounds=1,
    batch_seconds=0.001,
    callers=200,
    keys=200,
    memory_entries=100,
    growth_sizes=(10, 100),
    growth_callers=(10, 100),
    growth_rounds=1,
    hol_slow=0.05,
    hol_fast=0.002,
    refresh_seconds=0.4,
    refresh_warm_up=0.1,
    refresh_rounds=1,
)

# The module's run of every scenario takes about 10 s of CPU: allow for a loaded machine.
pytestmark = pytest.mark.timeout(300)

MISSING_PEER = Contender(
    "no-such-peer", "wq_memo_benchmarks_no_such_module", "no-such-peer", True, PEERS[0].recipe
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    status = bench.main(["--quick", "--out", str(out)], config=TINY)
    return status, out, json.loads((out / "results.json").read_text())


def test_every_scenario_runs_and_is_saved(run: tuple[int, Path, dict[str, Any]]) -> None:
    status, out, results = run
    assert status == 0
    assert set(results["tables"]) == set(bench.SCENARIOS)
    markdown = (out / "results.md").read_text()
    for table in results["tables"].values():
        assert table["title"] in markdown
        assert table["rows"], table["title"]
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert results["command"] == "python -m benchmarks --quick"
    assert results["machine"]["cores"] >= 1
    assert "## Targets" in markdown


def test_stampede_computes_once_where_the_contender_deduplicates(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    computations = run[2]["tables"]["stampede"]["data"]["computations"]
    assert computations["wq_memo"] == [1]
    for peer in PEERS:
        if peer.name in computations:  # installed
            expected = 1 if peer.dedups else TINY.callers
            assert computations[peer.name] == [expected], peer.name


def test_miss_throughput_computes_every_key_within_the_bound(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    data = run[2]["tables"]["miss_throughput"]["data"]
    assert data["computations"]["wq_memo"] == [TINY.keys]
    assert data["peak_concurrency"]["wq_memo"] <= bursts.MISS_MAXSIZE


def test_head_of_line_keeps_wq_memo_within_its_slots(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    table = run[2]["tables"]["head_of_line"]
    assert table["data"]["peak_concurrency"]["wq_memo"] == 3
    assert [t["what"] for t in table["targets"]] == ["head-of-line, twelve quick items done"]


def test_memory_and_growth_report_every_size(run: tuple[int, Path, dict[str, Any]]) -> None:
    tables = run[2]["tables"]
    memory = tables["memory"]["data"]["bytes"]
    assert memory["filled by hand, tuple keys (dict)"] > 0
    assert memory["per entry: wq_memo (dict)"] > 0
    hits = tables["hit_growth"]["data"]["median_seconds_per_call"]
    assert set(hits["wq_memo"]) == {str(s) for s in TINY.growth_sizes}  # JSON keys are strings
    stampedes = tables["stampede_growth"]
    assert [row[0] for row in stampedes["rows"]] == ["10", "100"]
    assert all(row[-1] == "1" for row in stampedes["rows"])  # one computation each time


def test_chart_is_written_when_matplotlib_is_there(run: tuple[int, Path, dict[str, Any]]) -> None:
    _, out, results = run
    if importlib.util.find_spec("matplotlib") is None:
        assert any("matplotlib is not installed" in note for note in results["notes"])
    else:
        assert (out / "growth.png").read_bytes().startswith(b"\x89PNG")


def test_hit_path_sets_refresh_after_beside_the_plain_ttl_cache(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    table = run[2]["tables"]["hit_path"]
    names = [row[0] for row in table["rows"]]
    plain, refreshing = "wq_memo (TTLCache)", "wq_memo (TTLCache, refresh_after)"
    assert names.index(refreshing) == names.index(plain) + 1
    figures = {f["what"] for f in table["figures"]}
    assert f"hit, {refreshing} x {plain}" in figures
    assert f"hit, {refreshing}: ns more than {plain}" in figures


def test_hit_path_sets_the_ttl_function_beside_the_plain_ttl_cache(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    table = run[2]["tables"]["hit_path"]
    names = [row[0] for row in table["rows"]]
    plain, dated = "wq_memo (TTLCache)", "wq_memo (TTLCache, ttl function)"
    assert names.index(dated) == names.index(plain) + 2  # after the refresh_after row
    targets = {t["what"]: t["limit"] for t in table["targets"]}
    assert targets[f"hit, {dated} x {plain}"] == 1.3


def test_refresh_ahead_reports_every_contender(run: tuple[int, Path, dict[str, Any]]) -> None:
    table = run[2]["tables"]["refresh_ahead"]
    assert [row[0] for row in table["rows"]] == [v.name for v in refresh_ahead.VARIANTS]
    contenders = table["data"]["contenders"]
    measured = round((TINY.refresh_seconds - TINY.refresh_warm_up) * refresh_ahead.RATE)
    for name, figures in contenders.items():
        assert figures["calls"] == measured, name
        assert 0 <= figures["waited_on_live_entry"] <= figures["waited"] <= measured, name
        if name.startswith("wq_memo"):
            assert figures["duplicate_computations"] == 0, name
    assert contenders[refresh_ahead.HIT]["waited_on_live_entry"] == 0
    assert [t["what"] for t in table["targets"]] == [
        "refresh-ahead: calls that waited after warm-up",
        "refresh-ahead: calls that waited on a live entry",
        "refresh-ahead: p99 latency x every call a hit (same load)",
    ]


def _run_one_key(variant: refresh_ahead.Variant, seconds: float) -> refresh_ahead.Result:
    result = refresh_ahead.Result()
    keys = [0] * round(seconds * refresh_ahead.RATE)
    asyncio.run(refresh_ahead.run_once(variant, keys, 0.07, result))
    return result


def test_refresh_ahead_counts_the_calls_that_waited_for_an_expired_entry() -> None:
    expiring = refresh_ahead.Variant("ttl 0.1 s", refresh_ahead.wq_memo_over(0.1), ttl=0.1)
    result = _run_one_key(expiring, 0.4)
    assert result.calls == 330
    assert result.waited > 0  # the entry expired at least once after warm-up
    assert result.waited_live == 0
    assert result.computations >= 1
    assert result.info["refreshes"] == 0


def test_refresh_ahead_refreshes_without_making_callers_wait() -> None:
    refreshed = refresh_ahead.Variant(
        "refresh_after 0.1 s", refresh_ahead.wq_memo_over(1.0, refresh_after=0.1)
    )
    result = _run_one_key(refreshed, 0.4)
    assert result.waited == 0  # the first computation ended within the warm-up
    assert result.computations >= 1
    assert result.info["refreshes"] == result.computations
    assert len(result.latencies) == len(result.at_once) == result.calls


def test_a_peer_that_does_not_import_is_shown_not_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MISSING_PEER.status() == "not installed"
    monkeypatch.setattr(bursts, "contenders", lambda: [WQ_MEMO, MISSING_PEER])
    table = asyncio.run(bursts.stampede(TINY))
    rows = {row[0]: row for row in table.rows}
    assert rows["no-such-peer"][1] == "not installed"
    assert rows["wq_memo"][1] == "1"


def test_targets_say_met_or_missed() -> None:
    assert Target("x", 1.1, 1.2).met
    assert not Target("x", 1.3, 1.2).met
    assert "MISSED" in Target("x", 1.3, 1.2).describe()
    table = Table("k", "Title", ["a", "b"])
    table.add("row", 1)
    table.targets.append(Target("t", 0.5, 0.7))
    assert table.render().splitlines()[2:5] == ["| a   | b |", "|-----|--:|", "| row | 1 |"]
    assert "target: t: 0.50x (target <= 0.70x): met" in table.render()


def test_contenders_build_working_memoizers() -> None:
    async def double(x: int) -> int:
        return 2 * x

    async def check(contender: Contender) -> None:
        f = contender.wrap(double, Setup(cache="lru", size=4))
        assert [await f(1), await f(1), await f(2)] == [2, 2, 4]

    for contender in [WQ_MEMO, *PEERS]:
        if contender.status() is None:
            asyncio.run(check(contender))


def test_feature_probes_find_what_wq_memo_promises(run: tuple[int, Path, dict[str, Any]]) -> None:
    probes = run[2]["tables"]["features"]["data"]["probes"]
    wq = {feature: cells["wq_memo"] for feature, cells in probes.items()}
    assert wq == {
        "deduplication": "yes (1 computation for 10 callers)",
        "bounded concurrency": "yes (3 of 10 at once)",
        "cancellation isolation": "yes",
        "exceptions": "never cached",
        "None results": "cached",
        "event-loop change": "works, cache kept",
        "typing": "py.typed",
        "shutdown": "yes: f.queue.aclose(), worker_queue.aclose_all()",
    }
    for feature, cells in probes.items():
        assert set(cells) == {"wq_memo", *(p.name for p in PEERS)}, feature


def test_a_stretch_target_is_reported_beside_the_target() -> None:
    assert Target("m", 0.66, 0.7, stretch=0.65).describe() == (
        "m: 0.66x (target <= 0.70x, stretch <= 0.65x): met, stretch missed"
    )
    assert Target("m", 0.72, 0.7).describe() == "m: 0.72x (target <= 0.70x): MISSED by 0.02x"
    assert (
        Target("h", 0.2, 0.1, "s").describe() == "h: 0.200 s (target <= 0.100 s): MISSED by 0.100 s"
    )


def test_every_target_and_figure_is_saved_with_a_name_of_its_own(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    tables = run[2]["tables"]
    names = [f["what"] for t in tables.values() for f in [*t["targets"], *t["figures"]]]
    assert len(names) == len(set(names))
    targets = {t["what"]: t for table in tables.values() for t in table["targets"]}
    assert "hit, wq_memo (TTLCache) x hand-written (TTLCache)" in targets
    if importlib.util.find_spec("async_lru") is not None:  # a peer: only with the bench extra
        assert targets["hit, wq_memo (TTLCache) x async-lru (ttl)"]["limit"] == 0.7
        assert targets["miss throughput, wq_memo x async-lru"]["stretch"] == 0.65
    else:
        assert not any("async-lru" in what for what in targets)
    assert {"load_averages_at_start", "load_averages_at_end", "versions"} <= set(run[2]["machine"])
    assert "uvloop" in run[2]["machine"]["versions"]


def test_the_ttl_lookup_is_measured_on_the_cachetools_installed(
    run: tuple[int, Path, dict[str, Any]],
) -> None:
    data = run[2]["tables"]["ttl_lookup"]["data"]
    assert data["cachetools"] == cachetools.__version__
    assert set(data["median_seconds"]) >= {"cache[k] hit", "cache[k] miss"}


def test_a_section_whose_module_is_missing_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.SECTIONS, "nothing_here", bench.Section("no_such_benchmark"))
    text = asyncio.run(bench.run_section("nothing_here", quick=True))
    assert text == "nothing_here: skipped (benchmarks/no_such_benchmark.py is not there)"


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop not installed")
def test_runs_on_uvloop(tmp_path: Path) -> None:
    status = bench.main(
        ["--loop", "uvloop", "--only", "stampede", "--out", str(tmp_path)], config=TINY
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert status == 0
    assert results["machine"]["loop"] == "uvloop"
    assert results["tables"]["stampede"]["data"]["computations"]["wq_memo"] == [1]


DASH = "\N{EN DASH}"


def _fake_run(python: str, env: str, loop: str, ratio: float) -> matrix.Run:
    """A run as benchmarks.matrix reads it back: one table with a target and two figures."""
    versions = {"wq_memo": "0.1.0", "cachetools": "8.0.2" if env == "latest" else "5.5.2"}
    table = {
        "targets": [Target("miss, wq_memo x async-lru", ratio, 0.7, stretch=0.65).as_json()],
        "figures": [
            {"what": "miss, wq_memo: us/key", "value": 10.0, "unit": "us", "contender": "wq_memo"},
            {"what": f"miss, {env} x async-lru", "value": 1.5, "unit": "x", "contender": env},
        ],
    }
    run = matrix.Run(python, env, loop, Path("unused"))
    run.results = {
        "machine": {"python": f"CPython {python}.0", "os": "Linux", "versions": versions},
        "config": {"rounds": 9},
        "tables": {"miss_throughput": table},
    }
    return run


def test_matrix_reports_ranges_over_the_pythons_and_what_ran_apart() -> None:
    runs = [
        _fake_run("3.11", "latest", "asyncio", 0.62),
        _fake_run("3.12", "latest", "asyncio", 0.72),
        _fake_run("3.11", "latest", "uvloop", 0.60),
        _fake_run("3.11", "asyncache", "asyncio", 0.9),  # wq_memo's rows here are not taken
    ]
    rows = {row.what: row for row in matrix.collect(runs)}
    assert rows["miss, wq_memo x async-lru"].values == {
        "3.11": 0.62,
        "3.12": 0.72,
        "3.11 uvloop": 0.6,
    }
    assert rows["miss, asyncache x async-lru"].separate
    assert "miss, latest x async-lru" in rows
    assert matrix.span([0.62, 0.72], "x") == f"0.62{DASH}0.72x"
    assert matrix.span([3.0, 3.001], "us") == "3.00 us"
    labels = ["3.11", "3.12", "3.11 uvloop"]
    assert matrix.verdict(rows["miss, wq_memo x async-lru"], labels) == (
        "missed on 3.12 (0.72x); stretch 0.65x: 2 of 3"
    )
    started = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC)
    text = matrix.render(
        runs,
        list(rows.values()),
        "python -m benchmarks.matrix",
        started,
        600.0,
        ([0.5, 0.4, 0.3], [1.5, 1.4, 1.3]),
        {"3.11": "python3.11", "3.12": "python3.12"},
    )
    assert "Run on 2026-01-02 03:04 UTC with `python -m benchmarks.matrix`" in text
    assert "0.50/0.40/0.30 before, 1.50/1.40/1.30 after" in text
    assert "cachetools 8.0.2" in text
    assert f"| miss, wq_memo x async-lru | 0.62{DASH}0.72x | 0.60x | ≤ 0.70x (stretch" in text
    assert "| miss, asyncache x async-lru † | 1.50x |" in text


def test_matrix_finds_this_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    version = "{}.{}".format(*sys.version_info[:2])
    assert matrix.find_python(version) is not None
    assert matrix.find_python("2.1") is None


def test_matrix_runs_asyncache_apart_and_only_what_each_loop_needs() -> None:
    envs = {e.name: e.runs for e in matrix.environments(matrix.parse_args([]))}
    assert envs["latest"][0] == ("asyncio", None)
    assert envs["latest"][1] == ("uvloop", list(matrix.UVLOOP_SCENARIOS))
    assert [loop for loop, _ in envs["asyncache"]] == ["asyncio", "uvloop"]
    assert not any(
        "asyncache" in r for r in matrix.environments(matrix.parse_args([]))[0].requirements
    )
    only = matrix.environments(matrix.parse_args(["--only", "features", "--no-uvloop"]))
    assert [(e.name, e.runs) for e in only] == [
        ("latest", [("asyncio", ["features"])]),
        ("asyncache", [("asyncio", ["features"])]),
    ]
