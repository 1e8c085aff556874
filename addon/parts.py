"""The addon's object graph, built from one validated config (the factory beside config.py).

`addon/kvcache.py` calls `build` when mitmproxy is running and `Parts.close` when it stops;
tests and tools can build the same graph without mitmproxy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from addon.background import BackgroundPool
from addon.config import CacheStrategyConfig, KVCacheConfig, policy_params
from addon.coordinator import AsyncCoordinator, Coordinator, probe_view
from addon.engine_metrics import EngineReading, EngineScraper
from addon.health import OutlierSettings
from addon.kv_events import (
    KVBlockIndex,
    KVEventsSource,
    KVEventsSubscriber,
    KVEventsView,
    KVUpdate,
    apply_update,
)
from addon.lmcache import AsyncLMCache, LMCache
from addon.manager import CacheManager, ManagerSettings
from addon.policy import EndpointState, LoadBalancer
from addon.replicas import ReplicaSync
from addon.resilience import CircuitBreaker, RateLimitedLog, RetryPolicy
from addon.router import Router
from addon.strategy import validate_compress_method
from addon.tokens import Hotness, TokenCache
from addon.vllm import AsyncTokenizer, Engine

logger = logging.getLogger(__name__)


@dataclass
class Parts:
    cfg: KVCacheConfig
    state: EndpointState
    router: Router
    manager: CacheManager
    pool: BackgroundPool
    hotness: Hotness
    token_cache: TokenCache | None
    failure_log: RateLimitedLog
    closers: list[Any] = field(default_factory=list)
    # endpoint (host, port) -> endpoint id, for the connection hooks
    by_address: dict[tuple[str, int], str] = field(default_factory=dict)
    # endpoint id -> (scheme, host, port), parsed once (the request hook sets them per flow)
    targets: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    # Reads the engines' queues (not started: `start_scraper` needs the running loop).
    scraper: EngineScraper | None = None
    # With `state.backend: redis`: the other replicas' view, and the link that carries it
    # (not started: `start_threads` needs the running loop).
    replicas: ReplicaSync | None = None
    link: Any = None
    # The cache view routing asks ("controller", "coordinator" or "kv_events"), and with
    # kv_events the index its subscriber feeds (not started: `start_threads` starts it).
    view: str = "controller"
    kv_index: KVBlockIndex | None = None
    kv_subscriber: KVEventsSubscriber | None = None

    @property
    def budget_ms(self) -> float:
        return self.cfg.lookup_routing_timeout * 1000

    def start_threads(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the background readers (engine metrics, the replicas' link); what they
        read is applied on `loop` (the router is touched only from the event loop)."""
        self.start_scraper(loop)
        if self.link is not None and self.replicas is not None:
            self.link.start(loop, self.replicas)
        if self.kv_subscriber is not None and self.kv_index is not None:
            self._start_kv_events(loop, self.kv_subscriber, self.kv_index)

    def _start_kv_events(self, loop: asyncio.AbstractEventLoop, sub: KVEventsSubscriber,
                         index: KVBlockIndex) -> None:
        router = self.router
        lost: set[str] = set()  # endpoints forgotten since their publisher went away

        def apply(u: KVUpdate) -> None:
            apply_update(index, u)
            if u.reset in ("disconnected", "restart") or (u.fresh and u.seq == 0):
                # Its server went away or came back empty: the proxy's own memory of what
                # finished there is as stale as the view. Once per outage: the first batch
                # of the restarted server must not forget what was routed there since.
                if u.endpoint not in lost:
                    router.cache_lost(u.endpoint)
                if u.reset == "disconnected":
                    lost.add(u.endpoint)
                else:
                    lost.discard(u.endpoint)

        def deliver(u: KVUpdate) -> None:
            try:
                loop.call_soon_threadsafe(apply, u)
            except RuntimeError:
                pass  # the loop closed: mitmproxy is shutting down

        sub.deliver = deliver
        try:
            sub.start()
        except Exception as e:  # a port to bind taken: route from the proxy's own memory
            logger.warning(f"[kvcache] kv events: cannot subscribe ({type(e).__name__}: "
                           f"{e}); routing from the proxy's own memory only")

    def start_scraper(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the engines' metrics; readings are applied on `loop` (the router
        is touched only from the event loop)."""
        if self.scraper is None:
            return
        router = self.router

        def apply(eid: str, reading: EngineReading | None, seq: int) -> None:
            if reading is None:
                router.engine_lost(eid)
            else:
                router.engine_report(eid, reading.waiting, reading.running, seq,
                                     reading.first_tokens, reading.finished)

        def deliver(eid: str, reading: EngineReading | None, seq: int) -> None:
            try:
                loop.call_soon_threadsafe(apply, eid, reading, seq)
            except RuntimeError:
                pass  # the loop closed: mitmproxy is shutting down

        self.scraper.deliver = deliver
        self.scraper.start()

    def close(self, tasks: set[asyncio.Task[None]]) -> None:
        """Stop the pool and close the clients (async ones as tasks kept in `tasks`)."""
        self.pool.shutdown()
        if self.scraper is not None:
            self.scraper.stop()
        if self.link is not None:
            self.link.stop()
            self.link = None
        if self.kv_subscriber is not None:
            self.kv_subscriber.stop()
        for c in self.closers:
            if hasattr(c, "aclose"):
                try:
                    task = asyncio.get_running_loop().create_task(c.aclose())
                except RuntimeError:
                    continue  # no loop left: the process is ending anyway
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                c.close()
        self.closers = []


def build(cfg: KVCacheConfig, lag: Callable[[], float] = lambda: 0.0,
          busy: Callable[[], float] = lambda: 0.0) -> Parts:
    """`lag`: the event loop's current lag in seconds; `busy`: the process's CPU seconds per
    second (addon/looplag.py)."""
    ids = [ep.id for ep in cfg.endpoints]
    state = EndpointState(ids, cfg.unhealthy_cooldown, outlier=OutlierSettings(
        consecutive_failures=cfg.outlier_consecutive_failures,
        base_ejection=cfg.unhealthy_cooldown, max_ejection=cfg.outlier_max_ejection,
        max_ejected_share=cfg.outlier_max_ejected_share))
    token_cache = (TokenCache(cfg.token_cache.max_size, cfg.token_cache.ttl)
                   if cfg.token_cache.enabled else None)
    cb = cfg.circuit_breaker
    controller_breaker = CircuitBreaker(
        cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls, name="controller")
    tokenizer_breaker = CircuitBreaker(
        cb.failure_threshold, cb.recovery_timeout, cb.half_open_max_calls, name="tokenizer")
    failure_log = RateLimitedLog()
    view, lmcache, lmcache_bg, cs = _cache_view(cfg)
    kv_index = kv_subscriber = None
    if view == "kv_events":
        kv_index = KVBlockIndex(cfg.kv_events_max_blocks)
        lmcache = KVEventsView(kv_index)
        kv_subscriber = KVEventsSubscriber(
            {ep.id: KVEventsSource(ep.kv_events_endpoint, cfg.kv_events_topic,
                                   ep.kv_events_bind) for ep in cfg.endpoints},
            deliver=lambda u: None, stale_after=cfg.kv_events_stale_after,
            failure_log=failure_log)
    tokenizer = AsyncTokenizer(cfg.vllm_endpoint) if cfg.tokenize_on_request_path else None
    engine = Engine()
    router = Router(
        budget=cfg.lookup_routing_timeout, state=state,
        balancer=LoadBalancer(cfg.load_balancing), token_cache=token_cache,
        lmcache=lmcache, tokenizer=tokenizer, controller_breaker=controller_breaker,
        tokenizer_breaker=tokenizer_breaker, failure_log=failure_log,
        policy=policy_params(cfg), slow_backoff=cfg.slow_backoff,
        probe_timeout=cfg.request_timeout, tokenize_max_chars=cfg.tokenize_max_chars,
        lag=lag, busy=busy, answer_ttl=cfg.lookup_reuse_ttl, view=view,
    )
    if warning := validate_compress_method(cs.compress_method):
        logger.warning(f"[kvcache] {warning}")
    manager = CacheManager(
        settings=ManagerSettings(
            strategy=cs,
            retry=RetryPolicy(cfg.retry.max_attempts, cfg.retry.base_backoff,
                              cfg.retry.max_backoff),
            hot_window=cfg.hot_window, request_timeout=cfg.request_timeout,
            tokenize_max_chars=cfg.tokenize_max_chars,
        ),
        tokenizer_url=cfg.vllm_endpoint,
        endpoint_urls={ep.id: ep.url for ep in cfg.endpoints},
        engine=engine, lmcache=lmcache_bg, token_cache=token_cache,
        tokenizer_breaker=tokenizer_breaker, controller_breaker=controller_breaker,
        failure_log=failure_log,
    )
    replicas, link = _shared_state(cfg, router, failure_log)
    return Parts(
        cfg=cfg, state=state, router=router, manager=manager, replicas=replicas, link=link,
        view=view, kv_index=kv_index, kv_subscriber=kv_subscriber,
        pool=BackgroundPool(cfg.background.workers, cfg.background.queue_size),
        hotness=Hotness(cfg.hot_window, cfg.hot_max_records), token_cache=token_cache,
        failure_log=failure_log,
        closers=[c for c in (lmcache, engine, lmcache_bg, tokenizer)
                 if c is not None and (hasattr(c, "aclose") or hasattr(c, "close"))],
        by_address={(ep.host, ep.port): ep.id for ep in cfg.endpoints},
        targets={ep.id: (ep.scheme, ep.host, ep.port) for ep in cfg.endpoints},
        scraper=EngineScraper(
            {ep.id: ep.url for ep in cfg.endpoints}, cfg.engine_metrics_interval,
            timeout=max(cfg.engine_metrics_interval, 1.0), mark=lambda: router.index.seq,
            deliver=lambda eid, reading, seq: None, failure_log=failure_log,
        ) if cfg.engine_metrics_interval > 0 else None,
    )


def replica_id(configured: str) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def _shared_state(
    cfg: KVCacheConfig, router: Router, failure_log: RateLimitedLog
) -> tuple[ReplicaSync | None, Any]:
    st = cfg.state
    if st.backend == "memory":
        return None, None
    # Imported only when asked for: a single replica needs neither redis nor msgpack.
    from addon.redis_link import RedisLink

    name = replica_id(st.replica_id)
    link = RedisLink(st.url, st.channel, name, heartbeat=st.heartbeat,
                     peer_timeout=st.peer_timeout, timeout=st.timeout,
                     failure_log=failure_log)
    sync = ReplicaSync(router, name, link.send, peer_timeout=st.peer_timeout)
    return sync, link


def _cache_view(cfg: KVCacheConfig) -> tuple[str, Any, Any, CacheStrategyConfig]:
    """The view routing asks, its request-path client, the background manager's client and
    the cache strategy that view can carry out."""
    cs = cfg.cache_strategy
    view = cfg.cache_view
    if view == "kv_events":
        # No LMCache to act on: the engines' own caches only tell, they take no orders.
        if cs.enable_pinning or cs.enable_compression or cs.enable_eviction:
            logger.info("[kvcache] cache_view kv_events: no LMCache controller, so no "
                        "pinning, compression or eviction")
        off = cs.model_copy(update={"enable_pinning": False, "enable_compression": False,
                                    "enable_eviction": False})
        return view, None, LMCache(cfg.lmcache_endpoint), off
    if view == "auto":
        # Once, at start-up (a blocking second at most): what lmcache_endpoint serves.
        found = probe_view(cfg.lmcache_endpoint, min(cfg.request_timeout, 1.0))
        view = found or "controller"
        logger.info(f"[kvcache] cache_view auto: {cfg.lmcache_endpoint} "
                    + (f"is an LMCache {found}" if found else
                       "did not answer; using it as an LMCache controller"))
    if view == "coordinator":
        model = cfg.cache_model or cfg.default_model
        if cs.enable_pinning or cs.enable_compression:
            # The coordinator has no compression, and its pins are fleet-wide and never
            # lifted by the strategy: only its targeted delete is used.
            logger.info("[kvcache] cache_view coordinator: eviction by /cache/delete on the "
                        "holder; no pinning or compression")
        off = cs.model_copy(update={"enable_pinning": False, "enable_compression": False})
        return (view, AsyncCoordinator(cfg.lmcache_endpoint, model),
                Coordinator(cfg.lmcache_endpoint, model), off)
    return "controller", AsyncLMCache(cfg.lmcache_endpoint), LMCache(cfg.lmcache_endpoint), cs
