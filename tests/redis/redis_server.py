"""A redis-server of a test's own, on a spare port, started and ended by the test."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own on a spare 127.0.0.1 port, ended by its pid."""

    def __init__(self, binary: str, *extra: str) -> None:
        self.binary = binary
        self.extra = extra
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        self._launch()
        self._await_ping()

    def start_unchecked(self) -> None:
        """Start a server that may refuse PING (one with requirepass); wait until it listens."""
        self._launch()
        for _ in range(100):  # up to about 10 s
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert self.proc is not None
                try:
                    self.proc.wait(0.1)  # returns early only if the server exited
                    break
                except subprocess.TimeoutExpired:
                    pass
        self.stop()
        raise RuntimeError(f"redis-server did not come up on port {self.port}")

    def _launch(self) -> None:
        args = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        args += self.extra
        self.proc = subprocess.Popen(
            [self.binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _await_ping(self) -> None:
        import redis

        assert self.proc is not None
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        try:
            for _ in range(100):  # up to about 10 s
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    try:
                        self.proc.wait(0.1)  # returns early only if the server exited
                        break
                    except subprocess.TimeoutExpired:
                        pass
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not come up on port {self.port}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
