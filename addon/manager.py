"""The background job run for each LLM request, in the background pool's threads.

1. Tokenize the prompt through vLLM `/tokenize` (in the request's own form, so the chat
   template applies) and store the tokens: later requests, the next turn of a chat
   included, then route without waiting on the network.
2. When the strategy might act, gather its signals (LMCache lookup for the holder, the
   target engine's `/metrics` or this machine's CPU for load, the engine's KV usage for
   memory), let `strategy.decide` choose, and make the controller calls with retries and
   the controller's circuit breaker, all within the job's deadline.
Nothing here touches a flow; everything is counted and failures are logged rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from cachetools import TTLCache

from addon.background import Job
from addon.config import CacheStrategyConfig
from addon.coordinator import Coordinator
from addon.lmcache import LMCache
from addon.request import LLMRequest
from addon.resilience import (
    CircuitBreaker,
    RateLimitedLog,
    RetryPolicy,
    call_with_retry,
)
from addon.router import describe_error, service_unhealthy
from addon.strategy import Action, HotWindowPins, Signals, decide
from addon.tokens import TokenCache
from addon.vllm import Engine, EngineLoad

logger = logging.getLogger(__name__)


@dataclass
class ManagerStats:
    tokenized: int = 0
    tokenize_failures: int = 0
    tokenize_skipped_breaker: int = 0
    strategy_runs: int = 0
    lookup_failures: int = 0
    metrics_failures: int = 0
    retries: int = 0
    reused_answers: int = 0  # strategy runs on the request path's lookup answer
    # "pin:ok", "compress:failed", "evict:skipped", ...: every action and its outcome.
    actions: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class ManagerSettings:
    strategy: CacheStrategyConfig  # also says where load comes from (load_source, ...)
    retry: RetryPolicy
    hot_window: float
    request_timeout: float
    tokenize_max_chars: int = 1 << 20


class CacheManager:
    def __init__(
        self,
        *,
        settings: ManagerSettings,
        tokenizer_url: str,
        endpoint_urls: dict[str, str],
        engine: Engine,
        lmcache: LMCache | Coordinator,
        token_cache: TokenCache | None,
        tokenizer_breaker: CircuitBreaker,
        controller_breaker: CircuitBreaker,
        failure_log: RateLimitedLog,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        cpu_ratio: Callable[[], float] = lambda: psutil.cpu_percent(interval=None) / 100.0,
    ) -> None:
        self.settings = settings
        self.tokenizer_url = tokenizer_url
        self.endpoint_urls = endpoint_urls
        self.engine = engine
        self.lmcache = lmcache
        self.token_cache = token_cache
        self.tokenizer_breaker = tokenizer_breaker
        self.controller_breaker = controller_breaker
        self.failure_log = failure_log
        self.clock = clock
        self.sleep = sleep
        self.cpu_ratio = cpu_ratio
        self.stats = ManagerStats()
        self.pins = HotWindowPins()
        # A prompt's prefix compressed on its holder stays compressed: once per hot window
        # is enough, however long the load stays high (and it keeps the log short).
        self.compressed = HotWindowPins()
        self._lock = threading.Lock()
        self._has_evict: bool | None = None
        self._last_clear: dict[str, float] = {}
        # /metrics is scraped at most once a second per engine, however busy the proxy is.
        self._loads: TTLCache[str, EngineLoad] = TTLCache(256, 1.0, timer=clock)

    # -- helpers -------------------------------------------------------------------------

    def _log_failure(self, what: str, why: str) -> None:
        log_now, suppressed = self.failure_log.should_log(f"bg:{what}:{why}")
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            logger.warning(f"[kvcache] background {what} failed ({why}){more}")

    def _remaining(self, job: Job) -> float:
        return max(min(job.deadline - self.clock(), self.settings.request_timeout), 0.001)

    def _controller(self, fn: Callable[[float], Any], job: Job) -> Any:
        """One controller call with retries and the controller's breaker, inside the job's
        deadline; each attempt's timeout is what is left of it."""

        def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
            self.stats.retries += 1

        return call_with_retry(
            lambda: fn(self._remaining(job)), self.settings.retry, deadline=job.deadline,
            clock=self.clock, sleep=self.sleep, breaker=self.controller_breaker,
            on_retry=on_retry,
        )

    # -- step 1: tokens ------------------------------------------------------------------

    def tokens_for(self, req: LLMRequest, job: Job) -> tuple[int, ...] | None:
        if req.token_ids is not None:
            return req.token_ids
        if self.token_cache is not None:
            cached = self.token_cache.get(req.key)
            if cached:
                return cached
        if not req.tokenize_body or len(req.prompt) > self.settings.tokenize_max_chars:
            return None
        if not self.tokenizer_breaker.allow():
            self.stats.tokenize_skipped_breaker += 1
            return None
        try:
            tokens = tuple(self.engine.tokenize(
                self.tokenizer_url, req.tokenize_body, self._remaining(job)))
        except Exception as e:
            if service_unhealthy(e):
                self.tokenizer_breaker.record_failure()
            else:
                self.tokenizer_breaker.record_success()
            self.stats.tokenize_failures += 1
            self._log_failure("tokenize", describe_error(e))
            return None
        self.tokenizer_breaker.record_success()
        self.stats.tokenized += 1
        if self.token_cache is not None:
            self.token_cache.put(req.key, tokens)
        return tokens

    # -- step 2: signals -----------------------------------------------------------------

    def _engine_load(self, instance_id: str | None, job: Job) -> EngineLoad | None:
        url = self.endpoint_urls.get(instance_id or "")
        if url is None:
            return None
        cached = self._loads.get(url)
        if cached is not None:
            return cached
        try:
            load = self.engine.load(url, self._remaining(job))
        except Exception as e:
            self.stats.metrics_failures += 1
            self._log_failure(f"/metrics of {instance_id}", describe_error(e))
            return None
        self._loads[url] = load
        return load

    def controller_has_evict(self, job: Job) -> bool | None:
        """Probed once, on first need, and logged: LMCache 0.5.x has no /evict."""
        with self._lock:
            if self._has_evict is not None:
                return self._has_evict
        try:
            has = self.lmcache.has_evict(self._remaining(job))
        except Exception as e:
            self._log_failure("/evict probe", describe_error(e))
            return None
        with self._lock:
            if self._has_evict is None:
                self._has_evict = has
                if has:
                    logger.info("[kvcache] the LMCache controller serves /evict")
                else:
                    logger.warning(
                        "[kvcache] the LMCache controller has no /evict (LMCache 0.5.x): "
                        "eviction falls back to /clear only with eviction_clear_fallback")
        return has

    def needs_job(self, key: str, hot_count: int, answer: dict[str, int] | None) -> bool:
        """Whether the strategy could do anything for this request now; the tokens aside.

        Only pinning on (the default) and this prompt already pinned on the holder the
        request path's answer names, in this hot window: a job would only find that out
        again, so none is queued (a hot prompt is most of the traffic)."""
        if not self.might_act(hot_count):
            return False
        p = self.settings.strategy
        if p.enable_compression or p.enable_eviction or answer is None:
            return True
        known = {i: n for i, n in answer.items() if i in self.endpoint_urls and n > 0}
        holder = p.pin_instance_id or (max(known, key=known.__getitem__) if known else "")
        return not holder or not self.pins.is_pinned(
            f"{holder}\x00{key}", self.clock(), self.settings.hot_window)

    def might_act(self, hot_count: int) -> bool:
        p = self.settings.strategy
        hot = p.enable_pinning and hot_count >= p.hot_content_threshold
        return p.enable_compression or p.enable_eviction or hot

    # -- the job -------------------------------------------------------------------------

    def run(self, req: LLMRequest, job: Job, hot_count: int = 0,
            answer: dict[str, int] | None = None) -> None:
        """`answer`: the controller's lookup answer the request path already got, if any."""
        tokens = self.tokens_for(req, job)
        if not tokens or not self.might_act(hot_count):
            return
        self.strategy(req.key, tokens, hot_count, job, answer)

    def strategy(self, key: str, tokens: tuple[int, ...], hot_count: int, job: Job,
                 answer: dict[str, int] | None = None) -> None:
        p = self.settings.strategy
        self.stats.strategy_runs += 1
        if answer is None:
            try:
                answer = self._controller(lambda t: self.lmcache.lookup(tokens, t), job).matches
            except Exception as e:
                self.stats.lookup_failures += 1
                self._log_failure("LMCache lookup", describe_error(e))
                return
        else:
            self.stats.reused_answers += 1
        holder, matched = None, 0
        # Only instances that are configured endpoints: a controller call on behalf of an
        # instance id the config does not know (a host name, a stale id) is never made.
        known = {i: n for i, n in answer.items() if i in self.endpoint_urls}
        if known:
            holder, matched = max(known.items(), key=lambda kv: kv[1])
            if matched <= 0:
                holder = None
        now = self.clock()
        load: float | None = None
        memory: float | None = None
        if p.enable_compression:
            if self.settings.strategy.load_source == "cpu":
                load = max(0.0, min(1.0, self.cpu_ratio()))
            else:
                engine = self._engine_load(p.compress_instance_id or holder, job)
                if engine is not None:
                    busy = engine.running + engine.waiting
                    load = min(1.0, busy / self.settings.strategy.engine_max_requests)
        if p.enable_eviction:
            engine = self._engine_load(p.evict_instance_id or holder, job)
            memory = engine.kv_cache_usage if engine is not None else None
        has_evict = None
        if p.enable_eviction and memory is not None and memory >= p.memory_threshold:
            has_evict = self.controller_has_evict(job)
        with self._lock:
            last_clear = self._last_clear.get(p.evict_instance_id or holder or "")
        signals = Signals(
            holder=holder, matched_tokens=matched, prompt_tokens=len(tokens), load=load,
            memory=memory, hot_count=hot_count,
            already_pinned_this_window=self.pins.is_pinned(
                f"{p.pin_instance_id or holder}\x00{key}", now, self.settings.hot_window),
            controller_has_evict=has_evict, now=now, last_clear_at=last_clear,
        )
        actions, reasons = decide(p, signals)
        for reason in reasons:
            self.stats.actions[reason.split(":", 1)[0].replace(" ", ":")] += 1
            log_now, _ = self.failure_log.should_log(f"reason:{reason[:40]}")
            if log_now:
                logger.info(f"[kvcache] {reason}")
        for action in actions:
            self._act(action, key, tokens, job)

    def _act(self, action: Action, key: str, tokens: tuple[int, ...], job: Job) -> None:
        now = self.clock()
        window = self.settings.hot_window
        once = {"pin": self.pins, "compress": self.compressed}.get(action.kind)
        marked = f"{action.instance_id}\x00{key}"
        if once is not None and not once.should_pin(marked, now, window):
            self.stats.actions[f"{action.kind}:already-done"] += 1
            return  # done for this prompt on this instance in this window already
        if action.kind == "clear":
            with self._lock:
                last = self._last_clear.get(action.instance_id)
                cooldown = self.settings.strategy.clear_cooldown
                if last is not None and now - last < cooldown:
                    return
                self._last_clear[action.instance_id] = now
        a = action
        calls: dict[str, Callable[[float], int]] = {
            "pin": lambda t: self.lmcache.pin(a.instance_id, a.location, tokens, t),
            "compress": lambda t: self.lmcache.compress(
                a.instance_id, a.location, a.method, tokens, t),
            "evict": lambda t: self.lmcache.evict(a.instance_id, tokens, t),
            "clear": lambda t: self.lmcache.clear(a.instance_id, a.location, t),
        }
        try:
            n = self._controller(calls[a.kind], job)
        except Exception as e:
            self.stats.actions[f"{a.kind}:failed"] += 1
            if once is not None:
                once.forget(marked)  # let a later request try again
            self._log_failure(f"{a.kind} on {a.instance_id}", describe_error(e))
            return
        self.stats.actions[f"{a.kind}:ok"] += 1
        logger.info(f"[kvcache] {a.kind} {a.instance_id} at {a.location}: {n} tokens")

    def stats_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self.stats)
        out["actions"] = dict(self.stats.actions)
        out["controller_has_evict"] = self._has_evict
        return out
