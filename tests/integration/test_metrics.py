"""Prometheus metrics of a real mitmdump with the addon (`metrics_listen`) in front of the
simulated cluster: the decisions it counts are the ones its responses' route headers
carry, and a taken port stops mitmdump at start-up with one line."""

from __future__ import annotations

import socket
import subprocess
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sim.cluster import Cluster
from sim.proxy import command, mitmdump, write_config
from tests.integration.helpers import SYSTEM, chat_body, route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_counted_decisions_are_the_routed_ones(cluster: Cluster, tmp: Path) -> None:
    port = free_port()
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms", metrics_listen=f"127.0.0.1:{port}")
    seen: Counter[tuple[str, str]] = Counter()
    with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as c:
        for user in range(4):
            msgs = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"question {user} " * 50}]
            for _ in range(3):
                r = c.post("/v1/chat/completions", json=chat_body(msgs))
                assert r.status_code == 200
                h = route(r)
                seen[(h["endpoint"], h["reason"])] += 1
        # Not an LLM request: load-balanced, and counted as such (why=not-llm).
        h = route(c.get("/v1/models"))
        assert h["why"] == "not-llm"
        seen[(h["endpoint"], h["reason"])] += 1
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    counted: Counter[tuple[str, str]] = Counter()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for s in families["kvcache_routing_decisions"].samples:
        if s.name.endswith("_total"):
            counted[(s.labels["endpoint"], s.labels["reason"])] += int(s.value)
    assert counted == seen and sum(seen.values()) == 13
    assert any(reason == "cache-hit" for _, reason in seen)  # repeated turns found a holder
    routed = {s.labels["endpoint"]: s.value
              for s in families["kvcache_endpoint_requests"].samples}
    assert sum(routed.values()) == 13
    hist = families["kvcache_routing_duration_seconds"]
    assert next(s.value for s in hist.samples if s.name.endswith("_count")) == 13


def test_a_taken_metrics_port_stops_mitmdump(cluster: Cluster, tmp: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                           metrics_listen=f"127.0.0.1:{port}")
        proc = subprocess.run(command(cfg, tmp / "conf", "127.0.0.1:0"), capture_output=True,
                              text=True, timeout=60, cwd=tmp)
    assert proc.returncode != 0
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "metrics_listen" in x]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]
