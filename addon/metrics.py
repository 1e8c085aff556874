"""Prometheus metrics of the addon, on an opt-in listener (`metrics_listen`).

Per request, only what cannot be read later: the decision (endpoint, reason) and three
histograms (routing time, lookup time, matched share of the prompt). Everything the addon
already counts (router, breakers, background pool, strategy actions, token cache, engine
metrics, the replicas' link, KV events) is read at scrape time by a collector, so a
request pays nothing more for it. Names follow the Prometheus conventions (`_total` for
counters, base units: seconds, tokens, ratio in [0, 1]) and the peers' (vllm-router and
sglang-router export routing decisions and per-worker load the same way); labels are
endpoint ids, reasons, outcomes and services, never prompts or flow ids.

The registry is this addon instance's own (not prometheus_client's global one), so a
script reload, which builds a new instance, never registers a name twice.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# The routing step runs within a budget of tens of milliseconds: buckets resolve 0.1-100 ms.
ROUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 1.0)
SHARE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
BREAKER_STATES = ("closed", "half_open", "open")


def parse_listen(value: str) -> tuple[str, int]:
    """"host:port" (IPv6 as "[::1]:9464") -> (host, port); ValueError with why."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('must be "host:port" with a port from 1 to 65535, or empty')
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def check_listen(host: str, port: int) -> str | None:
    """Why the listener could not bind there (None: it can), said before start-up ends."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot resolve {host!r}: {e.strerror or e}"
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the listener itself does (http.server): a port whose last connections are in
        # TIME_WAIT is free, one with a live listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


class Metrics:
    """The per-request instruments, and the listener serving them with the collector's."""

    def __init__(self, state: Callable[[], Any]) -> None:
        """`state`: returns the addon's current parts (or None), read at scrape time."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "kvcache_routing_decisions", "Requests routed, by endpoint and reason.",
            ["endpoint", "reason"], registry=self.registry)
        self.route_seconds = Histogram(
            "kvcache_routing_duration_seconds",
            "Time the request hook spent deciding where a request goes.",
            buckets=ROUTE_BUCKETS, registry=self.registry)
        self.lookup_seconds = Histogram(
            "kvcache_lookup_duration_seconds",
            "Cache-view lookups made on the request path (controller, coordinator, "
            "KV events), as the routing step saw them.",
            buckets=ROUTE_BUCKETS, registry=self.registry)
        self.matched_ratio = Histogram(
            "kvcache_matched_prompt_ratio",
            "Share of a routed prompt's tokens the chosen endpoint already held.",
            buckets=SHARE_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(state))
        self._server: WSGIServer | None = None

    def observe(self, meta: dict[str, Any]) -> None:
        """One routed request's decision (the flow's `kvcache` metadata)."""
        self.decisions.labels(meta["endpoint_id"], meta["reason"]).inc()
        self.route_seconds.observe(meta.get("route_ms", 0.0) / 1000)
        ms = meta.get("lookup_ms")
        if ms is not None:
            self.lookup_seconds.observe(ms / 1000)
        n = meta.get("prompt_tokens", 0)
        if n:
            self.matched_ratio.observe(min(meta.get("matched_tokens", 0) / n, 1.0))

    def start(self, host: str, port: int) -> None:
        self._server, _ = start_http_server(port, host, registry=self.registry)
        logger.info(f"[kvcache] Prometheus metrics at http://{host}:{port}/metrics")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _StateCollector(Collector):
    """What the addon already counts, read when Prometheus scrapes (from the listener's
    thread: the values are plain ints and dicts the event loop updates; a dict that changes
    size while it is copied is copied again)."""

    def __init__(self, state: Callable[[], Any]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        parts = self.state()
        if parts is None:
            return
        yield from self._endpoints(parts)
        yield from self._router(parts)
        yield from self._services(parts)
        yield from self._background(parts)

    def _endpoints(self, parts: Any) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "kvcache_endpoint_inflight_requests",
            "Requests this proxy sent to the endpoint and not finished.", labels=["endpoint"])
        queued = GaugeMetricFamily(
            "kvcache_endpoint_queued_prefill_tokens",
            "The proxy's estimate of the prompt tokens queued for prefill on the endpoint "
            "(its own requests, other replicas' and traffic the engine reports beyond them).",
            labels=["endpoint"])
        healthy = GaugeMetricFamily(
            "kvcache_endpoint_up",
            "1 while the endpoint may take requests, 0 while it is ejected.",
            labels=["endpoint"])
        routed = CounterMetricFamily(
            "kvcache_endpoint_requests", "Requests sent to the endpoint.", labels=["endpoint"])
        state = parts.state
        ok = set(_retry(state.healthy))
        prefill = _retry(lambda: parts.router.index.prefill_load())
        for eid in list(state.ids):
            inflight.add_metric([eid], state.inflight.get(eid, 0))
            queued.add_metric([eid], prefill.get(eid, 0))
            healthy.add_metric([eid], 1.0 if eid in ok else 0.0)
            routed.add_metric([eid], state.routed.get(eid, 0))
        yield from (inflight, queued, healthy, routed)

    def _router(self, parts: Any) -> Iterator[Metric]:
        st = parts.router.stats
        fallbacks = CounterMetricFamily(
            "kvcache_routing_fallbacks",
            "Requests routed without a cache answer, by why.", labels=["why"])
        for why, n in (("lookup_failure", st.lookup_failures),
                       ("breaker_open", st.breaker_skips), ("controller_slow", st.slow_skips),
                       ("proxy_saturated", st.saturated), ("hook_error", st.hook_errors)):
            fallbacks.add_metric([why], n)
        yield fallbacks
        yield _counter("kvcache_lookups", "Cache-view lookups made on the request path.",
                       st.lookups)
        yield _counter("kvcache_unknown_instances",
                       "Instance ids a cache view named that are no configured endpoint.",
                       st.unknown_instances)
        yield _counter("kvcache_recent_answer_reuses",
                       "Requests routed on a recent answer while the proxy was saturated.",
                       st.recent_answers)

    def _services(self, parts: Any) -> Iterator[Metric]:
        breaker = GaugeMetricFamily(
            "kvcache_breaker_state", "1 for the circuit breaker's current state.",
            labels=["service", "state"])
        for name, b in (("controller", parts.manager.controller_breaker),
                        ("tokenizer", parts.manager.tokenizer_breaker)):
            now = b.stats()["state"]
            for s in BREAKER_STATES:
                breaker.add_metric([name, s], 1.0 if now == s else 0.0)
        yield breaker
        tc = parts.token_cache
        if tc is not None:
            lookups = CounterMetricFamily(
                "kvcache_token_cache_lookups", "Token-cache lookups, by outcome.",
                labels=["outcome"])
            lookups.add_metric(["hit"], tc.hits)
            lookups.add_metric(["prefix_hit"], tc.prefix_hits)
            lookups.add_metric(["miss"], tc.misses)
            yield lookups
        scraper = parts.scraper
        if scraper is not None:
            yield _counter("kvcache_engine_metrics_scrapes",
                           "Reads of the engines' vLLM /metrics.", scraper.stats.scrapes)
            yield _counter("kvcache_engine_metrics_failures",
                           "Reads of the engines' vLLM /metrics that failed.",
                           scraper.stats.failures)
            yield _counter("kvcache_engine_metrics_gauges_only",
                           "Reads of the engines' /metrics without vLLM's first-token and "
                           "finished counters (non-streamed prefills then end by estimate).",
                           scraper.stats.gauges_only)
        if parts.link is not None and parts.replicas is not None:
            yield _gauge("kvcache_replicas_connected",
                         "1 while the link to the other replicas (Redis) is up.",
                         1.0 if parts.link.stats.connected else 0.0)
            yield _gauge("kvcache_replicas_peers", "Other replicas heard from.",
                         len(parts.replicas.peers))
            yield _counter("kvcache_replicas_disconnects", "Times the Redis link went down.",
                           parts.link.stats.disconnects)
        sub = parts.kv_subscriber
        if sub is not None:
            yield _counter("kvcache_kv_events_batches", "KV event batches received.",
                           sub.stats.batches)
            resets = CounterMetricFamily(
                "kvcache_kv_events_view_resets",
                "Times an endpoint's KV-events view was dropped, by why.", labels=["why"])
            for why, n in (("gap", sub.stats.gaps), ("restart", sub.stats.restarts),
                           ("disconnect", sub.stats.disconnects),
                           ("decode_error", sub.stats.decode_errors)):
                resets.add_metric([why], n)
            yield resets

    def _background(self, parts: Any) -> Iterator[Metric]:
        ps = parts.pool.stats
        jobs = CounterMetricFamily(
            "kvcache_background_jobs", "Background jobs (tokenize, cache strategy), by outcome.",
            labels=["outcome"])
        for outcome in ("submitted", "dropped_full", "deduplicated", "cancelled", "expired",
                        "completed", "failed"):
            jobs.add_metric([outcome], getattr(ps, outcome))
        yield jobs
        yield _gauge("kvcache_background_queue_jobs", "Background jobs queued or running.",
                     parts.pool.pending())
        actions = CounterMetricFamily(
            "kvcache_strategy_actions",
            "Cache-management actions (pin, compress, evict, clear), by outcome.",
            labels=["action", "outcome"])
        for key, n in dict(parts.manager.stats.actions).items():
            action, _, outcome = key.partition(":")
            actions.add_metric([action, outcome or "unknown"], n)
        yield actions


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _retry(fn: Callable[[], Any]) -> Any:
    # The event loop may resize a dict while this thread copies it: try again.
    for _ in range(5):
        try:
            return fn()
        except RuntimeError:
            continue
    return {}
