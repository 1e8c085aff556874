"""A real mitmdump with the addon in front of the simulated vLLM engines and LMCache
controller (sim/: stand-ins that follow the contracts in ../shared/facts/)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sim.cluster import Cluster, serve_app, start_controller
from sim.proxy import mitmdump, write_config
from tests.integration.helpers import SYSTEM, chat_body, route


def wait_for_holder(cluster: Cluster, body: dict, timeout: float = 5.0) -> str:
    """The instance the controller reports for a conversation, once its chunks arrived."""
    engine = next(iter(cluster.engine_urls.values()))
    tokens = httpx.post(f"{engine}/tokenize", json={
        "model": body["model"], "messages": body["messages"]}).json()["tokens"]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        layout = httpx.post(f"{cluster.controller_url}/lookup",
                            json={"tokens": tokens}).json()["layout_info"]
        if layout:
            return max(layout, key=lambda k: layout[k][1])
        time.sleep(0.05)
    raise AssertionError("the controller never learned who holds the conversation")


def test_second_turn_routes_to_holder_on_first_sight(cluster: Cluster, tmp: Path) -> None:
    # No tokenizing on the request path: the second turn can only be routed through the
    # first turn's tokens (conversation prefix), which the background pool stored.
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms", tokenize_on_request_path=False)
    with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
        turn1 = [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": "What does clause 7 say?"}]
        r1 = client.post("/v1/chat/completions", json=chat_body(turn1))
        assert r1.status_code == 200, r1.text
        assert route(r1)["why"] == "no-tokens"  # never seen, no tokenizing on the path
        holder = wait_for_holder(cluster, chat_body(turn1))
        answer = r1.json()["choices"][0]["message"]["content"]
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "And clause 9?"}]
        time.sleep(0.3)  # the background tokenize of turn 1 (a few ms) has finished
        r2 = client.post("/v1/chat/completions", json=chat_body(turn2))
        info = route(r2)
        assert r2.status_code == 200
        assert (info["endpoint"], info["reason"], info["tokens"]) == (
            holder, "cache-hit", "prefix"), info
        assert int(info["matched"].split("/")[0]) >= 256


def test_first_sight_tokenized_on_path_and_repeat_hits(cluster: Cluster, tmp: Path) -> None:
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms")
    with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
        body = {"model": "sim-model", "prompt": SYSTEM, "max_tokens": 4}
        r1 = client.post("/v1/completions", json=body)
        assert route(r1)["tokens"] == "tokenized" and route(r1)["why"] == "no-match"
        holder = route(r1)["endpoint"]
        deadline = time.monotonic() + 5
        while True:
            r2 = client.post("/v1/completions", json=body)
            if route(r2)["reason"] == "cache-hit" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert route(r2)["reason"] == "cache-hit" and route(r2)["endpoint"] == holder


def test_unknown_instance_ids_fall_back(cluster: Cluster, tmp: Path) -> None:
    # Endpoint ids that are not the controller's instance ids: nothing is routed by the
    # controller's answer (a repeat may still follow the proxy's own memory of where it sent
    # it, as local-hit), and every route says why.
    engines = {f"other-{i}": url for i, url in enumerate(cluster.engine_urls.values())}
    cfg = write_config(tmp / "c.yaml", engines, cluster.controller_url,
                       lookup_routing_timeout="500ms")
    with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
        body = {"model": "sim-model", "prompt": SYSTEM, "max_tokens": 4}
        client.post("/v1/completions", json=body)
        deadline = time.monotonic() + 5
        while True:
            info = route(client.post("/v1/completions", json=body))
            if info["why"] == "unknown-instance" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert info["why"] == "unknown-instance" and info["endpoint"] in engines
        assert "[kvcache]" in proxy.log() and "instance-not-an-endpoint" in proxy.log()


def test_slow_controller_does_not_delay_past_budget(cluster: Cluster, tmp: Path) -> None:
    httpx.post(f"{cluster.controller_url}/sim/faults", json={"latency_ms": 5000})
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="200ms")
    with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
        body = {"model": "sim-model", "prompt": SYSTEM, "max_tokens": 2}
        t0 = time.monotonic()
        r = client.post("/v1/completions", json=body)
        elapsed = time.monotonic() - t0
        info = route(r)
        assert r.status_code == 200 and info["why"] == "lookup-timeout"
        assert float(info["route_ms"]) < 200 + 100  # the budget, plus scheduling slack
        assert elapsed < 2.0  # not the controller's 5 s


def test_controller_stopped_falls_back(tmp: Path) -> None:
    from sim.cluster import start_cluster

    with start_cluster(2, time_scale=0.05) as cluster:
        with start_controller() as dead_url:
            pass  # started and stopped: nothing listens there any more
        cfg = write_config(tmp / "c.yaml", cluster.engine_urls, dead_url,
                           lookup_routing_timeout="300ms")
        with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as c:
            for _ in range(3):
                r = c.post("/v1/completions",
                           json={"model": "sim-model", "prompt": SYSTEM, "max_tokens": 2})
                assert r.status_code == 200
                assert route(r)["why"] == "lookup-unreachable"
            # One log line for the outage, not one per request.
            assert proxy.log().count("LMCache lookup failed") == 1


def test_sse_is_streamed_chunk_by_chunk(tmp: Path) -> None:
    from sim.cluster import start_cluster

    # time_scale 2: ~24 ms between tokens, so buffering would be plain to see.
    with start_cluster(1, time_scale=2.0) as cluster:
        cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url)
        with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=20) as c:
            body = chat_body([{"role": "user", "content": "stream please"}], stream=True,
                             max_tokens=20)
            arrivals: list[float] = []
            chunks: list[bytes] = []
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                assert "x-kvcache-route" in r.headers
                for chunk in r.iter_raw():
                    arrivals.append(time.monotonic())
                    chunks.append(chunk)
            text = b"".join(chunks).decode()
            assert text.rstrip().endswith("data: [DONE]")
            assert text.count("data: ") >= 21
            assert len(arrivals) >= 10  # many reads, not one buffered body
            assert arrivals[-1] - arrivals[0] > 0.2


def _echo_app() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"sha256": hashlib.sha256(body).hexdigest(), "length": len(body),
                             "content_type": request.headers.get("content-type", "")})
    return Starlette(routes=[Route("/{path:path}", echo, methods=["POST", "GET"])])


def test_bodies_are_forwarded_byte_for_byte(cluster: Cluster, tmp: Path) -> None:
    with serve_app(_echo_app()) as echo:
        # The echo server is the only endpoint: whatever the addon does, the body it
        # receives must be the client's, byte for byte.
        cfg = write_config(tmp / "c.yaml", {"echo": echo}, cluster.controller_url,
                           vllm_endpoint=next(iter(cluster.engine_urls.values())),
                           lookup_routing_timeout="300ms")
        with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=30) as c:
            big_prompt = "word " * (1024 * 1024)  # 5 MB
            big = ('{"model": "sim-model",   "prompt": "' + big_prompt + '"}').encode()
            invalid = b'{"model": "sim-model", "prompt": "unterminated'
            odd = b'{"model":"sim-model","prompt":"caf\\u00e9 \xc3\xa9"  }\n'
            for body in (big, invalid, odd):
                r = c.post("/v1/completions", content=body,
                           headers={"content-type": "application/json"})
                assert r.status_code == 200
                assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                assert r.json()["length"] == len(body)
