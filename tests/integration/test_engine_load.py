"""Engine-reported load through a real mitmdump: the addon reads the engines' /metrics and
routes around traffic that never passed through it.

Stand-ins: the simulated vLLM engines and LMCache controller (sim/), whose /metrics follow
vLLM's (vllm:num_requests_waiting counts requests whose prefill has not started).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from sim.cluster import start_cluster
from sim.proxy import mitmdump, write_config
from tests.integration.helpers import route


def _route_some(proxy_url: str, n: int) -> list[str]:
    out = []
    with httpx.Client(base_url=proxy_url, timeout=30) as client:
        for i in range(n):
            # Short, distinct prompts: no cache match, so only the load decides.
            r = client.post("/v1/completions", json={
                "model": "sim-model", "prompt": [20_000 + 100 * i + j for j in range(100)],
                "max_tokens": 2})
            assert r.status_code == 200, r.text
            info = route(r)
            assert info["reason"] == "least_inflight", info
            out.append(info["endpoint"])
    return out


def test_traffic_that_bypasses_the_proxy_is_routed_around(tmp_path: Path) -> None:
    with start_cluster(2, time_scale=1.0) as cluster:
        busy = cluster.engine_urls["vllm-instance-1"]

        def flood(i: int) -> None:  # another gateway's requests, straight to one engine
            # Distinct 4000-token prompts: ~0.14 s of prefill each, queued one after another.
            httpx.post(f"{busy}/v1/completions", json={
                "model": "sim-model", "prompt": [1000 + i] * 4000, "max_tokens": 2},
                timeout=60)

        for metrics in ("50ms", "0s"):
            cfg = write_config(tmp_path / f"c{metrics}.yaml", cluster.engine_urls,
                               cluster.controller_url, engine_metrics_interval=metrics)
            run_dir = tmp_path / f"run-{metrics}"
            run_dir.mkdir()
            with mitmdump(cfg, run_dir) as proxy:
                # New prompts each round (a cached one would not queue).
                threads = [threading.Thread(target=flood, args=(10 * len(metrics) + i,))
                           for i in range(8)]
                for t in threads:
                    t.start()
                time.sleep(0.2)  # queued there, and scraped
                chosen = _route_some(proxy.url, 4)
                for t in threads:
                    t.join()
            if metrics == "50ms":
                # The proxy saw the other gateway's queue: nothing of its own goes there.
                assert chosen == ["vllm-instance-2"] * 4, chosen
            else:
                # Without engine metrics it cannot know, and spreads its requests evenly.
                assert "vllm-instance-1" in chosen, chosen
