"""mitmproxy addon: route each LLM request to the vLLM instance that holds the longest cached
prefix of its prompt (as LMCache's controller reports); load-balance everything else.

    mitmdump -s addon/kvcache.py --mode reverse:http://127.0.0.1:8001 \
        --set connection_strategy=lazy --set kvcache_config=config.yaml

This file only wires the pieces to mitmproxy's hooks; the deciding happens in request.py,
tokens.py, policy.py and router.py, the I/O in lmcache.py and vllm.py, the background work in
background.py and manager.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# mitmproxy loads this file as a script, not as part of a package: make `addon.*` importable.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import httpx  # noqa: E402
from mitmproxy import command, ctx, exceptions, flow, http  # noqa: E402
from mitmproxy.proxy import server_hooks  # noqa: E402

from addon import decision_view  # noqa: E402
from addon.background import BackgroundPool, Job  # noqa: E402
from addon.body import NotRoutable, needs_thread, routable_body  # noqa: E402
from addon.call_flows import CALLER, CallFlows  # noqa: E402
from addon.config import ConfigError, KVCacheConfig, load_config_file  # noqa: E402
from addon.logs import ToLoop, relay_thread_logs, stop_relay  # noqa: E402
from addon.looplag import LoopLag  # noqa: E402
from addon.manager import CacheManager  # noqa: E402
from addon.metrics import Metrics, check_listen, parse_listen  # noqa: E402
from addon.parts import Parts, build  # noqa: E402
from addon.policy import EndpointState  # noqa: E402
from addon.request import LLMRequest, parse_llm_request  # noqa: E402
from addon.router import Decision, Router  # noqa: E402
from addon.tokens import TokenCache  # noqa: E402
from addon.vllm import AsyncHealthCheck  # noqa: E402

logger = logging.getLogger(__name__)

ROUTE_HEADER = "x-kvcache-route"


class KVCache:
    def __init__(self) -> None:
        self.cfg: KVCacheConfig | None = None
        self.running_ = False
        self.parts: Parts | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, Job] = {}  # flow id -> its background job, until it ends
        self._flow_endpoint: dict[str, str] = {}  # flow id -> endpoint counted in flight
        # client connection id -> its flow being sent (HTTP/1: one at a time), so that
        # server_connect can find the flow a new upstream connection is for.
        self._by_client: dict[str, http.HTTPFlow] = {}
        # Bodies too large to read on the event loop (and gzip bodies) are read here.
        self._readers: ThreadPoolExecutor | None = None
        self._log_relay: ToLoop | None = None
        self.lag = LoopLag()
        self.metrics: Metrics | None = None  # with metrics_listen, from running to done
        self.calls: CallFlows | None = None  # with kvcache_show_calls in mitmweb/mitmproxy

    # The parts, for the commands and the tests.
    @property
    def router(self) -> Router | None:
        return self.parts.router if self.parts else None

    @property
    def state(self) -> EndpointState | None:
        return self.parts.state if self.parts else None

    @property
    def pool(self) -> BackgroundPool | None:
        return self.parts.pool if self.parts else None

    @property
    def manager(self) -> CacheManager | None:
        return self.parts.manager if self.parts else None

    @property
    def token_cache(self) -> TokenCache | None:
        return self.parts.token_cache if self.parts else None

    def load(self, loader: Any) -> None:
        _return_big_frees_to_the_os()
        decision_view.register()
        # mitmproxy's root logger is at DEBUG: keep the HTTP clients' per-request lines out.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        loader.add_option(
            "kvcache_config", str, "config.yaml",
            "Path of the kvcache addon's YAML config (endpoints, LMCache controller, ...).",
        )
        loader.add_option(
            "kvcache_view_auto", bool, False,
            "Make the kvcache content view (the routing decision) the default view of "
            "routed flows.",
        )
        loader.add_option(
            "kvcache_show_calls", bool, False,
            "Show the addon's own LMCache and /tokenize calls as flows (mitmweb, mitmproxy), "
            "each linked to the client flow it served.",
        )

    def configure(self, updated: set[str]) -> None:
        if "kvcache_view_auto" in updated:
            decision_view.AUTO = bool(ctx.options.kvcache_view_auto)
        if "kvcache_show_calls" in updated and self.parts is not None:
            self._show_calls(self.parts)
        if "kvcache_config" not in updated:
            return
        try:
            cfg = load_config_file(ctx.options.kvcache_config)
        except ConfigError as e:
            if self.running_:
                raise exceptions.OptionsError(f"[kvcache] {e}") from None
            # At start-up one ERROR line makes mitmdump exit cleanly (no traceback), and the
            # addon never starts half-configured.
            logger.error(f"[kvcache] invalid config: {e}")
            self.cfg = None
            return
        if cfg.metrics_listen and (not self.running_ or self.cfg is None
                                   or cfg.metrics_listen != self.cfg.metrics_listen):
            # Said before start-up ends (one line; mitmdump exits on it), not found later.
            why = check_listen(*parse_listen(cfg.metrics_listen))
            if why is not None:
                msg = f"metrics_listen = {cfg.metrics_listen!r}: {why}"
                if self.running_:
                    raise exceptions.OptionsError(f"[kvcache] {msg}")
                logger.error(f"[kvcache] invalid config: {msg}")
                self.cfg = None
                return
        self.cfg = cfg
        if self.running_:
            self._stop()
            self._start()

    def running(self) -> None:
        # Synchronous on purpose: an async `running` breaks mitmproxy's script hot reload.
        self.running_ = True
        self._start()

    def done(self) -> None:
        self._stop()
        self.running_ = False
        decision_view.unregister()

    # -- wiring ------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        if cfg is None:
            return
        self.parts = build(cfg, lag=self.lag, busy=lambda: self.lag.busy)
        if cfg.metrics_listen:
            self.metrics = Metrics(lambda: self.parts)
            try:
                self.metrics.start(*parse_listen(cfg.metrics_listen))
            except OSError as e:  # taken between configure's check and now
                logger.error(f"[kvcache] metrics_listen = {cfg.metrics_listen!r}: {e}")
                self.metrics = None
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="kvcache-read")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._spawn(self.lag.run())
            self._log_relay = relay_thread_logs(loop)
            self.parts.start_threads(loop)
            self._show_calls(self.parts)
            if cfg.health_check_path:
                self._spawn(self._health_checks(self.parts))
        ids = [ep.id for ep in cfg.endpoints]
        where = ("their vLLM KV cache events" if self.parts.view == "kv_events" else
                 f"the LMCache {self.parts.view} at {cfg.lmcache_endpoint}")
        logger.info(
            f"[kvcache] routing {len(ids)} endpoints ({', '.join(ids)}) by {where}; "
            f"budget {cfg.lookup_routing_timeout * 1000:.0f} ms, "
            f"fallback {cfg.load_balancing}{'' if cfg.enabled else '; cache routing disabled'}"
        )
        if self.parts.replicas is not None:
            logger.info(f"[kvcache] sharing routing state with other replicas through "
                        f"{cfg.state.backend} at {cfg.state.url} (channel "
                        f"{cfg.state.channel!r}) as replica {self.parts.replicas.replica_id}")

    def _stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        for task in list(self._tasks):
            task.cancel()
        if self.parts is not None:
            if self.parts.replicas is not None and self.parts.link is not None:
                # What sharing cost and how stale it ran, once, for whoever reads the log.
                link, rs = self.parts.link, self.parts.replicas.stats
                logger.info(
                    f"[kvcache] shared state: {link.stats.batches_published} batches "
                    f"published, {rs.events_received} events received from "
                    f"{len(self.parts.replicas.peers)} peers, staleness "
                    f"{json.dumps(link.staleness_ms())}, {link.stats.disconnects} "
                    f"disconnects, {link.stats.events_dropped} events dropped")
            self.parts.close(self._tasks)
            self.parts = None
        if self._readers is not None:
            self._readers.shutdown(wait=False, cancel_futures=True)
            self._readers = None
        if self._log_relay is not None:
            stop_relay(self._log_relay)
            self._log_relay = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _health_checks(self, parts: Parts) -> None:
        cfg, health = parts.cfg, parts.state.health
        checker = AsyncHealthCheck()
        try:
            while True:
                results = await asyncio.gather(*(
                    checker.check(ep.url, cfg.health_check_path, cfg.health_check_interval)
                    for ep in cfg.endpoints))
                for ep, why in zip(cfg.endpoints, results, strict=True):
                    if not why:
                        if health.ejected(ep.id):
                            logger.info(f"[kvcache] endpoint {ep.id} passed its health check; "
                                        "back in rotation")
                        health.probe_ok(ep.id)
                    elif health.failure(ep.id, "probe"):
                        self._ejected(ep.id, f"failed its health check ({why})")
                await asyncio.sleep(cfg.health_check_interval)
        finally:
            await checker.aclose()

    # -- hooks ---------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        parts = self.parts
        if parts is None:
            return
        t0 = time.perf_counter()
        req: LLMRequest | None = None
        hot = 0
        decision: Decision
        caller = CALLER.set(flow.id) if self.calls is not None else None
        try:
            req, decision, hot = await self._decide(flow, parts)
        except Exception as e:  # never out of the hook: the request goes to an endpoint
            req, decision = None, self._hook_failed(parts, e)
        finally:
            if caller is not None:
                CALLER.reset(caller)
        if flow.response or flow.error:  # killed while we awaited
            return
        self._apply(flow, parts, decision, (time.perf_counter() - t0) * 1000, req)
        if req is not None and parts.cfg.enabled:
            self._schedule(flow, parts, req, hot, decision.controller)

    async def _decide(
        self, flow: http.HTTPFlow, parts: Parts
    ) -> tuple[LLMRequest | None, Decision, int]:
        """The parsed request (None when routing cannot read it), the decision, and how often
        the prompt was seen in the hot window."""
        cfg, router, r = parts.cfg, parts.router, flow.request
        if not cfg.enabled:
            return None, router.balance("disabled"), 0
        if r.method.upper() != "POST" or r.path.split("?", 1)[0] not in cfg.llm_paths:
            return None, router.balance("not-llm"), 0
        raw = r.raw_content or b""
        args = (r.method, r.path, r.headers.get("content-type", ""),
                r.headers.get("content-encoding", ""), raw, cfg)
        try:
            if needs_thread(raw, args[3]) and self._readers is not None:
                # Parsing a multi-megabyte body, or inflating one, takes tens of ms.
                req = await asyncio.get_running_loop().run_in_executor(
                    self._readers, _read, *args)
            else:
                req = _read(*args)
        except NotRoutable as e:
            return None, router.balance(e.why), 0
        if req is None:
            return None, router.balance("unparsable"), 0
        hot = parts.hotness.record(req.key)
        return req, await router.route(req), hot

    def _hook_failed(self, parts: Parts, e: Exception) -> Decision:
        kind = type(e).__name__
        log_now, suppressed = parts.failure_log.should_log(f"hook:{kind}")
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            logger.warning(f"[kvcache] could not route a request ({kind}); "
                           f"load-balanced{more}")
        logger.debug("[kvcache] routing error", exc_info=True)
        parts.router.stats.hook_errors += 1
        return parts.router.balance(f"error-{kind}")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        ctype = flow.response.headers.get("content-type", "")
        if ctype.startswith("text/event-stream"):
            # SSE headers come before the prefill ends; the first body bytes come after it.
            flow.response.stream = self._watch_first_byte(flow.id)
        meta = flow.metadata.get("kvcache")
        if meta and self.cfg is not None and self.cfg.route_header:
            flow.response.headers[ROUTE_HEADER] = _route_header(meta)

    def response(self, flow: http.HTTPFlow) -> None:
        eid = self._finish(flow)
        parts = self.parts
        if eid is None or parts is None or flow.response is None:
            return
        if flow.response.status_code >= 500:
            if parts.state.health.failure(eid, "http-5xx"):
                self._ejected(eid, f"answered {parts.cfg.outlier_consecutive_failures} "
                                   "5xx/resets in a row")
        else:
            parts.state.health.success(eid)

    def error(self, flow: http.HTTPFlow) -> None:
        eid = self._finish(flow)
        parts = self.parts
        if eid is None or parts is None or flow.error is None:
            return
        if _client_left(flow):
            return  # a hang-up says nothing about the endpoint
        if flow.server_conn.timestamp_tcp_setup is None:
            return  # never connected: server_connect_error counted it
        if parts.state.health.failure(eid, "reset"):
            self._ejected(eid, f"failed {parts.cfg.outlier_consecutive_failures} requests "
                               "in a row (resets/5xx)")

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Before connecting: a flow routed to an endpoint that was ejected since (its first
        refused connect came in the meantime) goes to a healthy one instead. mitmproxy has
        no hook to retry a connect that failed, so this is as close to a retry as it gets:
        only the flows routed before the ejection was known can still fail."""
        parts = self.parts
        flow = self._by_client.get(data.client.id)
        if parts is None or flow is None or data.server.address is None:
            return
        eid = self._flow_endpoint.get(flow.id)
        addr = (str(data.server.address[0]), int(data.server.address[1]))
        if eid is None or parts.by_address.get(addr) != eid or not parts.state.health.ejected(eid):
            return
        old = parts.cfg.endpoint(eid)
        d = parts.router.balance("endpoint-ejected")
        new = parts.cfg.endpoint(d.endpoint_id)
        if old is None or new is None or new.id == eid or new.scheme != old.scheme:
            return
        parts.router.finished(flow.id, eid)
        parts.router.started(flow.id, d)
        self._flow_endpoint[flow.id] = new.id
        flow.request.host, flow.request.port = new.host, new.port
        data.server.address = (new.host, new.port)
        meta = flow.metadata.get("kvcache", {})
        meta.update(endpoint_id=new.id, reason=d.reason, why=f"rerouted-from-{eid}",
                    matched_tokens=0)
        flow.comment = f"kvcache → {new.id}: {d.reason} ({eid} was ejected before connecting)"
        flow.marked = ""
        parts.router.stats.rerouted += 1

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        parts = self.parts
        if parts is None or data.server.address is None:
            return
        eid = parts.by_address.get((str(data.server.address[0]), int(data.server.address[1])))
        if eid is None:
            return
        err = str(data.server.error or "").lower()
        if "cancel" in err or "client disconnected" in err or data.client.timestamp_end:
            return  # mitmproxy gave up the connect because the client left: not the endpoint
        kind = "connect-timeout" if "timed out" in err else "connect-refused"
        if parts.state.health.failure(eid, kind):
            self._ejected(eid, f"refused a connection ({kind})")

    def _ejected(self, eid: str, what: str) -> None:
        assert self.parts is not None
        secs = self.parts.state.health.ejection_seconds(eid)
        logger.warning(f"[kvcache] endpoint {eid} {what}; ejected for {secs:.0f} s")

    # -- helpers ------------------------------------------------------------------------

    def _apply(self, flow: http.HTTPFlow, parts: Parts, d: Decision, ms: float,
               req: LLMRequest | None = None) -> None:
        target = parts.targets.get(d.endpoint_id)
        if target is None:  # cannot happen: decisions only name configured endpoints
            return
        scheme, host, port = target
        r = flow.request
        # Each setter rewrites the Host header too: only what differs from the target.
        if r.scheme != scheme:
            r.scheme = scheme
        if r.host != host or r.port != port:
            r.host, r.port = host, port
        if req is None:
            parts.router.started(flow.id, d)
        else:
            parts.router.started(flow.id, d, req.stream, req.key, req.max_tokens)
        self._flow_endpoint[flow.id] = d.endpoint_id
        self._by_client[flow.client_conn.id] = flow
        meta = d.as_metadata()
        meta["route_ms"] = round(ms, 2)
        meta["budget_ms"] = parts.budget_ms
        flow.metadata["kvcache"] = meta
        if self.metrics is not None:
            self.metrics.observe(meta)
        text = f"kvcache → {d.endpoint_id}: {d.reason}"
        if d.why:
            text += f" ({d.why})"
        if d.prompt_tokens:
            text += f", matched {d.matched_tokens}/{d.prompt_tokens} tokens"
        if d.lookup_ms is not None:
            text += f", lookup {d.lookup_ms:.1f} ms"
        flow.comment = text
        if d.reason == "cache-hit":
            flow.marked = ":dart:"
        # No per-request log line: mitmproxy's root logger is at DEBUG, so even a debug line
        # is formatted and handled for every request; the comment and metadata carry it.

    def _schedule(self, flow: http.HTTPFlow, parts: Parts, req: LLMRequest, hot: int,
                  answer: dict[str, int] | None) -> None:
        manager = parts.manager
        if not manager.needs_job(req.key, hot, answer) and (
                req.token_ids is not None or not req.tokenize_body
                or (parts.token_cache is not None and parts.token_cache.has(req.key))):
            return  # the tokens are known and the strategy has nothing to do: no job
        if self.calls is None:
            def run(j: Job) -> None:
                manager.run(req, j, hot, answer)
        else:  # the job's calls name the flow they serve (a pool thread has no context)
            token = CALLER.set(flow.id)
            ctx_run = contextvars.copy_context().run
            CALLER.reset(token)

            def run(j: Job) -> None:
                ctx_run(manager.run, req, j, hot, answer)
        job = parts.pool.submit(req.key, run, parts.cfg.request_timeout)
        if job is not None:
            self._jobs[flow.id] = job
            job_done = job.future
            if job_done is not None:
                job_done.add_done_callback(lambda _f, fid=flow.id: self._jobs.pop(fid, None))

    def _finish(self, flow: http.HTTPFlow) -> str | None:
        job = self._jobs.pop(flow.id, None)
        if job is not None and flow.error is not None and self.pool is not None:
            self.pool.cancel(job)  # the client went away: its job is moot if not started
        if self._by_client.get(flow.client_conn.id) is flow:
            del self._by_client[flow.client_conn.id]
        eid = self._flow_endpoint.pop(flow.id, None)
        if eid is not None and self.router is not None:
            self.router.finished(flow.id, eid)
        return eid

    def _watch_first_byte(self, flow_id: str) -> Callable[[bytes], bytes]:
        """A pass-through stream filter that tells the router when the body starts."""
        seen = False

        def chunk(data: bytes) -> bytes:
            nonlocal seen
            if data and not seen:
                seen = True
                if self.router is not None:
                    self.router.first_byte(flow_id)
            return data

        return chunk

    # -- commands ------------------------------------------------------------------------

    def _show_calls(self, parts: Parts) -> None:
        """Tap the clients (or untap them) as kvcache_show_calls says."""
        on = bool(getattr(ctx.options, "kvcache_show_calls", False))
        view = getattr(ctx.master, "view", None)
        if on and view is None:
            logger.warning("[kvcache] kvcache_show_calls needs a flow list (mitmweb or "
                           "mitmproxy); mitmdump has none")
            on = False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            on = False
        self.calls = CallFlows(loop, view.add) if on else None
        tap = self.calls.tap if self.calls is not None else None
        for client in (parts.router.lmcache, parts.router.tokenizer):
            inner = getattr(client, "_client", None)
            if inner is not None and hasattr(inner, "tap"):
                inner.tap = tap
        for client in (parts.manager.lmcache, parts.manager.engine):
            inner = getattr(client, "_client", None)
            if isinstance(inner, httpx.Client):
                hooks = [h for h in inner.event_hooks.get("response", [])
                         if getattr(h, "__self__", None).__class__ is not CallFlows]
                if self.calls is not None:
                    hooks.append(self.calls.httpx_hook)
                inner.event_hooks = {**inner.event_hooks, "response": hooks}

    @command.command("kvcache.endpoints")
    def endpoints(self) -> str:
        """Each endpoint as a table: health, requests in flight, estimated queued prefill,
        requests routed, and what the engine and the cache view say of it."""
        parts = self.parts
        if parts is None:
            return "kvcache: not running (no valid config)"
        state, router = parts.state, parts.router
        health = state.health.stats()
        prefill = router.index.prefill_load()
        cols = ["endpoint", "health", "in flight", "queued prefill", "routed", "engine w/r",
                "ejections"]
        if parts.kv_index is not None:
            cols.append("kv blocks")
        rows = [cols]
        for eid in state.ids:
            h = health.get(eid, {})
            up = f"ejected {h['ejected_for_s']}s" if h.get("ejected") else "up"
            reading = parts.scraper.last.get(eid) if parts.scraper is not None else None
            engine = f"{reading.waiting}/{reading.running}" if reading else "-"
            row = [eid, up, str(state.inflight.get(eid, 0)), str(prefill.get(eid, 0)),
                   str(state.routed.get(eid, 0)), engine, str(h.get("ejections", 0))]
            if parts.kv_index is not None:
                row.append(str(parts.kv_index.blocks(eid)))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.append(f"cache view: {parts.view}; controller breaker "
                     f"{parts.manager.controller_breaker.stats()['state']}, tokenizer breaker "
                     f"{parts.manager.tokenizer_breaker.stats()['state']}")
        return "\n".join(lines)

    @command.command("kvcache.explain")
    def explain(self, flows: Sequence[flow.Flow]) -> str:
        """Why each flow went where it went (its routing decision, in words)."""
        out = []
        for f in flows:
            meta = f.metadata.get("kvcache") if isinstance(f, http.HTTPFlow) else None
            if not meta:
                out.append(f"{f.id}: not routed by kvcache")
                continue
            out.append(f"{f.id}: {explain_decision(meta)}")
        return "\n".join(out)

    @command.command("kvcache.stats")
    def stats(self) -> str:
        """The addon's counters as one JSON line."""
        from dataclasses import asdict

        out: dict[str, Any] = {}
        if self.router is not None:
            out["router"] = asdict(self.router.stats)
        if self.state is not None:
            out["inflight"] = dict(self.state.inflight)
            out["routed"] = dict(self.state.routed)
            out["health"] = self.state.health.stats()
            out["ejections_skipped_by_cap"] = self.state.health.ejections_skipped
        out["loop"] = {"lag_ms": round(self.lag() * 1000, 1),
                       "worst_lag_ms": round(self.lag.worst * 1000, 1),
                       "busy": round(self.lag.busy, 2)}
        if self.pool is not None:
            out["background"] = asdict(self.pool.stats)
        scraper = self.parts.scraper if self.parts is not None else None
        if scraper is not None and self.router is not None:
            st = scraper.stats
            out["engine_metrics"] = {
                "scrapes": st.scrapes, "failures": st.failures,
                "gauges_only": st.gauges_only,
                "cpu_ms_per_scrape": round(st.cpu_seconds * 1000 / max(st.scrapes, 1), 3),
                "last": {e: (asdict(r) if r else None) for e, r in scraper.last.items()},
                "foreign": {e: self.router.index.foreign(e) for e in scraper.urls},
                "start_rate_tokens_per_s": {e: round(self.router.index.start_rate(e))
                                            for e in scraper.urls},
            }
        parts = self.parts
        if parts is not None and parts.replicas is not None and parts.link is not None:
            out["shared_state"] = {
                "backend": parts.cfg.state.backend, "replica_id": parts.replicas.replica_id,
                "peers": sorted(parts.replicas.peers),
                "peer_inflight": parts.replicas.remote_inflight(),
                "link": asdict(parts.link.stats), "staleness_ms": parts.link.staleness_ms(),
                **asdict(parts.replicas.stats),
            }
        if parts is not None:
            out["cache_view"] = parts.view
        if parts is not None and parts.kv_subscriber is not None and parts.kv_index is not None:
            out["kv_events"] = {"subscriber": asdict(parts.kv_subscriber.stats),
                                "index": asdict(parts.kv_index.stats),
                                "endpoints": parts.kv_index.endpoints()}
        if self.manager is not None:
            out["manager"] = self.manager.stats_dict()
            out["breakers"] = {
                "controller": self.manager.controller_breaker.stats(),
                "tokenizer": self.manager.tokenizer_breaker.stats(),
            }
        if self.token_cache is not None:
            out["token_cache"] = {
                "size": len(self.token_cache), "hits": self.token_cache.hits,
                "prefix_hits": self.token_cache.prefix_hits, "misses": self.token_cache.misses,
            }
        return json.dumps(out, sort_keys=True)


def _return_big_frees_to_the_os() -> None:
    """Make glibc serve allocations of 256 KiB and more with mmap, always.

    glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB),
    after which multi-megabyte bodies (read for routing, often in a reader thread with its own
    malloc arena) come from the heap and, once freed, stay in the process: the soak saw
    mitmdump's RSS grow ~25% over a run while the live Python objects grew by ~10 MB. A fixed
    threshold keeps big blocks mmapped, so freeing them returns them to the system. No-op on
    other C libraries. (Hand-written: no maintained package wraps mallopt.)
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(name)
        m_mmap_threshold, m_arena_max = -3, -8  # glibc's mallopt parameters
        libc.mallopt(m_mmap_threshold, 256 << 10)
        # The reader and background threads would each get a malloc arena that keeps what
        # it once held; two are plenty for a process whose work is one event loop.
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):
        pass


def _read(method: str, path: str, content_type: str, content_encoding: str, raw: bytes,
          cfg: KVCacheConfig) -> LLMRequest | None:
    """The routing facts of a body (raises NotRoutable past the caps). Runs on the loop for
    small bodies, in a reader thread for large or encoded ones."""
    body = routable_body(raw, content_encoding, cfg.route_max_body_bytes)
    return parse_llm_request(method, path, content_type, body, cfg.llm_paths, cfg.default_model)


def _client_left(flow: http.HTTPFlow) -> bool:
    """Whether the flow failed because its client hung up (not because of the upstream)."""
    msg = (flow.error.msg if flow.error else "").lower()
    return "client disconnected" in msg or "client closed" in msg or (
        flow.client_conn.timestamp_end is not None and flow.response is None
        and flow.server_conn.timestamp_start is None)


def _route_header(meta: dict[str, Any]) -> str:
    parts = [str(meta.get("endpoint_id", "")), f"reason={meta.get('reason', '')}"]
    if meta.get("why"):
        parts.append(f"why={meta['why']}")
    if meta.get("prompt_tokens"):
        parts.append(f"matched={meta.get('matched_tokens', 0)}/{meta['prompt_tokens']}")
    if meta.get("token_source"):
        parts.append(f"tokens={meta['token_source']}")
    if meta.get("answer") == "recent-answer":
        parts.append("answer=recent")  # a controller answer under a second old, reused
    parts.append(f"route_ms={meta.get('route_ms', 0)}")
    return "; ".join(parts)


addons = [KVCache()]


_REASONS = {
    "cache-hit": "it holds the longest cached prefix of the prompt (the cache view said so)",
    "local-hit": "the proxy itself sent it that prefix (in flight or just finished)",
    "cache-spill": "the holder was too busy: queueing there cost more than recomputing",
    "least_inflight": "no endpoint held any of the prompt: the least loaded",
    "round_robin": "no endpoint held any of the prompt: round robin",
}
_WHYS = {
    "no-match": "no endpoint held any 256-token chunk of it",
    "short-prompt": "the prompt is shorter than one 256-token chunk",
    "controller-behind": "beyond what the LMCache controller knew",
    "view-behind": "beyond what the cache view (coordinator, KV events) knew",
    "unknown-instance": "the view named an instance that is no configured endpoint",
    "holder-busy": "the holder's queued prefill outweighed the cached tokens",
    "hot-prefix": "a hot prefix gets more than one holder",
    "proxy-saturated": "the proxy's own event loop was behind: routed from its memory",
}


def explain_decision(meta: dict[str, Any]) -> str:
    """One routing decision (a flow's `kvcache` metadata) in words."""
    reason, why = meta.get("reason", ""), meta.get("why", "")
    text = f"sent to {meta.get('endpoint_id')}: {_REASONS.get(reason, reason)}"
    if why:
        text += f"; {_WHYS.get(why, why)}"
    n = meta.get("prompt_tokens", 0)
    if n:
        text += f". {meta.get('matched_tokens', 0)} of {n} prompt tokens were already there"
        if meta.get("token_source"):
            text += f" (tokens: {meta['token_source']})"
    times = [f"routing {meta.get('route_ms', 0)} ms"]
    if meta.get("lookup_ms") is not None:
        times.append(f"lookup {meta['lookup_ms']:.1f} ms")
    if meta.get("answer") == "recent-answer":
        times.append("a recent answer reused")
    return text + "; " + ", ".join(times) + "."
