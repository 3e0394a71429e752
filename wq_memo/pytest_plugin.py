"""The pytest plugin that comes with wq_memo; it does nothing until a test suite asks for it.

- the fixture ``wq_memo_isolated``: before the test, every memoized function is cleared (its
  cache emptied, its cache_info() counts set to zero, as cache_clear() does); after it, every
  queue started on the test's event loop, whoever started it (a wider fixture too), and every
  queue the test started is closed at once: what it has in flight (computations, items in
  line, background refreshes) is cancelled and stores nothing, its callers get
  ShutdownTimeout, its tasks are awaited (up to the queue's finish_timeout), and the queue
  starts again at its next call;
- the ini option ``wq_memo_isolate = true``: every test gets that fixture, first of all;
- the marker ``@pytest.mark.wq_memo_disabled``: the test (its fixtures included) runs with
  caching switched off in the whole process, as with WQ_MEMO_DISABLE=1.

With pytest-asyncio, the fixture runs on the event loop the test runs on (of the scope its
asyncio marker's loop_scope, else the ini option asyncio_default_test_loop_scope, gives it), so
it ends what is under way on that loop; a queue the test left on another loop that has stopped
is forgotten, and its computations, should that loop run again, store nothing, while a queue
started before the test on such a loop is left alone. Without pytest-asyncio, it runs its
asynchronous steps with asyncio.run().
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, Final

import pytest

from . import _memo_registry, _queue_registry
from ._switch import SWITCH

__all__ = ("wq_memo_isolated",)

FIXTURE = "wq_memo_isolated"
MARKER = "wq_memo_disabled"
INI = "wq_memo_isolate"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI,
        "give every test the wq_memo_isolated fixture: empty caches and counts before it, "
        "what its queues have in flight cancelled after it",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: run the test with wq_memo's caching switched off (no cache, no "
        "deduplication; calls counted as bypassed)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getini(INI):
        return
    for item in items:
        names = getattr(item, "fixturenames", None)
        if isinstance(names, list) and FIXTURE not in names:
            names.insert(0, FIXTURE)  # set up first, torn down last


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, None]:
    off = item.get_closest_marker(MARKER) is not None
    if off:
        SWITCH.force(+1)
    try:
        yield
    finally:
        if off:
            SWITCH.force(-1)


async def _before() -> int:
    mark = _queue_registry.mark()
    await _memo_registry.reset_all()
    return mark


def _has_async_caches() -> bool:
    return any(not _memo_registry.is_synchronous(m) for m in _memo_registry.everything())


@pytest.fixture
def wq_memo_isolated(request: pytest.FixtureRequest) -> Iterator[None]:
    """Empty every memoized function's cache and counts; after the test, cancel what the queues
    on its event loop, and those it started, have in flight (see the module's docstring)."""
    if request.config.pluginmanager.has_plugin("asyncio"):
        request.getfixturevalue(_on_the_loop(_loop_scope(request)))
        yield
        return
    mark = _queue_registry.mark()
    if _has_async_caches():
        asyncio.run(_memo_registry.reset_all())
    else:
        _memo_registry.reset_all_now()
    yield
    asyncio.run(_queue_registry.aclose_at_once(mark))


LOOP_SCOPES: Final = ("function", "class", "module", "package", "session")
"""The scopes of pytest-asyncio's event loops."""


def _on_the_loop(scope: str) -> str:
    """The name of the fixture that isolates a test on the event loop of scope."""
    return f"_wq_memo_isolated_on_the_{scope}_loop"


def _loop_scope(request: pytest.FixtureRequest) -> str:
    """The scope of the event loop pytest-asyncio runs the test on, decided as pytest-asyncio
    decides it: the asyncio marker's loop_scope, else the ini option
    asyncio_default_test_loop_scope. "function" for a test it does not run."""
    marker = request.node.get_closest_marker("asyncio")
    if marker is None:
        return "function"
    scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope")
    if scope is None:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # a pytest-asyncio that has no such option: function scope
            scope = None
    known = _asyncio_fixtures_by_scope or {}
    return scope if isinstance(scope, str) and _on_the_loop(scope) in known else "function"


def _asyncio_fixtures() -> dict[str, Any]:
    """An isolating fixture for each scope of event loop (only the function scope's where
    pytest-asyncio cannot choose a fixture's loop), by name."""
    import pytest_asyncio

    fixture: Any = pytest_asyncio.fixture  # its signature varies with the version
    scoped = "loop_scope" in inspect.signature(fixture).parameters

    def isolating(scope: str) -> Any:
        async def isolate() -> AsyncIterator[None]:
            mark = await _before()
            yield
            await _queue_registry.aclose_at_once(mark)

        if not scoped:
            return fixture(isolate, name=_on_the_loop(scope))
        return fixture(isolate, name=_on_the_loop(scope), loop_scope=scope)

    return {_on_the_loop(s): isolating(s) for s in (LOOP_SCOPES if scoped else ("function",))}


_asyncio_fixtures_by_scope: dict[str, Any] | None = None
if importlib.util.find_spec("pytest_asyncio") is not None:
    # Without pytest-asyncio, wq_memo_isolated never asks for them. Each runs on the loop of
    # its scope, so that it clears and closes what a test left on the loop the test ran on.
    _asyncio_fixtures_by_scope = _asyncio_fixtures()
    globals().update(_asyncio_fixtures_by_scope)
