"""The batch-loading benchmark runs at its quick size and wq_memo fetches each user once.

Only counts are checked, never speed.
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import __main__ as bench
from benchmarks import batching

pytestmark = pytest.mark.timeout(120)


def test_the_batching_benchmark_reports_every_contender() -> None:
    text = asyncio.run(batching.measure(quick=True))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "|" in line}
    wq = next(line for name, line in rows.items() if name.startswith("wq_memo batch"))
    cells = [cell.strip() for cell in wq.strip("|").split("|")]
    work = batching.Work.of(True)
    assert cells[1] == "1"  # every user of the burst in one call: max_batch is 100
    assert cells[2] == str(work.users)  # each user fetched once
    assert any(name.startswith("wq_memo, one @worker_queue call per key") for name in rows)
    assert len(rows) == 2 + 6  # the header, its rule and six contenders


def test_the_batching_benchmark_is_a_section_of_the_suite() -> None:
    assert bench.SECTIONS["batching"].module == "batching"
    assert not bench.SECTIONS["batching"].needs_redis
