"""The routing step of the request hook: tokens -> LMCache lookup -> policy, inside one budget.

Async and free of mitmproxy: it takes a parsed request and returns a decision. Whatever
fails, the answer is a load-balanced endpoint and a reason; it never raises.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import LRUCache, TTLCache

from addon.lmcache import LookupResult
from addon.looplag import deadline as Deadline
from addon.policy import (
    Choice,
    EndpointState,
    LoadBalancer,
    PolicyParams,
    choose,
    request_weight,
)
from addon.prefix_index import (
    CHUNK_TOKENS,
    PrefixHeat,
    PrefixIndex,
    chunk_hashes,
    merge_matches,
)
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

# The calls' own timeouts sit past the routing deadline (addon/looplag.py), which is what
# cuts them: the deadline lets an answer that arrived in its last loop pass through.
GRACE = 0.25
# CPU seconds per second of the proxy process above which it counts as saturated: one event
# loop cannot go faster, and a lookup it saves is a request it can proxy instead.
BUSY = 0.85
# Lookups at most let run past the budget at once (each holds a controller connection).
MAX_LATE = 32
# Requests remembered with the endpoint that served them (for the next turn of a chat).
MAX_SERVED = 65536


class Lookup(Protocol):
    async def lookup(self, tokens: list[int] | tuple[int, ...], timeout: float) -> LookupResult:
        ...


class Tokenize(Protocol):
    async def tokenize(self, body: dict[str, Any], timeout: float) -> list[int]: ...


@dataclass(frozen=True)
class Decision:
    endpoint_id: str
    # cache-hit, cache-spill, local-hit (the proxy's own view, the controller could not
    # answer), least_inflight, round_robin
    reason: str
    why: str = ""  # why the cache gave no answer: no-match, lookup-timeout, ...
    matched_tokens: int = 0
    prompt_tokens: int = 0
    token_source: str = ""  # exact, prefix, request (the client's ids), tokenized, ""
    lookup_ms: float | None = None
    unknown_instances: int = 0
    # The prompt's chunk hashes, for the prefix index once the request is sent; not metadata.
    chunks: tuple[int, ...] = field(default=(), repr=False, compare=False)
    # The controller's answer (instance id -> matched tokens) when the request path got one:
    # the background job reuses it instead of asking again. Not metadata.
    controller: dict[str, int] | None = field(default=None, repr=False, compare=False)
    # "controller", or "recent-answer" when a saturated proxy reused a lookup under a second
    # old for the same prefix instead of asking again.
    answer: str = ""
    # Per candidate: (endpoint, tokens the cache view says it holds, tokens the proxy's own
    # memory says it holds, estimated load in tokens, cost); for inspecting the decision.
    candidates: tuple[tuple[str, int, int, int, float], ...] = field(
        default=(), repr=False, compare=False)

    def as_metadata(self) -> dict[str, Any]:
        # Spelled out rather than dataclasses.fields(): this runs for every request.
        out: dict[str, Any] = {"endpoint_id": self.endpoint_id, "reason": self.reason,
                               "matched_tokens": self.matched_tokens,
                               "prompt_tokens": self.prompt_tokens,
                               "unknown_instances": self.unknown_instances}
        for k, v in (("why", self.why), ("token_source", self.token_source),
                     ("lookup_ms", self.lookup_ms), ("answer", self.answer)):
            if v not in (None, ""):
                out[k] = v
        if self.candidates:
            out["candidates"] = [
                {"endpoint": e, "held_view": hv, "held_proxy": hp, "load_tokens": ld,
                 "cost_tokens": round(c)} for e, hv, hp, ld, c in self.candidates]
        return out


@dataclass
class _Phase:
    name: str = ""  # "tokenize" or "lookup" while one is awaited
    lookup_given: float = 0.0  # seconds of budget the lookup started with
    chunks: tuple[int, ...] = ()  # the prompt's chunk hashes, once known
    prompt_tokens: int = 0
    source: str = ""
    cache_key: str = ""  # the token-cache key the tokens came from
    lookup_task: asyncio.Task[LookupResult] | None = None


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
    local_hits: int = 0
    probes: int = 0  # half-open probe lookups of the controller
    hook_errors: int = 0  # requests the hook could not route (load-balanced instead)
    saturated: int = 0  # routing ran out of time because the proxy's own loop was behind
    recent_answers: int = 0  # routed from a recent controller answer while saturated
    rerouted: int = 0  # moved off an endpoint ejected between routing and connecting
    late_lookups: int = 0  # lookups let run past the budget on a lagging loop


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
        probe_timeout: float = 2.0,
        tokenize_max_chars: int = 1 << 20,
        lag: Callable[[], float] = lambda: 0.0,
        busy: Callable[[], float] = lambda: 0.0,
        answer_ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        view: str = "controller",
    ) -> None:
        self.policy = policy or PolicyParams()
        # Why a match from the proxy's own memory went beyond the cache view's answer:
        # "controller-behind" for the LMCache controller (its historical name, kept for
        # dashboards), "view-behind" for the MP coordinator and KV events.
        self.behind = "controller-behind" if view == "controller" else "view-behind"
        # Timeouts at the request path's tight budget say "slow right now", not "down": they
        # do not open the services' breakers (which would stop routing for recovery_timeout,
        # and stop background tokenization too). They pause the request path's own calls for
        # `slow_backoff` after `failure_threshold` in a row, so a hanging controller costs one
        # probe per backoff, not the budget on every request.
        threshold = controller_breaker.failure_threshold
        self.slow_lookup = CircuitBreaker(threshold, slow_backoff, 1, clock, "lookup-slow")
        self.slow_tokenize = CircuitBreaker(threshold, slow_backoff, 1, clock, "tokenize-slow")
        self.budget = budget
        # A half-open breaker's probe lookup runs on past the routing budget, up to this, so
        # that its outcome (not the budget) decides whether the controller is back.
        self.probe_timeout = max(probe_timeout, budget)
        self.tokenize_max_chars = tokenize_max_chars
        # The event loop's current lag and the process's CPU use (addon/looplag.py): past
        # half the budget of lag, a budget spent before the lookup was sent is the proxy's
        # saturation, not the controller's fault; while the CPU is the bottleneck (busy) or
        # the lag exceeds the budget, recent answers are reused instead of asking again.
        self.lag = lag
        self.busy = busy
        # Recent controller answers by prefix chunk hash, reused only while saturated.
        self._answers: TTLCache[int, dict[str, int]] = TTLCache(
            4096, max(answer_ttl, 1e-9), timer=clock)
        self.answer_ttl = answer_ttl
        self._probes: set[asyncio.Task[LookupResult]] = set()
        self._late: set[asyncio.Task[LookupResult]] = set()  # lookups past the budget
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
        p = self.policy
        self.index = PrefixIndex(
            state.ids, prefill_share=p.prefill_share, request_tokens=p.request_tokens,
            recent_tokens=p.recent_tokens, clock=clock)
        self.heat = PrefixHeat(p.hot_half_life) if p.hot_half_life > 0 else None
        # Request key -> (endpoint, prompt tokens) of the requests sent. The next turn of a
        # chat is tokenized from the turn before (its key), and the endpoint that served
        # that turn holds all of its tokens, not only the whole 256-token chunks the prefix
        # index and the controller can see: a 645-token turn whose first 512 tokens are a
        # system prompt every endpoint holds would otherwise match everywhere alike.
        self._served: LRUCache[str, tuple[str, int]] = LRUCache(MAX_SERVED)
        # Other proxy replicas hear of this one's requests through this (addon/replicas.py
        # sets it when the state is shared); None: one replica, nothing to tell.
        self.share: Callable[[tuple[Any, ...]], None] | None = None

    # -- what the proxy sees of a request after routing (kvcache.py's hooks call these) --

    def started(self, rid: Hashable, d: Decision, streamed: bool = False, key: str = "",
                max_tokens: int | None = None) -> None:
        """The request was sent to `d.endpoint_id`; `streamed`: the client asked for a
        streamed answer (its first body byte will say when the prefill is over); `key`: the
        request's cache key (`LLMRequest.key`); `max_tokens`: the longest answer it asked
        for (its per-request load scales with it, `policy.request_weight`)."""
        self.state.start(d.endpoint_id)
        if key and d.prompt_tokens:
            self.remember_served(key, d.endpoint_id, d.prompt_tokens)
        uncached = d.prompt_tokens - d.matched_tokens
        weight = request_weight(max_tokens, self.policy)
        self.index.add(rid, d.endpoint_id, d.chunks, uncached, watched=streamed, weight=weight)
        if self.share is not None:
            self.share(("a", rid, d.endpoint_id, d.chunks, max(uncached, 0), streamed, key,
                        d.prompt_tokens, weight))

    def remember_served(self, key: str, endpoint_id: str, prompt_tokens: int) -> None:
        """The prompt with cache key `key` was sent to `endpoint_id` (by this replica or
        another one)."""
        if self.policy.recent_tokens:
            self._served[key] = (endpoint_id, prompt_tokens)

    def first_byte(self, rid: Hashable) -> None:
        """The first byte of a streamed response body: the endpoint's prefill is over."""
        self.index.prefill_done(rid)
        if self.share is not None:
            self.share(("p", rid))

    def engine_report(
        self, endpoint_id: str, waiting: int, running: int, seq: int,
        first_tokens: int | None = None, finished: int | None = None,
    ) -> None:
        """An engine's own queue and, when it reports them, its cumulative counts of first
        tokens and finished requests, scraped from its metrics when the proxy had sent its
        requests up to number `seq` (`PrefixIndex.engine_report`)."""
        self.index.engine_report(endpoint_id, waiting, running, seq, first_tokens, finished)

    def engine_lost(self, endpoint_id: str) -> None:
        """The engine's metrics could not be read: the proxy's own view alone counts."""
        self.index.engine_lost(endpoint_id)

    def cache_lost(self, endpoint_id: str) -> None:
        """The endpoint's server restarted (its KV events say so): its prefix cache is
        empty, so neither what finished there nor the turns it served count as held."""
        self.index.forget_recent(endpoint_id)
        for key in [k for k, (e, _) in self._served.items() if e == endpoint_id]:
            del self._served[key]

    def finished(self, rid: Hashable, endpoint_id: str) -> None:
        """The response ended or failed."""
        self.state.finish(endpoint_id)
        self.index.remove(rid)
        if self.share is not None:
            # Even if the index had already dropped it (at its bound): peers may not have.
            self.share(("r", rid))

    def load_tokens(self) -> dict[str, int] | None:
        return self.index.load() if self.policy.load_unit == "tokens" else None

    def prefill_tokens(self) -> dict[str, int] | None:
        return self.index.prefill_load() if self.policy.load_unit == "tokens" else None

    def balance(self, why: str) -> Decision:
        candidates = self.state.healthy()
        load = self.load_tokens()
        eid = self.balancer.pick(candidates, self.state.inflight if load is None else load)
        return Decision(eid, self.balancer.kind, why)

    def fallback(self, why: str, phase: _Phase, ms: float | None = None) -> Decision:
        """No controller answer: the proxy's own view of in-flight and recently finished
        prompts, else the balancer."""
        chunks, n = phase.chunks, phase.prompt_tokens
        p = self.policy
        if chunks and (p.track_inflight or p.recent_tokens):
            matches = self._own_matches(chunks, phase.cache_key)
            candidates = self.state.healthy()
            # Counted with or without a match, as with the controller: shares stay shares.
            replicas = self.replicas(matches, candidates, chunks)
            if matches:
                choice = choose(matches, candidates, self.state.inflight,
                                self.balancer, prompt_tokens=n, params=p,
                                load_tokens=self.load_tokens(), replicas=replicas,
                                prefill_tokens=self.prefill_tokens())
                if choice.reason == "cache-hit":
                    self.stats.local_hits += 1
                    table = tuple((e, 0, matches.get(e, 0), ld, c)
                                  for e, _, ld, c in choice.costs)
                    return Decision(choice.endpoint_id, "local-hit", why, choice.matched_tokens,
                                    n, phase.source, ms, chunks=chunks, candidates=table)
        return self._with(self.balance(why), n, phase.source, ms, chunks)

    def _own_matches(self, chunks: tuple[int, ...], cache_key: str) -> dict[str, int]:
        """What the proxy itself knows each endpoint holds of this prompt: the prefixes of
        requests in flight and recently finished, and the whole earlier prompt (a chat's
        previous turn) the tokens came from, where it was served."""
        p = self.policy
        out = self.index.local_matches(chunks, inflight=p.track_inflight,
                                       recent=p.recent_tokens > 0)
        served = self._served.get(cache_key) if cache_key and p.recent_tokens else None
        if served is not None and served[1] > out.get(served[0], 0):
            out[served[0]] = served[1]
        return out

    def replicas(
        self, matches: dict[str, int], candidates: list[str], chunks: tuple[int, ...]
    ) -> int:
        """How many endpoints should hold this prompt's matched prefix, from its share of
        the recent requests (1 unless the prefix is hot); counts this request."""
        if self.heat is None:
            return 1
        top = min(max((matches.get(c, 0) for c in candidates), default=0) // CHUNK_TOKENS,
                  len(chunks))
        count, share = self.heat.record(chunks, top, self.clock())
        # A handful of requests make any prefix look like all of the traffic: until it has
        # had more recent requests than there are endpoints, its share says nothing.
        if count <= len(candidates):
            return 1
        return max(1, math.ceil(share * len(candidates) - self.policy.hot_headroom))

    def _log_failure(self, what: str, why: str) -> None:
        log_now, suppressed = self.failure_log.should_log(f"{what}:{why}")
        if log_now:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            logger.warning(f"[kvcache] {what} failed ({why}); routing without it{more}")

    async def route(self, req: LLMRequest) -> Decision:
        self.stats.routed += 1
        deadline = self.clock() + self.budget
        phase = _Phase()  # what was in flight if the budget runs out
        dl = Deadline(self.budget)
        try:
            async with dl:
                return await self._route(req, deadline, phase)
        except TimeoutError:
            lagging = max(dl.late, self.lag()) > self.budget / 4
            if phase.name == "lookup" and phase.lookup_given >= self.budget / 2:
                # The controller had the budget; was it slow, or was the proxy's own loop
                # too far behind to read its answer in time? On a lagging loop the lookup
                # runs on and its outcome decides (_late_done); at rest it is cut here.
                saturated = lagging
                if lagging:  # judged by its outcome if there is room for one more
                    self._keep_late(phase.lookup_task)
            else:
                # The budget went before the lookup was sent: the proxy's doing if it lags.
                saturated = self.lag() > self.budget / 2
            if phase.lookup_task is not None and phase.lookup_task not in self._late:
                phase.lookup_task.cancel()
            if saturated:
                # The proxy's own loop ate the budget (before the lookup was sent, or while its
                # answer waited to be read): not the controller's fault. Said once a minute
                # and counted, never silently.
                self.stats.saturated += 1
                log_now, n = self.failure_log.should_log("proxy-saturated")
                if log_now:
                    more = f" ({n} more since the last report)" if n else ""
                    logger.warning(
                        f"[kvcache] proxy saturated: event loop {self.lag() * 1000:.0f} ms "
                        f"behind; routing from recent answers and the proxy's memory{more}")
                return self.fallback("proxy-saturated", phase)
            # A controller (or tokenizer) that cannot answer within the budget is no use to
            # the request path: count it, so a hanging one opens its breaker.
            if phase.name == "lookup":
                self.stats.lookup_failures += 1
                self._lookup_timed_out(phase.lookup_given)
            elif phase.name == "tokenize":
                self.slow_tokenize.record_failure()
            why = f"{phase.name}-timeout" if phase.name else "budget-exceeded"
            self._log_failure("routing", why)
            return self.fallback(why, phase)
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
            cached, source, phase.cache_key = self.token_cache.lookup_entry(
                req.key, req.prefix_keys)
            if cached:
                return cached, source, ""  # type: ignore[return-value]
        if self.tokenizer is None or not req.tokenize_body:
            return (), "", "no-tokens"
        if len(req.prompt) > self.tokenize_max_chars:
            return (), "", "too-long-to-tokenize"
        if not self.tokenizer_breaker.allow():
            return (), "", "tokenizer-breaker-open"
        if not self.slow_tokenize.allow():
            return (), "", "tokenizer-slow"
        phase.name = "tokenize"
        try:
            tokens_list = await self.tokenizer.tokenize(
                req.tokenize_body, max(deadline - self.clock(), 0.001) + GRACE)
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
        if self.token_cache is not None:
            self.token_cache.put(req.key, tokens_list)
        phase.cache_key = req.key
        return tokens_list, "tokenized", ""  # type: ignore[return-value]

    async def _route(self, req: LLMRequest, deadline: float, phase: _Phase) -> Decision:
        tokens, source, why = await self._tokens(req, deadline, phase)
        if not tokens:
            return self.balance(why or "no-tokens")
        n = len(tokens)
        phase.prompt_tokens, phase.source = n, source
        if n < CHUNK_TOKENS:
            # The controller hashes 256-token chunks: a shorter prompt never matches, so
            # asking about one only spends the budget.
            return self._with(self.balance("short-prompt"), n, source)
        chunks = self._chunks_of(tokens, phase.cache_key)
        phase.chunks = chunks
        if self.controller_breaker.is_open():
            self.stats.breaker_skips += 1
            return self.fallback("controller-breaker-open", phase)
        probe = self.controller_breaker.state == CircuitBreaker.HALF_OPEN
        if not self.controller_breaker.allow():
            self.stats.breaker_skips += 1
            return self.fallback("controller-breaker-open", phase)
        if self.saturated() and (recent := self._recent_answer(chunks)):
            # Saturated: spend less per request rather than time out (an answer under
            # answer_ttl old for this prefix, merged with the proxy's own view below).
            self.stats.recent_answers += 1
            return self._decide(recent, chunks, n, source, None, "recent-answer",
                                phase.cache_key)
        if not self.slow_lookup.allow():
            self.stats.slow_skips += 1
            return self.fallback("controller-slow", phase)
        self.stats.lookups += 1
        t0 = self.clock()
        phase.name, phase.lookup_given = "lookup", deadline - t0
        try:
            if probe:
                result = await asyncio.shield(self._probe(tokens))
            else:
                # A task, so that on a lagging loop it can outlive the budget (route()).
                task = phase.lookup_task = asyncio.ensure_future(
                    self.lmcache.lookup(tokens, self.probe_timeout))
                task.add_done_callback(
                    lambda t, t0=t0, chunks=chunks: self._late_done(t, t0, chunks))
                result = await asyncio.shield(task)
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
            return self.fallback(f"lookup-{why}", phase, ms)
        ms = (self.clock() - t0) * 1000
        self.controller_breaker.record_success()
        self.slow_lookup.record_success()
        if self.answer_ttl > 0:
            self._answers[chunks[-1]] = result.matches
        return self._decide(result.matches, chunks, n, source, ms, "controller",
                            phase.cache_key, result.lower_tier)

    def _chunks_of(self, tokens: tuple[int, ...], cache_key: str) -> tuple[int, ...]:
        """The chunk hashes, remembered with the cached tokens they came from."""
        tc = self.token_cache
        if tc is None or not cache_key:
            return chunk_hashes(tokens)
        chunks = tc.chunks(cache_key)
        if chunks is None:
            chunks = chunk_hashes(tokens)
            tc.put_chunks(cache_key, chunks)
        return chunks

    def saturated(self) -> bool:
        return self.busy() >= BUSY or self.lag() > self.budget

    def _recent_answer(self, chunks: tuple[int, ...]) -> dict[str, int] | None:
        """The most recent controller answer for the longest prefix of these chunks, capped
        at that prefix's length."""
        if self.answer_ttl <= 0:
            return None
        for i in range(len(chunks) - 1, -1, -1):
            found = self._answers.get(chunks[i])
            if found is not None:
                cap = (i + 1) * CHUNK_TOKENS
                return {k: min(v, cap) for k, v in found.items()} or None
        return None

    def _decide(self, answer: dict[str, int], chunks: tuple[int, ...], n: int, source: str,
                ms: float | None, how: str, cache_key: str = "",
                lower_tier: frozenset[str] = frozenset()) -> Decision:
        candidates = self.state.healthy()
        unknown = sum(1 for i in answer if i not in self.state.inflight)
        if unknown:
            self.stats.unknown_instances += unknown
            self._log_failure(
                "matching LMCache instance ids to endpoint ids",
                "instance-not-an-endpoint",
            )
        matches: dict[str, int] | Any = answer
        p = self.policy
        own: dict[str, int] = {}
        if p.track_inflight or p.recent_tokens:
            # The controller learns a prefix only once its prefill is over and its worker
            # reported it; a fresh, emptied or lagging controller knows less still. What
            # the proxy routed (in flight, and recently finished) counts whatever it says.
            own = self._own_matches(chunks, cache_key)
            matches = merge_matches(answer, own)
        # A lower-tier match counts as one only where the proxy's own memory (a prefill it
        # sent there, so on the GPU) does not cover as much.
        lower = ({e for e in lower_tier if answer.get(e, 0) > own.get(e, 0)}
                 if lower_tier else ())
        choice: Choice = choose(matches, candidates, self.state.inflight, self.balancer,
                                prompt_tokens=n, params=p,
                                load_tokens=self.load_tokens(),
                                prefill_tokens=self.prefill_tokens(),
                                replicas=self.replicas(matches, candidates, chunks),
                                lower_tier=lower)
        table = tuple((e, answer.get(e, 0), own.get(e, 0), ld, c)
                      for e, _, ld, c in choice.costs)
        if choice.reason == "cache-hit":
            if choice.matched_tokens >= answer.get(choice.endpoint_id, 0) + CHUNK_TOKENS:
                # The match is the proxy's own memory, at least a chunk beyond what the
                # controller reports there (less is only its 256-token granularity: the
                # tail of a chat's previous turn on the endpoint the controller names).
                self.stats.local_hits += 1
                why = "unknown-instance" if unknown else self.behind
                return Decision(choice.endpoint_id, "local-hit", why, choice.matched_tokens,
                                n, source, ms, unknown, chunks, answer, how, table)
            self.stats.cache_hits += 1
            return Decision(choice.endpoint_id, "cache-hit", "", choice.matched_tokens, n,
                            source, ms, unknown, chunks, answer, how, table)
        if choice.reason in ("cache-spill", "hot-spread"):
            self.stats.spills += 1
            why = "holder-busy" if choice.reason == "cache-spill" else "hot-prefix"
            return Decision(choice.endpoint_id, "cache-spill", why, 0, n, source, ms,
                            unknown, chunks, answer, how, table)
        why = "unknown-instance" if unknown else "no-match"
        return Decision(choice.endpoint_id, choice.reason, why, 0, n, source, ms, unknown,
                        chunks, answer, how)

    def _probe(self, tokens: tuple[int, ...]) -> asyncio.Task[LookupResult]:
        """A half-open probe: a lookup that outlives the routing budget, judged by its
        outcome. Under load a probe that merely misses the 50 ms budget would otherwise leave
        the breaker half-open, admitting two probes per recovery window, for as long as the
        load lasts."""
        self.stats.probes += 1
        task = asyncio.ensure_future(self.lmcache.lookup(tokens, self.probe_timeout))
        self._probes.add(task)
        task.add_done_callback(self._probe_done)
        return task

    def _probe_done(self, task: asyncio.Task[LookupResult]) -> None:
        self._probes.discard(task)
        if task.cancelled():
            return
        e = task.exception()
        if e is None or not (service_unhealthy(e) or describe_error(e) == "timeout"):
            self.controller_breaker.record_success()
            self.slow_lookup.record_success()
        else:
            self.controller_breaker.record_failure()

    def _keep_late(self, task: asyncio.Task[LookupResult] | None) -> None:
        """Let a lookup that missed the budget on a lagging loop run on, to be judged by its
        outcome; at most MAX_LATE at once (a hanging controller must not collect sockets)."""
        if task is None or task.done() or len(self._late) >= MAX_LATE:
            return
        self._late.add(task)
        self.stats.late_lookups += 1
        # Past the budget plus a few passes of the lag, a late answer would be judged slow
        # anyway: stop waiting then, so a hanging controller is found out that soon.
        wait = self.budget + 3 * self.lag() + GRACE
        asyncio.get_running_loop().call_later(wait, self._late_expired, task)

    def _late_expired(self, task: asyncio.Task[LookupResult]) -> None:
        if task in self._late and not task.done():
            self._late.discard(task)
            task.cancel()
            self.slow_lookup.record_failure()

    def _late_done(self, task: asyncio.Task[LookupResult], t0: float,
                   chunks: tuple[int, ...]) -> None:
        """A lookup that outlived the budget ended: was the controller slow, or the proxy?
        Its answer time less the loop's lag says; the answer itself is kept for reuse."""
        if task not in self._late:
            return  # answered within the budget (judged inline) or cut at the deadline
        self._late.discard(task)
        if task.cancelled():
            return
        e = task.exception()
        if e is not None:
            if describe_error(e) == "timeout":
                self.slow_lookup.record_failure()
            elif service_unhealthy(e):
                self.controller_breaker.record_failure()
            return
        self.controller_breaker.record_success()
        # Reading an answer on a pooled connection waits one loop pass, as late as the loop's
        # lag: an answer within (most of) the budget once that is taken off was the proxy's
        # delay; a controller that itself takes the budget (or more) is slow, however busy
        # the proxy is (waiting on it would cost every request the whole budget).
        if self.clock() - t0 - self.lag() <= 0.9 * self.budget:
            self.slow_lookup.record_success()
        else:
            self.slow_lookup.record_failure()
        if self.answer_ttl > 0 and chunks:
            self._answers[chunks[-1]] = task.result().matches

    def _lookup_timed_out(self, given: float) -> None:
        # Only a lookup that had a fair share of the budget and still timed out says the
        # controller is slow; one left with scraps after a slow tokenize says nothing.
        if given >= self.budget / 2:
            self.slow_lookup.record_failure()

    @staticmethod
    def _with(d: Decision, n: int, source: str, ms: float | None = None,
              chunks: tuple[int, ...] = ()) -> Decision:
        return Decision(d.endpoint_id, d.reason, d.why, 0, n, source, ms, chunks=chunks)
