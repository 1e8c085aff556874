"""Run the simulators for tests and demos, in threads or subprocesses, leaving nothing behind.

Typical use::

    from sim.cluster import start_cluster

    with start_cluster(3, time_scale=0.1) as c:
        c.controller_url                 # "http://127.0.0.1:PORT"
        c.engine_urls["vllm-instance-1"] # engine base URLs keyed by instance id

    with start_cluster(2, kv_events=True) as c:
        c.kv_events_urls["vllm-instance-1"]  # "tcp://127.0.0.1:PORT": its KV cache events

Every helper is a context manager: leaving the block (normally, on an exception or on
Ctrl-C) stops the servers and joins the threads / reaps the processes it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from sim.controller import ControllerConfig
from sim.controller import create_app as create_controller_app
from sim.engine_model import DEFAULT_CAPACITY_TOKENS, CostModel
from sim.engine_server import EngineConfig
from sim.engine_server import create_app as create_engine_app
from sim.serving import ASGIApp, begin_shutdown, bind_socket, make_server, socket_url

Mode = Literal["thread", "process"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve_app_factory(
    factory: Callable[[str], ASGIApp],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    start_timeout_s: float = 10.0,
) -> Iterator[str]:
    """Serve ``factory(base_url)`` with uvicorn in a background thread; yield the base URL.

    The socket is bound before the app is built so an app can know its own URL (port 0
    picks a free port).
    """
    sock = bind_socket(host, port)
    url = socket_url(sock)
    try:
        app = factory(url)
        server = make_server(app, log_level)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn {url}", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"server for {url} exited during startup")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise TimeoutError(f"server for {url} did not start")
            time.sleep(0.005)
        try:
            yield url
        finally:
            begin_shutdown(app)
            server.should_exit = True
            thread.join(timeout=10)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout=5)
    finally:
        sock.close()


@contextlib.contextmanager
def serve_app(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> Iterator[str]:
    """Serve an already-built ASGI app in a background thread; yield its base URL."""
    with serve_app_factory(lambda _url: app, host, port, log_level=log_level) as url:
        yield url


def _set_pdeathsig() -> None:
    # Linux: the child gets SIGTERM if the parent dies without cleaning up (e.g. SIGKILL).
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def run_module(
    module: str,
    args: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    start_timeout_s: float = 30.0,
    ready_path: str = "/openapi.json",
) -> Iterator[str]:
    """Run ``python -m module --host H --port P --port-file F *args`` and yield its URL once
    it answers ``GET ready_path``; on exit SIGTERM it, then SIGKILL if it lingers."""
    with tempfile.TemporaryDirectory(prefix="sim-") as tmp:
        port_file = Path(tmp) / "url"
        cmd = [
            sys.executable,
            "-m",
            module,
            "--host",
            host,
            "--port",
            str(port),
            "--port-file",
            str(port_file),
            *args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(_REPO_ROOT), env.get("PYTHONPATH", "")] if p
        )
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
        )
        try:
            url = _wait_ready(proc, port_file, ready_path, start_timeout_s)
            yield url
        finally:
            stop_process(proc)


def _wait_ready(
    proc: subprocess.Popen[bytes], port_file: Path, ready_path: str, timeout_s: float
) -> str:
    deadline = time.monotonic() + timeout_s
    url: str | None = None
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} during startup")
            if url is None and port_file.exists():
                url = port_file.read_text().strip()
            if url is not None:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url + ready_path).status_code == 200:
                        return url
            time.sleep(0.05)
    raise TimeoutError(f"{proc.args!r} did not become ready in {timeout_s} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5) -> None:
    """Terminate, then kill if it does not end within `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def start_controller(cfg: ControllerConfig | None = None, mode: Mode = "thread") -> Iterator[str]:
    """Start a controller simulator; yield its base URL."""
    cfg = cfg or ControllerConfig()
    if mode == "thread":
        with serve_app(create_controller_app(cfg), cfg.host, 0) as url:
            yield url
        return
    args = ["--layout", cfg.layout, "--api", cfg.api, "--latency-ms", str(cfg.latency_ms)]
    args += ["--error-rate", str(cfg.error_rate), "--hash-seed", str(cfg.hash_seed)]
    args += ["--holders", cfg.holders]
    args += ["--seed", str(cfg.seed)]
    args += ["--evict"] * cfg.evict + ["--hang"] * cfg.hang + ["--garbage"] * cfg.garbage
    with run_module("sim.controller", args, cfg.host, 0, ready_path="/sim/state") as url:
        yield url


@contextlib.contextmanager
def start_engine(cfg: EngineConfig, mode: Mode = "thread") -> Iterator[str]:
    """Start one engine simulator (its ``port``/``base_url`` are replaced by the bound ones);
    yield its base URL. It registers with ``cfg.controller_url`` in the background."""
    if mode == "thread":

        def factory(url: str) -> ASGIApp:
            return create_engine_app(dataclasses.replace(cfg, base_url=url))

        with serve_app_factory(factory, cfg.host, 0) as url:
            yield url
        return
    if cfg.cost != CostModel(max_batch=cfg.cost.max_batch):
        raise ValueError("process mode only passes max_batch of the cost model")
    args = ["--instance-id", cfg.instance_id, "--model", cfg.model]
    args += ["--capacity-tokens", str(cfg.capacity_tokens), "--time-scale", str(cfg.time_scale)]
    args += ["--block-size", str(cfg.block_size), "--max-model-len", str(cfg.max_model_len)]
    args += ["--max-batch", str(cfg.cost.max_batch)]
    if cfg.controller_url:
        args += ["--controller", cfg.controller_url]
    if cfg.enable_prompt_tokens_details:
        args.append("--enable-prompt-tokens-details")
    if cfg.echo_body_sha256:
        args.append("--echo-body-sha256")
    if cfg.kv_events_port is not None:
        args += ["--kv-events", str(cfg.kv_events_port), "--kv-events-topic",
                 cfg.kv_events_topic]
    with run_module("sim.engine_server", args, cfg.host, 0, ready_path="/health") as url:
        yield url


def kv_events_url(engine_url: str) -> str | None:
    """Where a running engine simulator publishes its KV cache events (``tcp://host:port``,
    the port it bound), or None when it does not publish them."""
    state = httpx.get(f"{engine_url}/sim/state", timeout=5).json()
    kv = state.get("kv_events")
    return kv["endpoint"] if kv else None


@dataclass(frozen=True)
class Cluster:
    controller_url: str
    engine_urls: dict[str, str]
    model: str
    # instance id -> the engine's KV cache events endpoint (start_cluster(kv_events=True)).
    kv_events_urls: dict[str, str] = field(default_factory=dict)

    @property
    def instance_ids(self) -> list[str]:
        return list(self.engine_urls)

    @property
    def urls(self) -> list[str]:
        return list(self.engine_urls.values())


def wait_registered(
    controller_url: str, instance_ids: Sequence[str], timeout_s: float = 10.0
) -> None:
    """Block until the controller simulator lists every instance in ``instance_ids``."""
    deadline = time.monotonic() + timeout_s
    missing = set(instance_ids)
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                state = client.get(f"{controller_url}/sim/state").json()
                missing = set(instance_ids) - set(state["instances"])
                if not missing:
                    return
            time.sleep(0.02)
    raise TimeoutError(f"instances never registered with {controller_url}: {sorted(missing)}")


@contextlib.contextmanager
def start_cluster(
    n_engines: int,
    time_scale: float = 1.0,
    *,
    model: str = "sim-model",
    capacity_tokens: int = DEFAULT_CAPACITY_TOKENS,
    cost: CostModel | None = None,
    controller: ControllerConfig | None = None,
    engine_overrides: dict[str, object] | None = None,
    mode: Mode = "thread",
    kv_events: bool = False,
) -> Iterator[Cluster]:
    """Start a controller and ``n_engines`` engines ``vllm-instance-1..n`` registered with it.

    ``engine_overrides`` are extra ``EngineConfig`` fields applied to every engine. With
    ``kv_events`` every engine also publishes vLLM's KV cache events on a free port
    (``Cluster.kv_events_urls``). Yields once every engine is registered; stops engines
    first, then the controller.
    """
    with contextlib.ExitStack() as stack:
        controller_url = stack.enter_context(start_controller(controller, mode))
        engines: dict[str, str] = {}
        for i in range(1, n_engines + 1):
            iid = f"vllm-instance-{i}"
            cfg = EngineConfig(
                instance_id=iid,
                model=model,
                controller_url=controller_url,
                capacity_tokens=capacity_tokens,
                time_scale=time_scale,
                cost=cost if cost is not None else CostModel(),
                kv_events_port=0 if kv_events else None,
            )
            if engine_overrides:
                cfg = dataclasses.replace(cfg, **engine_overrides)  # type: ignore[arg-type]
            engines[iid] = stack.enter_context(start_engine(cfg, mode))
        wait_registered(controller_url, list(engines))
        kv_urls: dict[str, str] = {}
        if kv_events or (engine_overrides or {}).get("kv_events_port") is not None:
            for iid, url in engines.items():
                endpoint = kv_events_url(url)
                if endpoint is not None:
                    kv_urls[iid] = endpoint
        yield Cluster(controller_url=controller_url, engine_urls=engines, model=model,
                      kv_events_urls=kv_urls)
