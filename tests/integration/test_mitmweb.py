"""mitmweb started for real with the addon in front of the simulated cluster: its own HTTP
API lists the routed flows and renders the "kvcache" content view of a decision."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from sim.cluster import Cluster, stop_process
from sim.proxy import command, write_config
from tests.integration.helpers import SYSTEM, chat_body, route
from tests.integration.test_metrics import free_port


@contextmanager
def mitmweb(cfg: Path, tmp: Path, *args: str) -> Iterator[tuple[str, str]]:
    """A real mitmweb with the addon: (proxy URL, web UI URL)."""
    proxy_port, web_port = free_port(), free_port()
    cmd = [*command(cfg, tmp / "conf", f"127.0.0.1:{proxy_port}", "mitmweb"),
           "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
           "--set", "web_open_browser=false", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True).start()
    try:
        end = time.monotonic() + 30
        while not any(re.search(rf":{proxy_port}\b", line) for line in out):
            assert proc.poll() is None and time.monotonic() < end, "".join(out)
            time.sleep(0.1)
        yield f"http://127.0.0.1:{proxy_port}", f"http://127.0.0.1:{web_port}"
    finally:
        stop_process(proc, 10)


def test_mitmweb_shows_the_decision_table(cluster: Cluster, tmp: Path) -> None:
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms")
    with mitmweb(cfg, tmp) as (proxy, web):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi " * 50}]
        with httpx.Client(base_url=proxy, timeout=30) as c:
            for _ in range(2):
                r = c.post("/v1/chat/completions", json=chat_body(msgs))
                assert r.status_code == 200
        last = route(r)
        flows = httpx.get(f"{web}/flows", timeout=10).json()
        routed = [f for f in flows if "kvcache" in f.get("comment", "")]
        assert len(routed) == 2
        fid = routed[-1]["id"]
        view = httpx.get(f"{web}/flows/{fid}/response/content/kvcache.json",
                         timeout=10).json()
        text = "\n".join("".join(part[1] for part in line) for line in view["lines"])
        assert view["description"] == "kvcache routing decision"
        assert f"routed to {last['endpoint']}: {last['reason']}" in text
        assert "held (view)" in text and "cost (tokens)" in text
        for eid in cluster.engine_urls:
            assert eid in text
        chosen = next(line for line in text.splitlines() if line.endswith("<- chosen"))
        assert chosen.startswith(last["endpoint"])


def test_show_calls_lists_each_lookup_with_its_exact_bytes(cluster: Cluster, tmp: Path) -> None:
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms")
    with mitmweb(cfg, tmp, "--set", "kvcache_show_calls=true") as (proxy, web):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "yo " * 40}]
        with httpx.Client(base_url=proxy, timeout=30) as c:
            r = c.post("/v1/chat/completions", json=chat_body(msgs))
            assert r.status_code == 200
        end = time.monotonic() + 10
        while True:
            flows = httpx.get(f"{web}/flows", timeout=10).json()
            calls = [f for f in flows if f.get("comment", "").startswith("kvcache call")]
            if any("/lookup" in f["comment"] for f in calls) or time.monotonic() > end:
                break
            time.sleep(0.2)
        client = next(f for f in flows if f.get("comment", "").startswith("kvcache →"))
        lookup = next(f for f in calls if "/lookup" in f["comment"])
        assert lookup["comment"].endswith(f"for flow {client['id']}")
        assert any("/tokenize" in f["comment"] for f in calls)
        sent = httpx.get(f"{web}/flows/{lookup['id']}/request/content.data", timeout=10)
        got = httpx.get(f"{web}/flows/{lookup['id']}/response/content.data", timeout=10)
        tokens = json.loads(sent.content)["tokens"]
        # The exact exchange: the request's tokens, and the controller's own answer to them.
        again = httpx.post(f"{cluster.controller_url}/lookup", json={"tokens": tokens})
        assert json.loads(got.content)["layout_info"].keys() <= again.json()["layout_info"].keys()
        assert len(tokens) > 256
        # Shown, never proxied: the client flow count is one.
        assert sum(1 for f in flows if f.get("comment", "").startswith("kvcache →")) == 1
