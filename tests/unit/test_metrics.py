"""Prometheus metrics (addon/metrics.py) through the addon's hooks (mitmproxy.test), scraped
from the real listener: decisions by endpoint and reason, the histograms, what the addon
already counts; a bad or taken address stops start-up with one line; off adds nothing."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import httpx
import pytest
from mitmproxy.test import taddons
from prometheus_client.parser import text_string_to_metric_families

from addon import kvcache
from addon.config import ConfigError, load_config
from addon.metrics import check_listen, parse_listen
from tests.unit.test_addon import CONFIG, chat_flow, holder, install, tokens_ok, write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.mark.parametrize(("value", "ok"), [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9", ("::1", 9)),
    (":9464", ("127.0.0.1", 9464)), ("9464", None), ("host:0", None), ("host:70000", None),
    ("host:x", None)])
def test_listen_addresses(value: str, ok: tuple[str, int] | None) -> None:
    if ok is None:
        with pytest.raises(ValueError):
            parse_listen(value)
    else:
        assert parse_listen(value) == ok


def test_a_bad_address_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="metrics_listen = '9464'"):
        load_config({"endpoints": [{"id": "a", "url": "http://h:1"}], "metrics_listen": "9464"})


async def test_decisions_and_counters_are_scraped(tmp_path: Path) -> None:
    port = free_port()
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(
            tmp_path, CONFIG + f"metrics_listen: 127.0.0.1:{port}\n"))
        a.running()
        try:
            install(a, holder("vllm-instance-2", 512), httpx.MockTransport(tokens_ok))
            flows = [chat_flow() for _ in range(3)]
            for f in flows:
                await a.request(f)
            m = scrape(port)
            # What each flow's own decision says, counted (the third may spill: the holder
            # has two requests in flight by then).
            want: dict[tuple[tuple[str, str], ...], float] = {}
            for f in flows:
                k = (("endpoint", f.metadata["kvcache"]["endpoint_id"]),
                     ("reason", f.metadata["kvcache"]["reason"]))
                want[k] = want.get(k, 0.0) + 1
            assert m["kvcache_routing_decisions_total"] == want
            assert want[(("endpoint", "vllm-instance-2"), ("reason", "cache-hit"))] >= 2
            assert m["kvcache_routing_duration_seconds_count"][()] == 3.0
            assert m["kvcache_lookup_duration_seconds_count"][()] == 3.0
            # Each request's matched share of its prompt, in its bucket.
            share = m["kvcache_matched_prompt_ratio_bucket"]
            ratios = [f.metadata["kvcache"]["matched_tokens"]
                      / f.metadata["kvcache"]["prompt_tokens"] for f in flows]
            for le in ("0.5", "0.9", "0.99"):
                assert share[(("le", le),)] == sum(r <= float(le) for r in ratios), le
            assert share[(("le", "+Inf"),)] == 3 and max(ratios) > 0.5
            on2 = sum(n for k, n in want.items() if ("endpoint", "vllm-instance-2") in k)
            e2 = (("endpoint", "vllm-instance-2"),)
            assert m["kvcache_endpoint_inflight_requests"][e2] == on2
            assert m["kvcache_endpoint_requests_total"][e2] == on2
            assert m["kvcache_endpoint_up"][(("endpoint", "vllm-instance-1"),)] == 1.0
            assert m["kvcache_lookups_total"][()] == 3.0
            states = m["kvcache_breaker_state"]
            assert states[(("service", "controller"), ("state", "closed"))] == 1.0
            assert "kvcache_background_jobs_total" in m
        finally:
            a.done()
        # Stopped with the addon: the port is free again.
        assert check_listen("127.0.0.1", port) is None


def test_a_taken_port_stops_start_up_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        a = kvcache.KVCache()
        with taddons.context(a) as tctx, caplog.at_level(logging.ERROR):
            tctx.configure(a, kvcache_config=write(
                tmp_path, CONFIG + f"metrics_listen: 127.0.0.1:{port}\n"))
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and f"metrics_listen = '127.0.0.1:{port}'" in errors[0]
            assert "in use" in errors[0]
            a.running()
            assert a.router is None


def test_off_by_default_nothing_listens(tmp_path: Path) -> None:
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        tctx.configure(a, kvcache_config=write(tmp_path))
        a.running()
        assert a.metrics is None
        a.done()


def test_a_reload_with_the_same_port_keeps_serving(tmp_path: Path) -> None:
    port = free_port()
    a = kvcache.KVCache()
    with taddons.context(a) as tctx:
        path = write(tmp_path, CONFIG + f"metrics_listen: 127.0.0.1:{port}\n")
        tctx.configure(a, kvcache_config=path)
        a.running()
        try:
            tctx.configure(a, kvcache_config=path + "")  # the same file again: a restart
            a.configure({"kvcache_config"})
            assert "kvcache_endpoint_up" in scrape(port)
        finally:
            a.done()
