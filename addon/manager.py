"""The background job run for each LLM request, in the background pool's threads.

It tokenizes the prompt through vLLM `/tokenize` (in the request's own form, so the chat
template applies) and stores the tokens, so later requests (the next turn of a chat
included) route without waiting on the network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from addon.background import Job
from addon.request import LLMRequest
from addon.resilience import CircuitBreaker, RateLimitedLog, StatusError
from addon.router import describe_error
from addon.tokens import TokenCache
from addon.vllm import Engine

logger = logging.getLogger(__name__)


@dataclass
class ManagerStats:
    tokenized: int = 0
    tokenize_failures: int = 0
    tokenize_skipped_breaker: int = 0


class CacheManager:
    def __init__(
        self,
        *,
        tokenizer_url: str,
        engine: Engine,
        token_cache: TokenCache | None,
        tokenizer_breaker: CircuitBreaker,
        failure_log: RateLimitedLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokenizer_url = tokenizer_url
        self.engine = engine
        self.token_cache = token_cache
        self.tokenizer_breaker = tokenizer_breaker
        self.failure_log = failure_log
        self.clock = clock
        self.stats = ManagerStats()

    def _log_failure(self, what: str, why: str) -> None:
        log_now, suppressed = self.failure_log.should_log(f"bg:{what}:{why}")
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            logger.warning(f"[kvcache] background {what} failed ({why}){more}")

    def tokens_for(self, req: LLMRequest, job: Job) -> tuple[int, ...] | None:
        if req.token_ids is not None:
            return req.token_ids
        if self.token_cache is not None:
            cached = self.token_cache.get(req.key)
            if cached:
                return cached
        if not req.tokenize_body:
            return None
        if not self.tokenizer_breaker.allow():
            self.stats.tokenize_skipped_breaker += 1
            return None
        try:
            tokens = tuple(self.engine.tokenize(
                self.tokenizer_url, req.tokenize_body, max(job.deadline - self.clock(), 0.001)))
        except Exception as e:
            if not isinstance(e, StatusError) or e.status >= 500:
                self.tokenizer_breaker.record_failure()
            self.stats.tokenize_failures += 1
            self._log_failure("tokenize", describe_error(e))
            return None
        self.tokenizer_breaker.record_success()
        self.stats.tokenized += 1
        if self.token_cache is not None:
            self.token_cache.put(req.key, tokens)
        return tokens

    def run(self, req: LLMRequest, job: Job) -> None:
        self.tokens_for(req, job)
