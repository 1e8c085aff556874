"""Run a real `mitmdump` process with the addon in front of a cluster, as a user does (used by
the integration tests and the demo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sim.cluster import stop_process

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "addon" / "kvcache.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
_LISTEN = re.compile(r"listening at (?:http://)?([\d.]+):(\d+)")


@dataclass
class Proxy:
    url: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() each line was read

    def log(self) -> str:
        return "\n".join(self.lines)


def route_info(header: str) -> dict[str, str]:
    """The addon's `x-kvcache-route` header as a dict (the endpoint id under "endpoint")."""
    head, *rest = header.split("; ")
    out = {"endpoint": head}
    for part in rest:
        k, _, v = part.partition("=")
        out[k] = v
    return out


def write_config(path: Path, engines: dict[str, str], controller: str, **extra: object) -> Path:
    cfg: dict[str, object] = {
        "lmcache_endpoint": controller,
        "endpoints": [{"id": k, "url": v} for k, v in engines.items()],
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, confdir: Path, listen: str = "127.0.0.1:0",
            program: str = "mitmdump", addon: Path = ADDON) -> list[str]:
    """The command line a user runs: the addon, reverse mode, lazy upstream connections."""
    first = yaml.safe_load(config.read_text())["endpoints"][0]["url"]
    return [str(MITMDUMP.with_name(program)), "--set", f"confdir={confdir}", "-s", str(addon),
            "--mode", f"reverse:{first}@{listen}", "--set", "connection_strategy=lazy",
            "--set", f"kvcache_config={config}"]


@contextmanager
def mitmdump(config: Path, tmp: Path, *args: str, timeout: float = 20,
             addon: Path = ADDON) -> Iterator[Proxy]:
    """Start mitmdump in reverse mode on a free port; yield its URL; stop it on exit.
    ``addon`` is the script to load (default: this checkout's addon/kvcache.py)."""
    cmd = [*command(config, tmp / "mitmconf", addon=addon), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp, env=env)
    proxy = Proxy("", proc)
    found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            proxy.times.append(time.monotonic())
            proxy.lines.append(line.rstrip("\n"))
            m = _LISTEN.search(line)
            if m and not proxy.url:
                proxy.url = f"http://{m.group(1)}:{m.group(2)}"
                found.set()

    # Everything after Popen is inside the try: a Ctrl-C while mitmdump starts up must
    # stop it too, not only one that comes while it serves.
    try:
        threading.Thread(target=pump, daemon=True).start()
        end = time.monotonic() + timeout
        while not found.is_set():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("mitmdump did not start:\n" + proxy.log())
            found.wait(0.05)
        yield proxy
    finally:
        stop_process(proc, 10)


@contextmanager
def mitmdumps(config: Path, tmp: Path, n: int, *args: str, timeout: float = 30,
              addon: Path = ADDON) -> Iterator[list[Proxy]]:
    """`n` mitmdump replicas with the same config, each on its own port and confdir (what a
    user runs behind an L4 load balancer); all stopped on exit."""
    with ExitStack() as stack:
        proxies = []
        for i in range(n):
            d = tmp / f"replica-{i}"
            d.mkdir(parents=True, exist_ok=True)
            proxies.append(stack.enter_context(
                mitmdump(config, d, *args, timeout=timeout, addon=addon)))
        yield proxies
