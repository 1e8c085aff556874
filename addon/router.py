"""The routing step of the request hook: tokens -> LMCache lookup -> policy, inside one budget.

Async and free of mitmproxy: it takes a parsed request and returns a decision. Whatever
fails, the answer is a load-balanced endpoint and a reason; it never raises.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from addon.lmcache import LookupResult
from addon.policy import Choice, EndpointState, LoadBalancer, PolicyParams, choose
from addon.request import LLMRequest
from addon.resilience import (
    CircuitBreaker,
    RateLimitedLog,
    StatusError,
    UnparsableResponse,
    is_retryable,
)
from addon.tokens import TokenCache

logger = logging.getLogger(__name__)

# The controller hashes tokens in 256-token chunks: a shorter prompt never matches, so
# asking about one only spends the budget.
CHUNK_TOKENS = 256


class Lookup(Protocol):
    async def lookup(self, tokens: list[int] | tuple[int, ...], timeout: float) -> LookupResult:
        ...


class Tokenize(Protocol):
    async def tokenize(self, body: dict[str, Any], timeout: float) -> list[int]: ...


@dataclass(frozen=True)
class Decision:
    endpoint_id: str
    reason: str  # cache-hit, least_inflight, round_robin
    why: str = ""  # why the cache gave no answer: no-match, lookup-timeout, ...
    matched_tokens: int = 0
    prompt_tokens: int = 0
    token_source: str = ""  # exact, prefix, request (the client's ids), tokenized, ""
    lookup_ms: float | None = None
    unknown_instances: int = 0

    def as_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


@dataclass
class _Phase:
    name: str = ""  # "tokenize" or "lookup" while one is awaited
    lookup_given: float = 0.0  # seconds of budget the lookup started with


@dataclass
class RouterStats:
    routed: int = 0
    cache_hits: int = 0
    lookups: int = 0
    lookup_failures: int = 0
    unknown_instances: int = 0
    tokenized_on_path: int = 0
    breaker_skips: int = 0
    slow_skips: int = 0
    spills: int = 0


def service_unhealthy(e: BaseException) -> bool:
    """Whether a failure says the service is down (counts against its breaker): the same
    errors that are worth a retry. A 4xx or an unparsable body means it answered."""
    return is_retryable(e.status if isinstance(e, StatusError) else None, e)


def describe_error(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in type(e).__name__:
        return "timeout"
    if isinstance(e, StatusError):
        return f"http-{e.status}"
    if isinstance(e, UnparsableResponse):
        return "bad-answer"
    if "Connect" in type(e).__name__ or isinstance(e, OSError):
        return "unreachable"
    return type(e).__name__


class Router:
    def __init__(
        self,
        *,
        budget: float,
        state: EndpointState,
        balancer: LoadBalancer,
        token_cache: TokenCache | None,
        lmcache: Lookup,
        tokenizer: Tokenize | None,
        controller_breaker: CircuitBreaker,
        tokenizer_breaker: CircuitBreaker,
        failure_log: RateLimitedLog,
        policy: PolicyParams | None = None,
        slow_backoff: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or PolicyParams()
        # Timeouts at the request path's tight budget say "slow right now", not "down": they
        # do not open the services' breakers (which would stop routing for recovery_timeout,
        # and stop background tokenization too). They pause the request path's own calls for
        # `slow_backoff` after `failure_threshold` in a row, so a hanging controller costs one
        # probe per backoff, not the budget on every request.
        threshold = controller_breaker.failure_threshold
        self.slow_lookup = CircuitBreaker(threshold, slow_backoff, 1, clock, "lookup-slow")
        self.slow_tokenize = CircuitBreaker(threshold, slow_backoff, 1, clock, "tokenize-slow")
        self.budget = budget
        self.state = state
        self.balancer = balancer
        self.token_cache = token_cache
        self.lmcache = lmcache
        self.tokenizer = tokenizer
        self.controller_breaker = controller_breaker
        self.tokenizer_breaker = tokenizer_breaker
        self.failure_log = failure_log
        self.clock = clock
        self.stats = RouterStats()

    def balance(self, why: str) -> Decision:
        candidates = self.state.healthy()
        return Decision(self.balancer.pick(candidates, self.state.inflight), self.balancer.kind,
                        why)

    def _log_failure(self, what: str, why: str) -> None:
        log_now, suppressed = self.failure_log.should_log(f"{what}:{why}")
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            logger.warning(f"[kvcache] {what} failed ({why}); load-balancing instead{more}")

    async def route(self, req: LLMRequest) -> Decision:
        self.stats.routed += 1
        deadline = self.clock() + self.budget
        phase = _Phase()  # what was in flight if the budget runs out
        try:
            async with asyncio.timeout(self.budget):
                return await self._route(req, deadline, phase)
        except TimeoutError:
            # A controller (or tokenizer) that cannot answer within the budget is no use to
            # the request path: count it, so a hanging one opens its breaker.
            if phase.name == "lookup":
                self.stats.lookup_failures += 1
                self._lookup_timed_out(phase.lookup_given)
            elif phase.name == "tokenize":
                self.slow_tokenize.record_failure()
            why = f"{phase.name}-timeout" if phase.name else "budget-exceeded"
            self._log_failure("routing", why)
            return self.balance(why)
        except Exception as e:  # fail open, whatever broke
            logger.debug("[kvcache] routing error", exc_info=True)
            self._log_failure("routing", describe_error(e))
            return self.balance(f"error-{describe_error(e)}")

    async def _tokens(
        self, req: LLMRequest, deadline: float, phase: _Phase
    ) -> tuple[tuple[int, ...], str, str]:
        """(tokens, source, why-not)."""
        if req.token_ids is not None:
            return req.token_ids, "request", ""
        if self.token_cache is not None:
            tokens, source = self.token_cache.lookup(req.key, req.prefix_keys)
            if tokens:
                return tokens, source, ""
        if self.tokenizer is None or not req.tokenize_body:
            return (), "", "no-tokens"
        if not self.tokenizer_breaker.allow():
            return (), "", "tokenizer-breaker-open"
        if not self.slow_tokenize.allow():
            return (), "", "tokenizer-slow"
        phase.name = "tokenize"
        try:
            tokens_list = await self.tokenizer.tokenize(
                req.tokenize_body, max(deadline - self.clock(), 0.001))
        except Exception as e:
            why = describe_error(e)
            if why == "timeout":
                self.slow_tokenize.record_failure()
            elif service_unhealthy(e):
                self.tokenizer_breaker.record_failure()
            else:
                self.tokenizer_breaker.record_success()
            self._log_failure("tokenize on the request path", why)
            return (), "", f"tokenize-{why}"
        self.tokenizer_breaker.record_success()
        self.slow_tokenize.record_success()
        self.stats.tokenized_on_path += 1
        tokens = tuple(tokens_list)
        if self.token_cache is not None:
            self.token_cache.put(req.key, tokens)
        return tokens, "tokenized", ""

    async def _route(self, req: LLMRequest, deadline: float, phase: _Phase) -> Decision:
        tokens, source, why = await self._tokens(req, deadline, phase)
        if not tokens:
            return self.balance(why or "no-tokens")
        n = len(tokens)
        if n < CHUNK_TOKENS:
            return self._with(self.balance("short-prompt"), n, source)
        if self.controller_breaker.is_open() or not self.controller_breaker.allow():
            self.stats.breaker_skips += 1
            return self._with(self.balance("controller-breaker-open"), n, source)
        if not self.slow_lookup.allow():
            self.stats.slow_skips += 1
            return self._with(self.balance("controller-slow"), n, source)
        self.stats.lookups += 1
        t0 = self.clock()
        phase.name, phase.lookup_given = "lookup", deadline - t0
        try:
            result = await self.lmcache.lookup(tokens, max(phase.lookup_given, 0.001))
        except Exception as e:
            why = describe_error(e)
            ms = (self.clock() - t0) * 1000
            self.stats.lookup_failures += 1
            if why == "timeout":
                self._lookup_timed_out(phase.lookup_given)
            elif service_unhealthy(e):
                self.controller_breaker.record_failure()
            else:
                self.controller_breaker.record_success()
            self._log_failure("LMCache lookup", why)
            return self._with(self.balance(f"lookup-{why}"), n, source, ms)
        ms = (self.clock() - t0) * 1000
        self.controller_breaker.record_success()
        self.slow_lookup.record_success()
        candidates = self.state.healthy()
        unknown = sum(1 for i in result.matches if i not in self.state.inflight)
        if unknown:
            self.stats.unknown_instances += unknown
            self._log_failure(
                "matching LMCache instance ids to endpoint ids",
                "instance-not-an-endpoint",
            )
        choice: Choice = choose(result.matches, candidates, self.state.inflight, self.balancer,
                                prompt_tokens=n, params=self.policy)
        if choice.reason == "cache-hit":
            self.stats.cache_hits += 1
            return Decision(choice.endpoint_id, "cache-hit", "", choice.matched_tokens, n,
                            source, ms, unknown)
        if choice.reason == "cache-spill":
            self.stats.spills += 1
            return Decision(choice.endpoint_id, "cache-spill", "holder-busy", 0, n, source, ms,
                            unknown)
        why = "unknown-instance" if unknown else "no-match"
        return Decision(choice.endpoint_id, choice.reason, why, 0, n, source, ms, unknown)

    def _lookup_timed_out(self, given: float) -> None:
        # Only a lookup that had a fair share of the budget and still timed out says the
        # controller is slow; one left with scraps after a slow tokenize says nothing.
        if given >= self.budget / 2:
            self.slow_lookup.record_failure()

    @staticmethod
    def _with(d: Decision, n: int, source: str, ms: float | None = None) -> Decision:
        return Decision(d.endpoint_id, d.reason, d.why, 0, n, source, ms)
