"""Two functions never share entries in one async cache: names that mean the same in every
process, and a clear error where a function has none."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _queue_harness import MemoryAsyncCache

from wq_memo import worker_queue
from wq_memo._naming import shared_name
from wq_memo.backends import CallKey


def make_scaler(factor: int, cache: MemoryAsyncCache, name: str | None = None) -> Any:
    async def scale(x: int) -> int:
        return x * factor

    return worker_queue(cache=cache, name=name)(scale)


def test_a_function_made_by_a_factory_needs_a_name_for_an_async_cache() -> None:
    with pytest.raises(TypeError, match=r"needs name=.*make_scaler.<locals>.scale"):
        make_scaler(2, MemoryAsyncCache())


def test_partials_and_callable_objects_need_a_name_for_an_async_cache() -> None:
    async def add(x: int, y: int) -> int:
        return x + y

    class Service:
        async def __call__(self, x: int) -> int:
            return x

    with pytest.raises(TypeError, match=r"needs name=.*no qualified name"):
        worker_queue(cache=MemoryAsyncCache())(functools.partial(add, 1))
    with pytest.raises(TypeError, match=r"needs name=.*no qualified name"):
        worker_queue(cache=MemoryAsyncCache())(Service())
    worker_queue(cache=MemoryAsyncCache(), name="add-one")(functools.partial(add, 1))


async def test_functions_a_factory_made_with_names_of_their_own_never_share() -> None:
    cache = MemoryAsyncCache()
    double = make_scaler(2, cache, name="scale-by-2")
    triple = make_scaler(3, cache, name="scale-by-3")
    assert await double(10) == 20
    assert await triple(10) == 30
    assert {k.function for k in cache.data if isinstance(k, CallKey)} == {
        "scale-by-2",
        "scale-by-3",
    }


async def test_two_live_functions_claiming_one_name_on_one_cache_are_refused() -> None:
    cache = MemoryAsyncCache()
    first = make_scaler(2, cache, name="scale")
    with pytest.raises(TypeError, match="two functions use the name 'scale'"):
        make_scaler(3, cache, name="scale")
    make_scaler(3, MemoryAsyncCache(), name="scale")  # another cache: fine
    assert await first(1) == 2


def test_a_name_is_free_again_once_its_function_is_gone() -> None:
    cache = MemoryAsyncCache()
    make_scaler(2, cache, name="scale")  # dropped at once
    import gc

    gc.collect()
    make_scaler(3, cache, name="scale")


def test_a_name_must_be_a_non_empty_string() -> None:
    async def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match="non-empty str"):
        worker_queue(cache=MemoryAsyncCache(), name="")(f)


async def module_level(x: int) -> int:
    return x


def test_a_module_level_function_is_named_by_module_and_qualified_name() -> None:
    assert shared_name(module_level, None) == f"{__name__}.module_level"


SCRIPT = textwrap.dedent(
    """
    import multiprocessing
    import sys

    from wq_memo._naming import shared_name


    async def report(x):
        return x


    def child(queue):
        queue.put(shared_name(report, None))


    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,))
        proc.start()
        print(shared_name(report, None), queue.get(timeout=30))
        proc.join(30)
    """
)


@pytest.mark.timeout(60)
def test_a_script_and_the_processes_it_spawns_use_the_same_name(tmp_path: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, check=True
    )
    parent, child = out.stdout.split()
    assert parent == child == "__main__.report"


@pytest.mark.timeout(60)
def test_python_dash_m_uses_the_name_an_import_would_give(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "service.py").write_text(SCRIPT)
    env_path = str(tmp_path)
    run_as_module = subprocess.run(
        [sys.executable, "-m", "pkg.service"],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
        cwd=env_path,
    )
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pkg.service as s; from wq_memo._naming import shared_name; "
            "print(shared_name(s.report, None))",
        ],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
        cwd=env_path,
    )
    parent, child = run_as_module.stdout.split()
    assert parent == child == imported.stdout.strip() == "pkg.service.report"
