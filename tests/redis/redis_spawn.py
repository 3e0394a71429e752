"""Spawned processes for the multi-process tests, always ended (by pid) when a test is over."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from typing import Any

CTX = multiprocessing.get_context("spawn")


class Procs:
    """Spawned processes that are always ended (by pid) when the test is over."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.messages: Any = CTX.Queue()

    def start(self, target: Any, *args: Any) -> Any:
        proc = CTX.Process(target=target, args=(*args, self.messages), daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def expect(self, kind: str, count: int, timeout: float = 20.0) -> list[tuple[Any, ...]]:
        """Return count messages of kind, failing early if a process dies with an error."""
        got: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                message = self.messages.get(timeout=0.1)
            except queue.Empty:
                crashed = [p.exitcode for p in self.procs if p.exitcode not in (None, 0, -9)]
                assert not crashed, f"a process failed with exit code {crashed}"
                assert time.monotonic() < deadline, f"waited {timeout} s for {kind!r}: {got}"
                continue
            assert message[0] == kind, message
            got.append(message)
        return got

    def end(self) -> None:
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
        self.messages.close()
        self.messages.join_thread()
