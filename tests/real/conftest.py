"""The real tier: a real LMCache 0.5.6 controller (own venv) fed by sim/lmcache_worker.py.

Skipped unless KVCACHE_REAL=1. With KVCACHE_REAL=1 a failed install or a controller that
does not start FAILS the run: a CI job that asked for the real tier must not go green on
skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sim.lmcache_worker import WorkerShim  # noqa: E402

SCRIPT = ROOT / "scripts" / "real" / "lmcache.sh"
REAL = os.environ.get("KVCACHE_REAL") == "1"
SKIP_REASON = (
    "real tier off: set KVCACHE_REAL=1 to run it (installs lmcache==0.5.6 into its own venv "
    "at $KVCACHE_REAL_HOME/lmcache-venv, ~2 min and ~1.9 GB the first time)"
)
HASHSEED = os.environ.get("KVCACHE_REAL_HASHSEED", "0")
LOCATION = "LocalCPUBackend"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REAL:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def _script(*args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> str:
    proc = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        pytest.fail(f"{SCRIPT.name} {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return proc.stdout


@pytest.fixture(scope="module")
def real_vllm_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three real vLLM CPU servers (started once, in parallel, for the one module that uses
    them, and stopped after it so they do not sit on memory and CPU next to the other
    real tiers), with
    VLLM_SERVER_DEV_MODE=1 (/reset_prefix_cache) and --enable-scale-out (the render endpoint
    vllm-router's cache_aware calls), for the peer-router tier (test_real_peers.py), each
    also publishing its KV cache events (``--kv-events-config``, ZMQ bound on its own
    ``tcp://*:PORT``; read by the addon's kv-events row only, ignored by the others).
    A ``bench.real_peers.Fleet``: ``engines`` (id -> URL) and ``kv_events`` (id ->
    ``tcp://127.0.0.1:PORT``).
    test_real_vllm.py keeps its own two, as before: its check that a stream has as many SSE
    events through the proxy as direct depends on timing (vLLM merges deltas its reader has
    not taken yet) and failed under load both on these and on its own servers.
    A failed install or start FAILS (KVCACHE_REAL=1 asked for the tier), never skips."""
    from bench import real_peers

    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        error = ""
        try:
            fleet = stack.enter_context(
                real_peers.started_fleet(tmp_path_factory.mktemp("vllm-logs")))
        except real_peers.vllm_real.SetupError as e:
            error = str(e)
        if error:
            pytest.fail(f"real vLLM setup failed: {error}", pytrace=False)
        print(f"\n[real_vllm] three servers up in {time.monotonic() - t0:.0f} s: "
              + ", ".join(fleet.engines.values()) + "; KV events on "
              + ", ".join(fleet.kv_events.values()), file=sys.stderr)
        yield fleet


@pytest.fixture(scope="module")
def real_vllm_servers(real_vllm_fleet: Any) -> list[str]:
    """The URLs of ``real_vllm_fleet``'s three servers (in ``bench.real_peers.IDS`` order)."""
    return list(real_vllm_fleet.engines.values())


@pytest.fixture(scope="session")
def lmcache_python() -> str:
    """The lmcache venv's python, installing the venv on first use (fails, never skips)."""
    _script("install")
    info = dict(
        line.split("=", 1) for line in _script("info").splitlines() if "=" in line
    )
    return info["PYTHON"]


@dataclass(frozen=True)
class RealController:
    url: str
    pull: str
    reply: str
    log: Path


@contextlib.contextmanager
def real_controller(state_dir: Path) -> Iterator[RealController]:
    """A controller of its own (own ports, own state dir), stopped on exit."""
    env = {"KVCACHE_REAL_STATE": str(state_dir), "KVCACHE_REAL_HASHSEED": HASHSEED}
    out = _script("start", env=env, timeout=180)
    kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        yield RealController(
            url=kv["URL"],
            pull=f"127.0.0.1:{kv['PULL_PORT']}",
            reply=f"127.0.0.1:{kv['REPLY_PORT']}",
            log=Path(kv["LOG"]),
        )
    finally:
        _script("stop", env=env, timeout=60)


@pytest.fixture(scope="module")
def controller(lmcache_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    RealController
]:
    # One per module: a stalled worker wedges the controller's socket to it for good.
    with real_controller(tmp_path_factory.mktemp("lmcache-run")) as c:
        yield c


@pytest.fixture(scope="module")
def shim(
    lmcache_python: str, controller: RealController, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerShim]:
    err = tmp_path_factory.mktemp("shim") / "shim.stderr"
    with WorkerShim(lmcache_python, controller.pull, controller.reply, hashseed=HASHSEED,
                    stderr_path=err) as s:
        yield s


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fresh_tokens(n: int) -> list[int]:
    """Tokens no other test uses, so chunk hashes never collide across tests."""
    base = uuid.uuid4().int % 1_000_000 * 1000 + 10_000
    return list(range(base, base + n))


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` until truthy: admit/evict go over a PUSH socket with no ack."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}: last {last!r}")


def key_count(url: str, instance_id: str) -> int:
    r = httpx.get(f"{url}/controller/workers", params={"instance_id": instance_id}, timeout=5)
    if r.status_code != 200:
        return -1
    return sum(int(w.get("key_count", 0)) for w in r.json()["workers"])


def settle(url: str, shim: WorkerShim, instance_id: str) -> None:
    """Wait until the controller has applied every admit/evict the shim sent."""
    want = sum(len(v) for v in shim.held(instance_id).values())
    wait_until(lambda: key_count(url, instance_id) == want, what=f"{instance_id} keys == {want}")


# --- the MP coordinator (LMCache's second control plane) -----------------------------------


@dataclass(frozen=True)
class RealCoordinator:
    url: str
    chunk_size: int
    log: Path


@contextlib.contextmanager
def real_coordinator(state_dir: Path) -> Iterator[RealCoordinator]:
    """An MP coordinator of its own (own port, own state dir), stopped on exit."""
    env = {"KVCACHE_REAL_STATE": str(state_dir)}
    out = _script("coordinator-start", env=env, timeout=180)
    kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        yield RealCoordinator(url=kv["URL"], chunk_size=int(kv["CHUNK_SIZE"]),
                              log=Path(kv["LOG"]))
    finally:
        _script("coordinator-stop", env=env, timeout=60)


@pytest.fixture(scope="module")
def coordinator(
    lmcache_python: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealCoordinator]:
    """One real coordinator per test module (fails, never skips, with KVCACHE_REAL=1)."""
    with real_coordinator(tmp_path_factory.mktemp("coordinator-run")) as c:
        yield c


@pytest.fixture(scope="module")
def feeder(
    lmcache_python: str, coordinator: RealCoordinator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """scripts/real/coordinator_feed.py: MP-server stand-ins publishing LMCache's own cache
    events to ``coordinator`` and serving the DELETE /cache/objects it forwards."""
    import importlib.util

    path = ROOT / "scripts" / "real" / "coordinator_feed.py"
    spec = importlib.util.spec_from_file_location("coordinator_feed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err = tmp_path_factory.mktemp("feeder") / "feeder.stderr"
    try:
        f = module.CoordinatorFeeder(lmcache_python, coordinator.url,
                                     chunk_size=coordinator.chunk_size, stderr_path=err)
    except module.FeederError as e:
        pytest.fail(f"coordinator feeder did not start: {e}\n{err.read_text()[-2000:]}",
                    pytrace=False)
    with f:
        yield f


@dataclass
class KVEventsServer:
    """A real vLLM server publishing its KV cache events (``--kv-events-config``)."""

    url: str
    port: int
    events_port: int
    # How the subscriber reaches the publisher: True when the SUBSCRIBER binds
    # tcp://127.0.0.1:events_port and vLLM connects to it (vLLM connects to a plain
    # tcp://host:port endpoint); False when vLLM binds tcp://*:events_port and the
    # subscriber connects (vLLM binds wildcard endpoints only).
    subscriber_binds: bool
    log_path: Path
    server: Any = None  # vllm_real.Server

    @property
    def events_url(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"


class KVEventsServers:
    """Servers with KV events, and a restart of one on the same ports (its publisher's
    sequence starts again from 0, its cache empty)."""

    TOPIC = "kv-events"
    ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # POST /reset_prefix_cache

    def __init__(self, vllm_real: Any, log_dir: Path, n: int) -> None:
        self.vllm_real = vllm_real
        self.model = vllm_real.make_model()
        self.n = n
        from bench.real_peers import event_port

        # Events ports below the ephemeral range (event_port): vLLM binds its publisher only
        # once its engine is up, and again after every restart on the same port.
        ports: list[int] = []
        while len(ports) < n:
            if (p := event_port()) not in ports:
                ports.append(p)
        self.servers = [
            KVEventsServer(url="", port=vllm_real.free_port(), events_port=ports[i],
                           subscriber_binds=bool(i % 2), log_path=log_dir / f"vllm-kv-{i}.log")
            for i in range(n)]

    def _args(self, s: KVEventsServer) -> list[str]:
        host = "127.0.0.1" if s.subscriber_binds else "*"
        cfg = {"enable_kv_cache_events": True, "publisher": "zmq",
               "endpoint": f"tcp://{host}:{s.events_port}", "topic": self.TOPIC}
        return ["--kv-events-config", json.dumps(cfg)]

    def launch(self, i: int) -> None:
        s = self.servers[i]
        s.server = self.vllm_real.launch(self.model, s.port, s.log_path,
                                         cpus=self.vllm_real.cpu_share(i, self.n),
                                         extra_env=self.ENV, extra_args=self._args(s))
        s.url = s.server.url

    def wait(self, idx: list[int] | None = None, timeout: float = 300.0) -> None:
        picked = [self.servers[i].server for i in (idx if idx is not None else range(self.n))]
        self.vllm_real.wait_healthy(picked, timeout)

    def stop(self, i: int) -> None:
        if self.servers[i].server is not None:
            self.vllm_real.stop(self.servers[i].server)
            self.servers[i].server = None

    def restart(self, i: int) -> None:
        self.stop(i)
        self.launch(i)
        self.wait([i])


@pytest.fixture(scope="module")
def kv_events_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KVEventsServers]:
    """Two real vLLM CPU servers publishing KV cache events over ZMQ, one per way of
    connecting (server 0: vLLM binds, we connect; server 1: we bind, vLLM connects), with
    VLLM_SERVER_DEV_MODE=1. Module scope, stopped after it. Fails (never skips) on a
    failed install or start."""
    from bench import real_peers

    vllm_real = real_peers.vllm_real
    error = ""
    group: KVEventsServers | None = None
    try:
        vllm_real.install()
        group = KVEventsServers(vllm_real, tmp_path_factory.mktemp("vllm-kv-logs"), 2)
        for i in range(group.n):
            group.launch(i)
        group.wait()
    except vllm_real.SetupError as e:
        error = str(e)
    try:
        if error:
            pytest.fail(f"real vLLM (kv events) setup failed: {error}", pytrace=False)
        assert group is not None
        yield group
    finally:
        if group is not None:
            for i in range(group.n):
                group.stop(i)
