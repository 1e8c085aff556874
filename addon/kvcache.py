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
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# mitmproxy loads this file as a script, not as part of a package: make `addon.*` importable.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from mitmproxy import command, ctx, exceptions, http  # noqa: E402

from addon.background import BackgroundPool, Job  # noqa: E402
from addon.config import (  # noqa: E402
    ConfigError,
    KVCacheConfig,
    load_config_file,
    policy_params,
)
from addon.lmcache import AsyncLMCache, LMCache  # noqa: E402
from addon.manager import CacheManager, ManagerSettings  # noqa: E402
from addon.policy import EndpointState, LoadBalancer  # noqa: E402
from addon.request import LLMRequest, parse_llm_request  # noqa: E402
from addon.resilience import CircuitBreaker, RateLimitedLog, RetryPolicy  # noqa: E402
from addon.router import Decision, Router  # noqa: E402
from addon.strategy import validate_compress_method  # noqa: E402
from addon.tokens import Hotness, TokenCache  # noqa: E402
from addon.vllm import AsyncTokenizer, Engine  # noqa: E402

logger = logging.getLogger(__name__)

ROUTE_HEADER = "x-kvcache-route"
LARGE_BODY = 256 * 1024


class KVCache:
    def __init__(self) -> None:
        self.cfg: KVCacheConfig | None = None
        self.running_ = False
        self.router: Router | None = None
        self.state: EndpointState | None = None
        self.pool: BackgroundPool | None = None
        self.manager: CacheManager | None = None
        self.hotness: Hotness | None = None
        self.token_cache: TokenCache | None = None
        self._closers: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._jobs: dict[str, Job] = {}  # flow id -> its background job, until it ends
        self._flow_endpoint: dict[str, str] = {}  # flow id -> endpoint counted in flight

    def load(self, loader: Any) -> None:
        # mitmproxy's root logger is at DEBUG: keep the HTTP clients' per-request lines out.
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        loader.add_option(
            "kvcache_config", str, "config.yaml",
            "Path of the kvcache addon's YAML config (endpoints, LMCache controller, ...).",
        )

    def configure(self, updated: set[str]) -> None:
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

    # -- wiring ------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.cfg
        if cfg is None:
            return
        ids = [ep.id for ep in cfg.endpoints]
        self.state = EndpointState(ids, cfg.unhealthy_cooldown)
        self.token_cache = (
            TokenCache(cfg.token_cache.max_size, cfg.token_cache.ttl)
            if cfg.token_cache.enabled else None
        )
        self.hotness = Hotness(cfg.hot_window, cfg.hot_max_records)
        cb = cfg.circuit_breaker
        controller_breaker = CircuitBreaker(
            cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls, name="controller")
        tokenizer_breaker = CircuitBreaker(
            cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls, name="tokenizer")
        failure_log = RateLimitedLog()
        lmcache = AsyncLMCache(cfg.lmcache_endpoint)
        tokenizer = AsyncTokenizer(cfg.vllm_endpoint) if cfg.tokenize_on_request_path else None
        engine = Engine()
        lmcache_bg = LMCache(cfg.lmcache_endpoint)
        self._closers = [lmcache, engine, lmcache_bg] + ([tokenizer] if tokenizer else [])
        self.router = Router(
            budget=cfg.lookup_routing_timeout, state=self.state,
            balancer=LoadBalancer(cfg.load_balancing), token_cache=self.token_cache,
            lmcache=lmcache, tokenizer=tokenizer, controller_breaker=controller_breaker,
            tokenizer_breaker=tokenizer_breaker, failure_log=failure_log,
            policy=policy_params(cfg),
            slow_backoff=cfg.slow_backoff,
        )
        cs = cfg.cache_strategy
        if warning := validate_compress_method(cs.compress_method):
            logger.warning(f"[kvcache] {warning}")
        self.manager = CacheManager(
            settings=ManagerSettings(
                strategy=cs,
                retry=RetryPolicy(cfg.retry.max_attempts, cfg.retry.base_backoff,
                                  cfg.retry.max_backoff),
                hot_window=cfg.hot_window, request_timeout=cfg.request_timeout,
            ),
            tokenizer_url=cfg.vllm_endpoint,
            endpoint_urls={ep.id: ep.url for ep in cfg.endpoints},
            engine=engine, lmcache=lmcache_bg, token_cache=self.token_cache,
            tokenizer_breaker=tokenizer_breaker, controller_breaker=controller_breaker,
            failure_log=failure_log,
        )
        self.pool = BackgroundPool(cfg.background.workers, cfg.background.queue_size)
        logger.info(
            f"[kvcache] routing {len(ids)} endpoints ({', '.join(ids)}) by LMCache at "
            f"{cfg.lmcache_endpoint}; budget {cfg.lookup_routing_timeout * 1000:.0f} ms, "
            f"fallback {cfg.load_balancing}{'' if cfg.enabled else '; cache routing disabled'}"
        )

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        for c in self._closers:
            if hasattr(c, "aclose"):
                try:
                    task = asyncio.get_running_loop().create_task(c.aclose())
                except RuntimeError:
                    continue  # no loop left: the process is ending anyway
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                c.close()
        self._closers = []
        self.router = None

    # -- hooks ---------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        router, cfg = self.router, self.cfg
        if router is None or cfg is None:
            return
        t0 = time.perf_counter()
        r = flow.request
        body = r.get_content(strict=False)
        args = (r.method, r.path, r.headers.get("content-type", ""), body, cfg.llm_paths,
                cfg.default_model)
        if body is not None and len(body) > LARGE_BODY:
            # Parsing and hashing a multi-megabyte body takes tens of ms: off the event loop.
            req = await asyncio.to_thread(parse_llm_request, *args)
        else:
            req = parse_llm_request(*args)
        hot = 0
        if req is None:
            decision = router.balance("not-llm")
        elif not cfg.enabled:
            decision = router.balance("disabled")
        else:
            hot = self.hotness.record(req.key) if self.hotness is not None else 0
            decision = await router.route(req)
        if flow.response or flow.error:  # killed while we awaited
            return
        self._apply(flow, decision, (time.perf_counter() - t0) * 1000)
        if req is not None and cfg.enabled:
            self._schedule(flow, req, hot)

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
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        eid = self._finish(flow)
        if eid and self.state is not None and flow.server_conn.timestamp_tcp_setup is None:
            # The upstream never accepted the connection: keep new requests off it a while.
            self.state.mark_down(eid)
            logger.warning(f"[kvcache] endpoint {eid} refused a connection; marked down")

    # -- helpers ------------------------------------------------------------------------

    def _apply(self, flow: http.HTTPFlow, d: Decision, ms: float) -> None:
        assert self.cfg is not None and self.state is not None
        ep = self.cfg.endpoint(d.endpoint_id)
        if ep is None:  # cannot happen: decisions only name configured endpoints
            return
        flow.request.scheme = ep.scheme
        flow.request.host = ep.host
        flow.request.port = ep.port
        if self.router is not None:
            self.router.started(flow.id, d)
        else:
            self.state.start(ep.id)
        self._flow_endpoint[flow.id] = ep.id
        meta = d.as_metadata()
        meta["route_ms"] = round(ms, 2)
        flow.metadata["kvcache"] = meta
        text = f"kvcache → {ep.id}: {d.reason}"
        if d.why:
            text += f" ({d.why})"
        if d.prompt_tokens:
            text += f", matched {d.matched_tokens}/{d.prompt_tokens} tokens"
        if d.lookup_ms is not None:
            text += f", lookup {d.lookup_ms:.1f} ms"
        flow.comment = text
        if d.reason == "cache-hit":
            flow.marked = ":dart:"
        logger.debug(f"[kvcache] {flow.request.path} -> {ep.id} {d.reason} {d.why}")

    def _schedule(self, flow: http.HTTPFlow, req: LLMRequest, hot: int) -> None:
        pool, manager, cfg = self.pool, self.manager, self.cfg
        if pool is None or manager is None or cfg is None:
            return
        job = pool.submit(req.key, lambda j: manager.run(req, j, hot), cfg.request_timeout)
        if job is not None:
            self._jobs[flow.id] = job
            job_done = job.future
            if job_done is not None:
                job_done.add_done_callback(lambda _f, fid=flow.id: self._jobs.pop(fid, None))

    def _finish(self, flow: http.HTTPFlow) -> str | None:
        job = self._jobs.pop(flow.id, None)
        if job is not None and flow.error is not None and self.pool is not None:
            self.pool.cancel(job)  # the client went away: its job is moot if not started
        eid = self._flow_endpoint.pop(flow.id, None)
        if eid is not None and self.router is not None:
            self.router.finished(flow.id, eid)
        elif eid is not None and self.state is not None:
            self.state.finish(eid)
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

    @command.command("kvcache.stats")
    def stats(self) -> str:
        """The addon's counters as one JSON line."""
        import json
        from dataclasses import asdict

        out: dict[str, Any] = {}
        if self.router is not None:
            out["router"] = asdict(self.router.stats)
        if self.state is not None:
            out["inflight"] = dict(self.state.inflight)
            out["routed"] = dict(self.state.routed)
        if self.pool is not None:
            out["background"] = asdict(self.pool.stats)
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


def _route_header(meta: dict[str, Any]) -> str:
    parts = [str(meta.get("endpoint_id", "")), f"reason={meta.get('reason', '')}"]
    if meta.get("why"):
        parts.append(f"why={meta['why']}")
    if meta.get("prompt_tokens"):
        parts.append(f"matched={meta.get('matched_tokens', 0)}/{meta['prompt_tokens']}")
    if meta.get("token_source"):
        parts.append(f"tokens={meta['token_source']}")
    parts.append(f"route_ms={meta.get('route_ms', 0)}")
    return "; ".join(parts)


addons = [KVCache()]
