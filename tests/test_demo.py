"""The demo runs, and its numbers add up: one service call per distinct key when memoized."""

from __future__ import annotations

import io

import pytest

from wq_memo import demo as demo_module


async def test_demo_fetches_each_key_once_and_reports_it() -> None:
    out = io.StringIO()
    summary = await demo_module.demo(
        requests=400, distinct=20, latency=0.002, capacity=10, maxsize=4, out=out
    )
    plain, first, again = summary.runs
    assert [r.label for r in summary.runs] == ["plain", "@worker_queue", "@worker_queue, again"]
    assert [r.requests for r in summary.runs] == [400, 400, 400]
    assert plain.service_calls == 400
    assert first.service_calls == 20
    assert again.service_calls == 0
    info = summary.cache_info
    assert info.misses == 20
    assert info.hits + info.misses + info.joined == 800
    assert info.currsize == 20
    assert summary.same_answers

    text = out.getvalue()
    assert "\r" not in text  # not a terminal: whole lines only
    assert "400 requests at once over 20 distinct keys" in text
    assert f"fetch.cache_info() = {info}" in text
    assert "same answers as the plain run: yes" in text
    summary_rows = [line.split() for line in text.splitlines() if line.startswith("  plain   ")]
    assert summary_rows[-1][:3] == ["plain", "400", "400"]


def test_demo_command_line_runs(capsys: pytest.CaptureFixture[str]) -> None:
    demo_module.main(["--requests", "200", "--keys", "10", "--latency-ms", "1"])
    text = capsys.readouterr().out
    assert "200 requests at once over 10 distinct keys" in text
    assert "misses=10," in text
    assert "same answers as the plain run: yes" in text


def test_progress_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = demo_module.Progress("plain", 10, out)
    progress.done = 5
    progress.show()
    progress.done = 10
    progress.finish()
    text = out.getvalue()
    assert text.startswith("\r  plain")
    assert "5/10 requests answered" in text
    assert text.endswith("s\n")
    assert text.count("\n") == 1
