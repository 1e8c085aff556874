"""End-to-end: engines report admitted/evicted chunks, the controller's /lookup follows; the
cluster helpers clean up threads and processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from sim.cluster import serve_app, start_cluster
from sim.controller import ControllerConfig
from sim.controller import create_app as create_controller_app

# One client for the module: a new httpx client per call costs ~30 ms of TLS setup.
http = httpx.Client(timeout=10)

ROOT = Path(__file__).resolve().parents[2]


def eventually(check: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """Poll ``check`` until it returns a truthy value (engine reports are asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def layout(ctl: str, tokens: list[int]) -> dict[str, Any]:
    r = http.post(f"{ctl}/lookup", json={"tokens": tokens})
    r.raise_for_status()
    return r.json()["layout_info"]


def test_admitted_chunks_reach_lookup_and_eviction_removes_them() -> None:
    # 2048 tokens of cache per engine: two more 1000-token prompts push the first one out.
    with start_cluster(2, time_scale=0.01, capacity_tokens=2048) as c:
        e1, e2 = c.urls
        prompt = list(range(1000, 2000))
        r = http.post(f"{e1}/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
        info = eventually(lambda: layout(c.controller_url, prompt))
        assert info == {"vllm-instance-1": ["LocalCPUBackend", 768]}
        assert info["vllm-instance-1"][1] % 256 == 0

        # The other engine serving the same prompt shows up as a second holder.
        http.post(f"{e2}/v1/completions", json={"prompt": prompt[:600], "max_tokens": 2})
        info = eventually(lambda: len(layout(c.controller_url, prompt)) == 2 or None)
        assert layout(c.controller_url, prompt)["vllm-instance-2"] == ["LocalCPUBackend", 512]

        for k in (1, 2):
            other = list(range(10_000 * k, 10_000 * k + 1000))
            http.post(f"{e1}/v1/completions", json={"prompt": other, "max_tokens": 2})
        gone = eventually(lambda: "vllm-instance-1" not in layout(c.controller_url, prompt))
        assert gone, layout(c.controller_url, prompt)
        assert layout(c.controller_url, prompt) == {"vllm-instance-2": ["LocalCPUBackend", 512]}


def test_chat_history_lookup_matches_tokenize() -> None:
    with start_cluster(1, time_scale=0.0) as c:
        (e1,) = c.urls
        messages = [{"role": "user", "content": "word " * 700}]
        http.post(f"{e1}/v1/chat/completions", json={"model": c.model, "messages": messages})
        tokens = http.post(f"{e1}/tokenize", json={"model": c.model, "messages": messages}).json()[
            "tokens"
        ]
        info = eventually(lambda: layout(c.controller_url, tokens))
        matched = info["vllm-instance-1"][1]
        assert matched == (len(tokens) // 256) * 256 > 0


def test_threads_are_joined_on_exit() -> None:
    before = set(threading.enumerate())
    with start_cluster(2, time_scale=0.0) as c:
        assert len(c.engine_urls) == 2
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []
    with pytest.raises(httpx.ConnectError):
        http.get(f"{c.urls[0]}/health")


def test_serve_app_stops_even_with_a_hung_request() -> None:
    before = set(threading.enumerate())
    answers: list[int] = []

    def call(url: str) -> None:
        answers.append(httpx.post(f"{url}/lookup", json={"tokens": [1]}, timeout=30).status_code)

    with serve_app(create_controller_app(ControllerConfig(hang=True))) as url:
        stuck = threading.Thread(target=call, args=(url,))
        stuck.start()
        time.sleep(0.2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 1.0
    stuck.join(timeout=5)
    # The hung call is released with a clean 503 rather than cancelled mid-flight.
    assert answers == [503]
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()] == []


def test_process_mode_cluster() -> None:
    with start_cluster(1, time_scale=0.0, mode="process") as c:
        (e1,) = c.urls
        prompt = list(range(3000, 3600))
        assert http.post(f"{e1}/v1/completions", json={"prompt": prompt}).status_code == 200
        info = eventually(lambda: layout(c.controller_url, prompt))
        assert info == {"vllm-instance-1": ["LocalCPUBackend", 512]}
    for url in [c.controller_url, *c.urls]:
        with pytest.raises(httpx.ConnectError):
            http.get(f"{url}/health", timeout=1)


def test_ctrl_c_leaves_no_process_behind(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            """
            import signal, time
            from sim.cluster import start_cluster
            # A shell without job control starts background jobs with SIGINT ignored;
            # restore what an interactive terminal gives so Ctrl-C means KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with start_cluster(1, time_scale=0.0, mode="process") as c:
                print(" ".join([c.controller_url, *c.urls]), flush=True)
                time.sleep(60)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        urls = proc.stdout.readline().split()
        assert len(urls) == 2
        for url in urls:
            assert http.get(f"{url}/openapi.json").status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            http.get(f"{url}/openapi.json", timeout=1)
