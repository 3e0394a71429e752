"""The public API: each package's ``__all__`` is exactly what it exports."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import wq_memo
from wq_memo import QueueShutDown, ShutdownTimeout, WorkerQueue

PACKAGES = ["wq_memo", "wq_memo.backends"]


def public_attributes(module: types.ModuleType) -> set[str]:
    """Names a user sees in the module: not private, not a submodule, not a dunder."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name not in {"annotations"}  # from __future__ import annotations
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_a_tuple_of_unique_names(package: str) -> None:
    module = importlib.import_module(package)
    assert isinstance(module.__all__, tuple)
    assert all(isinstance(name, str) for name in module.__all__)
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_exactly_the_public_attributes(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.__all__ names {name!r}, which is missing"
    assert set(module.__all__) == public_attributes(module)


@pytest.mark.parametrize("package", PACKAGES)
def test_star_import_gives_exactly_all(package: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)
    namespace.pop("__builtins__")
    module = importlib.import_module(package)
    assert set(namespace) == set(module.__all__)


def test_the_queue_api_of_issue_2_is_exported() -> None:
    assert {"WorkerQueue", "QueueShutDown", "ShutdownTimeout"} <= set(wq_memo.__all__)
    assert isinstance(wq_memo.__version__, str)
    assert issubclass(ShutdownTimeout, TimeoutError)
    assert issubclass(QueueShutDown, Exception)
    parameters = list(inspect.signature(WorkerQueue).parameters)
    assert parameters == ["worker", "cache_get", "cache_set", "maxsize", "finish_timeout"]
    assert inspect.iscoroutinefunction(WorkerQueue.require)
    assert inspect.iscoroutinefunction(WorkerQueue.aclose)
    assert isinstance(inspect.getattr_static(WorkerQueue, "aclose_all"), classmethod)
    assert isinstance(inspect.getattr_static(WorkerQueue, "running"), property)
    assert inspect.iscoroutinefunction(WorkerQueue.__aenter__)
    assert inspect.iscoroutinefunction(WorkerQueue.__aexit__)
