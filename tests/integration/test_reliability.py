"""Health as a real mitmdump sees it (simulated cluster): a client that hangs up mid-routing
is not an upstream failure; an endpoint that refuses connections is ejected on its first
refusal, so at most the requests already on their way to it fail."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from sim.cluster import Cluster
from sim.proxy import mitmdump, write_config
from tests.integration.helpers import route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_hang_ups_during_routing_mark_nothing_down(cluster: Cluster, tmp: Path) -> None:
    httpx.post(f"{cluster.controller_url}/sim/faults", json={"hang": True})
    cfg = write_config(tmp / "c.yaml", cluster.engine_urls, cluster.controller_url,
                       lookup_routing_timeout="500ms")
    host, port = "127.0.0.1", 0
    body = ('{"model": "sim-model", "prompt": [' + ",".join(str(i) for i in range(600))
            + '], "max_tokens": 1}').encode()
    try:
        with mitmdump(cfg, tmp) as proxy:
            host, port = proxy.url.removeprefix("http://").split(":")
            for _ in range(10):  # routing waits on the hanging controller; the client leaves
                with socket.create_connection((host, int(port))) as s:
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Type: application/json\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)
                    time.sleep(0.05)
            time.sleep(1.0)  # the routing steps finish and the flows end
            log = proxy.log()
            assert "ejected" not in log and "refused" not in log, log
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                stats = client.get("/health")  # both endpoints still take requests
                assert stats.status_code == 200
    finally:
        httpx.post(f"{cluster.controller_url}/sim/faults", json={"hang": False}, timeout=5)


def test_a_refusing_endpoint_is_ejected_on_its_first_refusal(cluster: Cluster,
                                                            tmp: Path) -> None:
    engines = dict(cluster.engine_urls)
    engines["dead-engine"] = f"http://127.0.0.1:{free_port()}"
    cfg = write_config(tmp / "c.yaml", engines, cluster.controller_url,
                       load_balancing="round_robin")
    with mitmdump(cfg, tmp) as proxy, httpx.Client(base_url=proxy.url, timeout=10) as client:
        statuses, targets = [], []
        for _ in range(30):  # balanced in turn over the three endpoints
            r = client.get("/v1/models")
            statuses.append(r.status_code)
            targets.append(route(r)["endpoint"] if "x-kvcache-route" in r.headers else "")
        # The first turn of the dead engine got a 502; then it was out of rotation.
        assert statuses.count(502) == 1, (statuses, targets)
        assert "dead-engine" not in targets[statuses.index(502) + 1:], targets
        log = proxy.log()
        assert "endpoint dead-engine refused a connection" in log, log
        assert "ejected for 10 s" in log
        assert "Traceback" not in log
