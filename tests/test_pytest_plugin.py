"""The pytest plugin: inactive unless asked for; the fixture, the ini option and the marker.

Each test runs pytest on a small suite in a subprocess (pytester), so that what the inner run
does to wq_memo's registries cannot reach this one.
"""

from __future__ import annotations

import importlib.metadata
import re
import textwrap
import tomllib
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0
STRICT = ("--strict-markers", "--strict-config", "-p", "no:cacheprovider", "-W", "error")


def entry_point_installed() -> bool:
    return any(
        ep.name == "wq_memo" and ep.value == "wq_memo.pytest_plugin"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> RunSuite:
    # This tree's wq_memo, whatever the environment has installed.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("WQ_MEMO_DISABLE", raising=False)
    return RunSuite(pytester)


class RunSuite:
    """Runs pytest on the files given, loading the plugin by name if it is not installed."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester

    def __call__(self, *args: str, ini: str = "", **files: str) -> pytest.RunResult:
        ini = textwrap.dedent(ini)
        if "no:asyncio" not in args:
            ini += "\nasyncio_default_fixture_loop_scope = function\n"
        self.pytester.makeini("[pytest]\n" + ini)
        self.pytester.makepyfile(**{name: textwrap.dedent(src) for name, src in files.items()})
        load = () if entry_point_installed() else ("-p", "wq_memo.pytest_plugin")
        return self.pytester.runpytest_subprocess(*STRICT, *load, *args, timeout=TIMEOUT)


COUNTED = textwrap.dedent("""
    import asyncio
    import pytest
    from wq_memo import worker_queue

    computed = []

    @worker_queue(cache={}, finish_timeout=0.5)
    async def f(x):
        computed.append(x)
        return x
""")


def test_the_package_declares_the_entry_point() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"wq_memo": "wq_memo.pytest_plugin"}


def test_installing_wq_memo_changes_nothing_in_a_suite_that_does_not_ask(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not entry_point_installed():
        pytest.skip("wq_memo is installed without its pytest11 entry point: pip install -e .")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        test_suite=COUNTED
        + textwrap.dedent("""
            def test_the_plugin_is_loaded(request):
                assert request.config.pluginmanager.has_plugin("wq_memo")
                assert "wq_memo_isolated" not in request.fixturenames

            async def test_first():
                assert await f(1) == 1

            async def test_second_still_sees_the_first_ones_cache():
                assert f.cache == {(1,): 1}
                assert await f(1) == 1
                assert computed == [1]
                assert f.cache_info().hits == 1
                assert f.queue.running  # left started on the first test's loop
            """)
    )
    result = pytester.runpytest_subprocess(*STRICT, timeout=TIMEOUT)
    result.assert_outcomes(passed=3)
    plan = pytester.runpytest_subprocess(*STRICT, "--setup-plan", timeout=TIMEOUT)
    assert "wq_memo_isolated" not in plan.stdout.str()


def test_the_ini_option_isolates_every_test(run: RunSuite) -> None:
    result = run(
        ini="""
            asyncio_mode = auto
            wq_memo_isolate = true
        """,
        test_suite=COUNTED
        + textwrap.dedent("""
            gate = None

            async def test_first():
                global gate
                gate = asyncio.Event()

                @worker_queue(cache=None, finish_timeout=0.1, name="stuck")
                async def stuck():
                    await gate.wait()

                assert await f(1) == 1 and await f(1) == 1
                assert f.cache_info().hits == 1
                asyncio.create_task(stuck())  # left running: the plugin must close its queue
                await asyncio.sleep(0)

            async def test_second_starts_clean():
                assert f.cache == {}
                assert tuple(f.cache_info()[:3]) == (0, 0, 0)
                assert not f.queue.running  # closed after the first test
                assert await f(1) == 1
                assert computed == [1, 1]

            def test_a_synchronous_test_is_isolated_too():
                assert f.cache == {}
                assert asyncio.run(f(2)) == 2
        """),
    )
    result.assert_outcomes(passed=3)


def test_the_fixture_alone_with_an_async_cache_in_strict_mode(run: RunSuite) -> None:
    result = run(
        test_suite="""
            import asyncio
            import pytest
            from wq_memo import worker_queue, MISSING

            class MemoryCache:
                def __init__(self):
                    self.data = {}
                async def get(self, key):
                    await asyncio.sleep(0)
                    return self.data.get(key, MISSING)
                async def set(self, key, value, ttl=None):
                    self.data[key] = value
                async def delete(self, key):
                    return self.data.pop(key, MISSING) is not MISSING
                async def clear(self):
                    await asyncio.sleep(0)
                    self.data.clear()
                async def aclose(self):
                    pass

            cache = MemoryCache()

            @worker_queue(cache=cache, name="g")
            async def g(x):
                return x

            @pytest.mark.asyncio
            async def test_fills_the_cache():
                assert await g(1) == 1
                assert cache.data

            @pytest.mark.asyncio
            async def test_without_the_fixture_the_entry_stays():
                assert cache.data
                assert g.cache_info().misses == 1

            @pytest.mark.asyncio
            async def test_with_the_fixture_it_is_gone(wq_memo_isolated):
                assert not cache.data
                assert g.cache_info().misses == 0
        """,
    )
    result.assert_outcomes(passed=3)


def test_the_marker_switches_caching_off_for_one_test(run: RunSuite) -> None:
    result = run(
        ini="asyncio_mode = auto\n",
        test_suite=COUNTED
        + textwrap.dedent("""
            @pytest.fixture
            async def primed():
                await f(1)  # in the marked test's setup: bypassed as well

            @pytest.mark.wq_memo_disabled
            async def test_marked(primed):
                await f(1)
                await f(1)
                assert computed == [1, 1, 1]
                assert f.cache == {}
                assert f.cache_info().bypassed == 3

            async def test_unmarked_caches_again():
                await f(1)
                await f(1)
                assert computed == [1, 1, 1, 1]
                assert f.cache_info().hits == 1
        """),
    )
    result.assert_outcomes(passed=2)


def test_without_pytest_asyncio_the_fixture_runs_its_own_loop(run: RunSuite) -> None:
    result = run(
        "-p",
        "no:asyncio",
        ini="wq_memo_isolate = true\n",
        test_suite=COUNTED
        + textwrap.dedent("""
            def test_first():
                assert asyncio.run(f(1)) == 1
                assert f.queue.running

            def test_second():
                assert f.cache == {}
                assert not f.queue.running
        """),
    )
    result.assert_outcomes(passed=2)


def test_an_unknown_marker_or_option_is_still_refused(run: RunSuite) -> None:
    result = run(
        ini="wq_memo_isolat = true\n",
        test_suite="""
            def test_nothing():
                pass
        """,
    )
    assert result.ret != 0
    assert re.search(r"Unknown config option: wq_memo_isolat\b", result.stderr.str())


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Testing with wq_memo", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's testing section has no Python snippet"
    return match.group(1)


def test_the_readme_snippet_runs(run: RunSuite) -> None:
    result = run(ini="asyncio_mode = auto\n", test_readme=readme_snippet())
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 2, result.stdout.str()
    result.assert_outcomes(passed=outcomes["passed"])


LEFT_RUNNING = textwrap.dedent("""
    import asyncio
    import pytest
    from wq_memo import ShutdownTimeout, worker_queue

    started, gate = asyncio.Event(), asyncio.Event()
    left = []

    @worker_queue(cache={}, finish_timeout=0.2)
    async def f(x):
        started.set()
        await gate.wait()
        return "from the first test"

    async def test_leaves_a_computation_running():
        left.append(asyncio.create_task(f(1)))
        async with asyncio.timeout(10):
            await started.wait()

    async def test_the_next_one_never_sees_its_value():
        # Closed with the first test, on the loop it ran on.
        assert left[0].done()
        assert isinstance(left[0].exception(), ShutdownTimeout)
        gate.set()
        assert f.cache == {}
        assert await f(2) == "from the first test"
        assert f.cache == {(2,): "from the first test"}
""")


@pytest.mark.parametrize("scope", ["module", "session"])
@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_isolation_holds_with_a_wider_event_loop(run: RunSuite, mode: str, scope: str) -> None:
    """A computation a test leaves running on a module- or session-scoped event loop never
    stores into the cache that the next test's isolation emptied."""
    if mode == "strict":
        ini = "asyncio_mode = strict\n"
        marked = f"pytestmark = pytest.mark.asyncio(loop_scope={scope!r})\n"
    else:
        ini = f"asyncio_mode = auto\nasyncio_default_test_loop_scope = {scope}\n"
        marked = ""
    result = run(
        ini=ini + "wq_memo_isolate = true\n",
        test_suite=LEFT_RUNNING + marked,
        test_other=LEFT_RUNNING.replace("async def test_", "async def test_again_") + marked,
    )
    result.assert_outcomes(passed=4)


def test_the_metrics_never_go_down_between_isolated_tests(run: RunSuite) -> None:
    result = run(
        ini="asyncio_mode = auto\nwq_memo_isolate = true\n",
        test_suite="""
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
            from wq_memo import disabled, worker_queue
            from wq_memo.metrics import enable_opentelemetry

            reader = InMemoryMetricReader()
            enable_opentelemetry(meter_provider=MeterProvider(metric_readers=[reader]))

            def calls():
                data = reader.get_metrics_data()
                return {
                    point.attributes["outcome"]: point.value
                    for resource in data.resource_metrics
                    for scope in resource.scope_metrics
                    for metric in scope.metrics
                    if metric.name == "wq_memo.calls"
                    for point in metric.data.data_points
                    if point.attributes["function"] == "counted"
                }

            @worker_queue(cache={}, name="counted")
            async def f(x):
                return x

            async def test_first():
                for _ in range(5):
                    await f(1)
                with disabled():
                    await f(1)
                assert f.cache_info()[:3] == (4, 1, 0)
                assert calls() == {
                    "hit": 4, "miss": 1, "joined": 0, "refresh": 0, "bypassed": 1
                }

            async def test_second():
                assert f.cache_info()[:3] == (0, 0, 0)  # isolated
                assert calls() == {  # a counter never goes down
                    "hit": 4, "miss": 1, "joined": 0, "refresh": 0, "bypassed": 1
                }
                await f(1)
                assert calls()["miss"] == 2
        """,
    )
    result.assert_outcomes(passed=2)


PRESTARTED = textwrap.dedent("""
    import asyncio
    import pytest
    import pytest_asyncio
    from wq_memo import MISSING, ShutdownTimeout, worker_queue

    WAIT = 5
    pytestmark = pytest.mark.asyncio(loop_scope=SCOPE)

    source = {"queued": "the first test's data"}
    started, gate = asyncio.Event(), asyncio.Event()
    cancelled, left = [], []

    @worker_queue(maxsize=1, cache={})
    async def f(x):
        if x == "slow":
            started.set()
            try:
                await gate.wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
        return source.get(x, x)

    now = [0.0]
    refresh_started, refresh_gate, refresh_ended = asyncio.Event(), asyncio.Event(), asyncio.Event()

    @worker_queue(cache={}, refresh_after=5, timer=lambda: now[0])
    async def g(x):
        if now[0]:  # a refresh
            refresh_started.set()
            try:
                await refresh_gate.wait()
            finally:
                refresh_ended.set()
            raise RuntimeError("the refresh failed")
        return x

    @pytest_asyncio.fixture(loop_scope=SCOPE, scope=SCOPE)
    async def app():
        # Warms the app up: f's and g's queues are started before any test.
        assert await f("warm") == "warm" and await g("warm") == "warm"
        assert f.queue.running and g.queue.running
        yield
        async with asyncio.timeout(WAIT):
            assert await f("warm") == "warm"  # still works once the tests are over

    async def leave_slow_running():
        left.append(asyncio.create_task(f("slow")))
        async with asyncio.timeout(WAIT):
            await started.wait()
        assert f.queue.computing == 1
""")


def prestarted(scope: str, tests: str) -> str:
    return PRESTARTED.replace("SCOPE", repr(scope)) + textwrap.dedent(tests)


@pytest.mark.parametrize("scope", ["module", "session"])
def test_isolation_stores_nothing_from_a_queue_started_before_the_test(
    run: RunSuite, scope: str
) -> None:
    """A computation a test leaves running, and an item it leaves in line, on a queue a wider
    fixture started, store nothing into the next test's cache and count nothing there."""
    tests = """
        async def test_leaves_work_running_and_in_line(app, wq_memo_isolated):
            await leave_slow_running()
            left.append(asyncio.create_task(f("queued")))
            async with asyncio.timeout(WAIT):
                while not f.queue.waiting:
                    await asyncio.sleep(0)

        async def test_the_next_one_sees_none_of_it(app, wq_memo_isolated):
            source["queued"] = "the second test's data"
            gate.set()  # the first test's computation would end, and the item in line start
            async with asyncio.timeout(WAIT):
                assert await f("probe") == "probe"  # in line after them, were they still there
            assert f.cache_peek("queued") is MISSING, f.cache_info()
            assert f.cache_info()[:3] == (0, 1, 0)
            assert f.cache == {("probe",): "probe"}
    """
    run(test_suite=prestarted(scope, tests)).assert_outcomes(passed=2)


def test_isolation_ends_the_tasks_of_a_queue_started_before_the_test(run: RunSuite) -> None:
    """What a test leaves running on a queue a wider fixture started is cancelled and awaited
    when the test ends: its callers get ShutdownTimeout, and no slot stays taken."""
    tests = """
        async def test_leaves_work_running(app, wq_memo_isolated):
            await leave_slow_running()

        async def test_the_next_one_finds_it_ended(app, wq_memo_isolated):
            assert cancelled == ["slow"]
            assert (f.queue.computing, f.queue.waiting) == (0, 0)
            assert left[0].done()
            assert isinstance(left[0].exception(), ShutdownTimeout)
    """
    run(test_suite=prestarted("module", tests)).assert_outcomes(passed=2)


def test_isolation_ends_a_background_refresh_of_a_queue_started_before_the_test(
    run: RunSuite,
) -> None:
    """A background refresh a test starts on a queue a wider fixture started never fails, nor
    counts, in the next test."""
    tests = """
        async def test_starts_a_refresh(app, wq_memo_isolated):
            assert await g("k") == "k"
            now[0] = 10  # the entry is due for a refresh
            assert await g("k") == "k"  # served, and refreshed in the background
            async with asyncio.timeout(WAIT):
                await refresh_started.wait()
            assert g.cache_info().refreshes == 1

        async def test_the_next_one_counts_none_of_it(app, wq_memo_isolated):
            assert g.cache_info()[:3] == (0, 0, 0)
            refresh_gate.set()  # the refresh, still running, would fail now
            async with asyncio.timeout(WAIT):
                await refresh_ended.wait()
            assert g.cache_info().refresh_failures == 0, g.cache_info()
            assert g.cache_info().refreshes == 0
    """
    run(test_suite=prestarted("module", tests)).assert_outcomes(passed=2)


def test_a_queue_started_before_the_test_keeps_working_after_it(run: RunSuite) -> None:
    """The function the module fixture warmed up still computes in the next test (the first
    test left its only slot taken), and in the fixture's teardown."""
    tests = """
        async def test_leaves_its_only_slot_taken(app, wq_memo_isolated):
            await leave_slow_running()

        async def test_the_next_one_computes(app, wq_memo_isolated):
            async with asyncio.timeout(WAIT):
                assert await f("x") == "x"
            assert f.queue.running
            assert f.cache_info()[:3] == (0, 1, 0)
            assert await f("x") == "x"
            assert f.cache_info()[:3] == (1, 1, 0)
    """
    run(test_suite=prestarted("module", tests)).assert_outcomes(passed=2)
