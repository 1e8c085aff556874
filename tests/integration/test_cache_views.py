"""``cache_view: kv_events``: a real mitmdump with the addon learns what each simulated vLLM
engine caches from the engines' own KV cache events (ZMQ), with no LMCache controller (its
``lmcache_endpoint`` is a dead port)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sim.cluster import Cluster, start_cluster
from sim.demo import Workload, run_once, wait_kv_events_connected
from sim.proxy import Proxy, mitmdump, write_config
from sim.redis_server import free_port
from tests.integration.helpers import SYSTEM, chat_body, route


@pytest.fixture
def kv_cluster() -> Iterator[Cluster]:
    with start_cluster(2, time_scale=0.05, kv_events=True) as c:
        yield c


def kv_config(path: Path, cluster: Cluster, **extra: object) -> Path:
    return write_config(
        path, cluster.engine_urls, f"http://127.0.0.1:{free_port()}",  # nothing there
        cache_view="kv_events", lookup_routing_timeout="500ms",
        endpoints=[{"id": iid, "url": url, "kv_events_endpoint": cluster.kv_events_urls[iid]}
                   for iid, url in cluster.engine_urls.items()],
        **extra)


def matched(info: dict[str, str]) -> int:
    return int(info.get("matched", "0/0").split("/")[0])


@pytest.fixture
def proxy(kv_cluster: Cluster, tmp: Path, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    extra = getattr(request, "param", {})
    with mitmdump(kv_config(tmp / "c.yaml", kv_cluster, **extra), tmp) as p:
        wait_kv_events_connected(p, kv_cluster.instance_ids)
        yield p


def test_second_turn_goes_where_the_events_say(kv_cluster: Cluster, proxy: Proxy) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        turn1 = [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": "What does clause 7 say?"}]
        r1 = client.post("/v1/chat/completions", json=chat_body(turn1))
        assert r1.status_code == 200, r1.text
        first = route(r1)
        assert first["why"] == "no-match", first  # no engine has published anything yet
        answer = r1.json()["choices"][0]["message"]["content"]
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "And clause 9?"}]
        r2 = client.post("/v1/chat/completions", json=chat_body(turn2))
        assert r2.status_code == 200, r2.text
        info = route(r2)
        assert (info["endpoint"], info["reason"]) == (first["endpoint"], "cache-hit"), info
        # Block-granular (16 tokens), not the controller's 256-token chunks.
        assert matched(info) >= 800 and matched(info) % 16 == 0, info
    assert "by their vLLM KV cache events" in proxy.log()


# The proxy's own memory of where it sent what is off: the events alone decide.
@pytest.mark.parametrize("proxy", [{"routing_track_inflight": False,
                                    "routing_recent_tokens": 0}], indirect=True)
def test_reset_prefix_cache_stops_the_claim(kv_cluster: Cluster, proxy: Proxy) -> None:
    body = {"model": kv_cluster.model, "prompt": SYSTEM, "max_tokens": 4}
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        r1 = client.post("/v1/completions", json=body)
        holder = route(r1)["endpoint"]
        r2 = client.post("/v1/completions", json=body)
        info = route(r2)
        assert (info["endpoint"], info["reason"]) == (holder, "cache-hit"), info
        assert matched(info) > 0
        # vLLM's reset route on the holder: it publishes AllBlocksCleared.
        assert httpx.post(f"{kv_cluster.engine_urls[holder]}/reset_prefix_cache"
                          ).status_code == 200
        time.sleep(0.3)  # the batch crosses one loopback ZMQ connection
        r3 = client.post("/v1/completions", json=body)
        info = route(r3)
        assert info["reason"] != "cache-hit" and matched(info) == 0, info
        assert info["why"] == "no-match", info


def test_demo_with_kv_events_beats_routing_off(tmp_path: Path) -> None:
    w = Workload(users=6, rounds=3, context_words=600, question_words=100, answer_tokens=16,
                 think_s=0.3)
    args = argparse.Namespace(engines=3, time_scale=1.0, capacity_tokens=20_000,
                              cache_view="kv_events")
    off = run_once(args, w, tmp_path, routing=False)
    on = run_once(args, w, tmp_path, routing=True)
    assert off.errors == on.errors == 0 and off.requests == on.requests == 18
    assert on.hit_ratio > off.hit_ratio + 0.1, (on.hit_ratio, off.hit_ratio)
    assert on.reasons["cache-hit"] >= 10
    cfg = (tmp_path / "config-on.yaml").read_text()
    assert "cache_view: kv_events" in cfg and "kv_events_endpoint: tcp://" in cfg
