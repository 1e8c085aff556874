"""The mitmproxy layer: options, start-up errors, hooks and what a flow shows afterwards.

Uses mitmproxy.test (taddons, tflow); the controller and tokenizer are httpx mock transports
that answer with the real contracts' shapes.
"""

import json
import logging
from pathlib import Path

import httpx
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addon import kvcache
from addon.body import OFF_LOOP_BYTES
from addon.lmcache import AsyncLMCache
from addon.router import Decision
from addon.vllm import AsyncTokenizer

CONFIG = """
lmcache_endpoint: http://controller.test:9000
lookup_routing_timeout: 500ms
background: {workers: 1, queue_size: 4}
endpoints:
  - {id: vllm-instance-1, url: "http://127.0.0.1:8001"}
  - {id: vllm-instance-2, url: "https://10.9.9.9:8443"}
"""


def write(tmp_path: Path, text: str = CONFIG) -> str:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return str(p)


def chat_flow(n_words: int = 400, stream: bool = False) -> http.HTTPFlow:
    body = json.dumps({"model": "m", "stream": stream, "messages": [
        {"role": "user", "content": " ".join(["word"] * n_words)}]}).encode()
    f = tflow.tflow()
    f.request = tutils.treq(method=b"POST", path=b"/v1/chat/completions", content=body,
                            headers=((b"content-type", b"application/json"),))
    return f


def install(addon: kvcache.KVCache, lookup: httpx.MockTransport,
            tokenize: httpx.MockTransport) -> None:
    assert addon.router is not None
    addon.router.lmcache = AsyncLMCache("http://controller.test:9000", transport=lookup)
    addon.router.tokenizer = AsyncTokenizer("http://engine.test", transport=tokenize)


def tokens_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"count": 600, "max_model_len": 2048,
                                     "tokens": list(range(600)), "token_strs": None})


def holder(inst: str, n: int) -> httpx.MockTransport:
    return httpx.MockTransport(lambda r: httpx.Response(200, json={
        "event_id": "Lookup1", "layout_info": {inst: ["LocalCPUBackend", n]}}))


async def test_routes_to_holder_and_leaves_the_decision_visible(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        install(a, holder("vllm-instance-2", 512), httpx.MockTransport(tokens_ok))
        f = chat_flow()
        raw = f.request.raw_content
        await a.request(f)
        assert (f.request.scheme, f.request.host, f.request.port) == ("https", "10.9.9.9", 8443)
        assert f.request.raw_content == raw  # byte for byte
        assert f.marked and "vllm-instance-2" in f.comment and "512/600" in f.comment
        meta = f.metadata["kvcache"]
        assert meta["reason"] == "cache-hit" and meta["matched_tokens"] == 512
        json.dumps(meta)  # plain values only
        f.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),))
        a.responseheaders(f)
        assert callable(f.response.stream)  # streamed, watching for the first body byte
        assert a.router is not None
        assert a.router.index.pending_tokens("vllm-instance-2") == 600 - 512
        assert f.response.stream(b"data: {}") == b"data: {}"
        assert a.router.index.pending_tokens("vllm-instance-2") == 0
        assert f.response.headers["x-kvcache-route"].startswith("vllm-instance-2; reason=cache-hit")
        assert a.state is not None and a.state.inflight["vllm-instance-2"] == 1
        a.response(f)
        assert a.state.inflight["vllm-instance-2"] == 0
        a.done()


async def test_controller_errors_fail_open(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        first: str | None = None
        for answer in (httpx.Response(500, json={"detail": "boom"}),
                       httpx.Response(200, content=b"<html>garbage"),
                       httpx.Response(200, json={"layout_info": {"vllm-instance-2": 5}})):
            install(a, httpx.MockTransport(lambda r, ans=answer: ans),
                    httpx.MockTransport(tokens_ok))
            f = chat_flow()
            await a.request(f)
            assert f.request.host in ("127.0.0.1", "10.9.9.9")
            # The same prompt was answered just before: the proxy's own memory of finished
            # prompts sends it where that one went, since the controller cannot say.
            meta = f.metadata["kvcache"]
            if first is None:
                first = f.request.host
                assert meta["reason"] == "least_inflight"
            else:
                assert meta["reason"] == "local-hit" and f.request.host == first
            assert meta["why"].startswith("lookup-")
            assert not f.marked
            f.response = tutils.tresp()
            a.response(f)
        a.done()


async def test_non_llm_requests_are_balanced_untouched(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        f = tflow.tflow()
        f.request = tutils.treq(method=b"GET", path=b"/v1/models")
        before = f.request.raw_content
        await a.request(f)
        assert f.request.port in (8001, 8443) and f.request.raw_content == before
        assert f.metadata["kvcache"]["why"] == "not-llm"
        bad = chat_flow()
        bad.request.raw_content = b'{"model": "m", "messages": [ broken'
        await a.request(bad)
        assert bad.request.raw_content == b'{"model": "m", "messages": [ broken'
        assert bad.metadata["kvcache"]["why"] == "unparsable"
        a.done()


async def test_flows_with_response_or_not_live_are_skipped(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        f = chat_flow()
        f.live = False
        await a.request(f)
        assert "kvcache" not in f.metadata
        a.done()


def test_bad_config_at_startup_is_one_error_line(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        with caplog.at_level(logging.ERROR):
            tctx.configure(a, kvcache_config=write(tmp_path, CONFIG + "bogus: 1\n"))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "unknown key 'bogus'" in errors[0].getMessage()
        a.running()
        assert a.router is None  # never starts half-configured


def test_bad_config_after_startup_is_rejected(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        bad = tmp_path / "bad.yaml"
        bad.write_text(CONFIG.replace("500ms", "soon"))
        with pytest.raises(exceptions.OptionsError, match="lookup_routing_timeout = 'soon'"):
            tctx.configure(a, kvcache_config=str(bad))
        assert a.router is not None  # the old config keeps running
        a.done()


def test_stats_command_reports_counters(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        stats = json.loads(tctx.command(a.stats))
        assert stats["router"]["routed"] == 0 and "vllm-instance-1" in stats["inflight"]
        a.done()


async def test_large_bodies_are_parsed_off_the_loop_and_routed(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        install(a, holder("vllm-instance-2", 512), httpx.MockTransport(tokens_ok))
        f = chat_flow(n_words=80_000)
        assert len(f.request.raw_content) > OFF_LOOP_BYTES
        await a.request(f)
        assert f.metadata["kvcache"]["reason"] == "cache-hit"
        assert f.request.port == 8443
        a.done()


def raw_flow(body: bytes, **headers: str) -> http.HTTPFlow:
    f = tflow.tflow()
    hdrs = [(b"content-type", b"application/json")] + [
        (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    f.request = tutils.treq(method=b"POST", path=b"/v1/completions", content=b"",
                            headers=tuple(hdrs))
    f.request.raw_content = body
    return f


@pytest.mark.parametrize(("body", "why"), [
    (b"[" * 100_000, "unparsable"),  # RecursionError inside json.loads
    (b'{"model": "m", "prompt": "abc \\ud800"}', "short-prompt"),  # lone surrogate, escaped
    (b'{"model": "m", "prompt": "abc \xed\xa0\x80"}', "short-prompt"),  # ... and raw
    (b"\xff\xfe garbage", "unparsable"),
    (b"", "unparsable"),
])
async def test_hostile_bodies_are_routed_with_a_reason(tmp_path: Path, body: bytes,
                                                       why: str) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        install(a, holder("vllm-instance-2", 512),
                httpx.MockTransport(lambda r: httpx.Response(200, json={"tokens": [1, 2]})))
        f = raw_flow(body)
        await a.request(f)
        assert f.metadata["kvcache"]["why"] == why
        assert f.request.port in (8001, 8443) and f.request.raw_content == body
        a.done()


async def test_gzip_bodies_are_read_and_bombs_are_capped(tmp_path: Path) -> None:
    import gzip

    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        cfg = write(tmp_path, CONFIG + "route_max_body_bytes: 1000000\n")
        tctx.configure(a, kvcache_config=cfg)
        a.running()
        install(a, holder("vllm-instance-2", 512), httpx.MockTransport(tokens_ok))
        plain = json.dumps({"model": "m", "prompt": "word " * 400}).encode()
        f = raw_flow(gzip.compress(plain), content_encoding="gzip")
        sent = f.request.raw_content
        await a.request(f)
        assert f.metadata["kvcache"]["reason"] == "cache-hit"
        assert f.request.raw_content == sent  # forwarded still encoded, byte for byte
        bomb = gzip.compress(b'{"model": "m", "prompt": "' + b"a" * 20_000_000 + b'"}')
        assert len(bomb) < 100_000
        f = raw_flow(bomb, content_encoding="gzip")
        await a.request(f)
        assert f.metadata["kvcache"]["why"] == "too-large"
        f = raw_flow(b"x" * 1_000_001)
        await a.request(f)
        assert f.metadata["kvcache"]["why"] == "too-large"
        f = raw_flow(plain, content_encoding="br")
        await a.request(f)
        assert f.metadata["kvcache"]["why"] == "encoded"
        a.done()


async def test_a_failure_inside_the_hook_still_routes(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        assert a.router is not None

        async def broken(req: object) -> None:
            raise KeyError("bug")

        a.router.route = broken  # type: ignore[method-assign]
        f = chat_flow()
        await a.request(f)
        assert f.metadata["kvcache"]["why"] == "error-KeyError"
        assert f.request.port in (8001, 8443)
        assert a.router.stats.hook_errors == 1
        a.done()


async def test_a_client_hang_up_does_not_eject_but_a_refused_connect_does(
        tmp_path: Path) -> None:
    from mitmproxy import connection
    from mitmproxy.proxy import server_hooks

    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        assert a.state is not None
        f = tflow.tflow()
        f.request = tutils.treq(method=b"GET", path=b"/v1/models")
        await a.request(f)
        eid = f.metadata["kvcache"]["endpoint_id"]
        f.server_conn.timestamp_tcp_setup = None
        f.error = flow_error("Client disconnected.")
        a.error(f)
        assert eid in a.state.healthy()
        f.client_conn.timestamp_end = None  # the client is still there
        server = connection.Server(address=("127.0.0.1", 8001))
        server.error = "[Errno 111] Connect call failed ('127.0.0.1', 8001)"
        a.server_connect_error(server_hooks.ServerConnectionHookData(
            server=server, client=f.client_conn))
        assert a.state.healthy() == ["vllm-instance-2"]
        a.done()


async def test_5xx_answers_eject_after_consecutive_failures(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(
            tmp_path, CONFIG + "outlier_consecutive_failures: 2\n"))
        a.running()
        assert a.state is not None
        for _ in range(2):
            f = tflow.tflow()
            f.request = tutils.treq(method=b"GET", path=b"/health")
            f.request.host, f.request.port = "127.0.0.1", 8001
            assert a.parts is not None
            a._apply(f, a.parts, Decision("vllm-instance-1", "least_inflight"), 0.0)
            f.response = tutils.tresp(status_code=503)
            a.response(f)
        assert a.state.healthy() == ["vllm-instance-2"]
        a.done()


def flow_error(msg: str) -> object:
    from mitmproxy import flow

    return flow.Error(msg)


async def test_a_flow_routed_to_an_endpoint_ejected_before_connecting_is_moved(
        tmp_path: Path) -> None:
    from mitmproxy import connection
    from mitmproxy.proxy import server_hooks

    cfg = CONFIG.replace('"https://10.9.9.9:8443"', '"http://127.0.0.1:8002"')
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path, cfg))
        a.running()
        assert a.state is not None and a.router is not None
        f = tflow.tflow()
        f.request = tutils.treq(method=b"GET", path=b"/v1/models")
        await a.request(f)
        first = f.metadata["kvcache"]["endpoint_id"]
        other = ({"vllm-instance-1", "vllm-instance-2"} - {first}).pop()
        port = f.request.port
        a.state.health.failure(first, "connect-refused")  # another flow's connect failed
        server = connection.Server(address=("127.0.0.1", port))
        a.server_connect(server_hooks.ServerConnectionHookData(server=server,
                                                               client=f.client_conn))
        assert server.address[1] != port and f.request.port == server.address[1]
        assert f.metadata["kvcache"]["endpoint_id"] == other
        assert a.state.inflight[first] == 0 and a.state.inflight[other] == 1
        assert a.router.stats.rerouted == 1
        a.done()


async def test_engine_metrics_show_traffic_that_bypassed_the_proxy(tmp_path: Path) -> None:
    # A vLLM stand-in (sim.engine_server, real HTTP) busy with requests sent straight to it:
    # the addon's scraper reads its queue and the router counts it as foreign load.
    import asyncio
    import threading

    from sim.cluster import start_engine
    from sim.engine_model import CostModel
    from sim.engine_server import EngineConfig

    with start_engine(EngineConfig(time_scale=1.0, cost=CostModel(max_batch=8))) as url:
        cfg = (f"lmcache_endpoint: http://controller.test:9000\n"
               f"engine_metrics_interval: 50ms\n"
               f"endpoints:\n  - {{id: busy, url: \"{url}\"}}\n"
               f"  - {{id: idle, url: \"http://127.0.0.1:9\"}}\n")
        threads = [threading.Thread(target=lambda i=i: httpx.post(
            f"{url}/v1/completions", json={"prompt": [i + 1] * 3000, "max_tokens": 4},
            timeout=10)) for i in range(3)]
        for t in threads:
            t.start()
        a = kvcache.KVCache()
        with taddons.context(a) as tctx:
            tctx.configure(a, kvcache_config=write(tmp_path, cfg))
            a.running()
            assert a.router is not None
            for _ in range(200):
                if a.router.index.foreign("busy")[0] >= 1:
                    break
                await asyncio.sleep(0.01)
            waiting, running = a.router.index.foreign("busy")
            assert waiting >= 1 and running == 1
            load = a.router.load_tokens()
            assert load is not None and load["busy"] > load["idle"] == 0
            stats = json.loads(tctx.command(a.stats))["engine_metrics"]
            assert stats["scrapes"] >= 2 and stats["failures"] >= 1  # port 9: nothing there
            assert stats["last"]["idle"] is None and stats["last"]["busy"]["running"] == 1
            a.done()
        for t in threads:
            t.join()


async def test_endpoints_and_explain_commands(tmp_path: Path) -> None:
    from mitmproxy import command as mcommand

    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        install(a, holder("vllm-instance-2", 512), httpx.MockTransport(tokens_ok))
        f = chat_flow()
        await a.request(f)
        table = tctx.command(a.endpoints).splitlines()
        assert table[0].split()[:2] == ["endpoint", "health"]
        row = next(line for line in table if line.startswith("vllm-instance-2"))
        assert row.split()[1:3] == ["up", "1"]  # up, one request in flight
        assert "cache view: controller" in table[-1]
        text = a.explain([f])
        assert "sent to vllm-instance-2" in text and "512 of 600 prompt tokens" in text
        # Typed as mitmproxy's flow specs, so `kvcache.explain @focus` works in mitmweb.
        cmd = mcommand.Command(tctx.master.commands, "kvcache.explain", a.explain)
        from collections.abc import Sequence

        from mitmproxy import flow as mflow
        assert [(p.name, p.type) for p in cmd.parameters] == [("flows", Sequence[mflow.Flow])]
        a.done()
