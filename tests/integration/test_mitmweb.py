"""mitmweb started for real with the addon in front of the simulated cluster: its own HTTP
API lists the routed flows and renders the "kvcache" content view of a decision."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx

from sim.cluster import Cluster, stop_process
from sim.proxy import command, write_config
from tests.integration.helpers import SYSTEM, chat_body, route
from tests.integration.test_metrics import free_port


def test_mitmweb_shows_the_decision_table(cluster: Cluster, tmp: Path) -> None:
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms")
    proxy_port, web_port = free_port(), free_port()
    cmd = [*command(cfg, tmp / "conf", f"127.0.0.1:{proxy_port}", "mitmweb"),
           "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1",
           "--set", "web_open_browser=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True).start()
    web = f"http://127.0.0.1:{web_port}"
    try:
        end = time.monotonic() + 30
        while not any(re.search(rf":{proxy_port}\b", line) for line in out):
            assert proc.poll() is None and time.monotonic() < end, "".join(out)
            time.sleep(0.1)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi " * 50}]
        with httpx.Client(base_url=f"http://127.0.0.1:{proxy_port}", timeout=30) as c:
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
    finally:
        stop_process(proc, 10)
