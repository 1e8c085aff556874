"""The routing step's decisions and every fail-open path, with fake I/O."""

import asyncio
import dataclasses
from typing import Any

import pytest

from addon.lmcache import LookupResult
from addon.policy import EndpointState, LoadBalancer, PolicyParams
from addon.prefix_index import chunk_hashes
from addon.request import LLMRequest, prompt_key
from addon.resilience import CircuitBreaker, RateLimitedLog, StatusError, UnparsableResponse
from addon.router import Decision, Router
from addon.tokens import TokenCache

IDS = ["e1", "e2"]
LONG = tuple(range(600))


class FakeLookup:
    def __init__(self, answer: Any = None, delay: float = 0.0) -> None:
        self.answer = answer if answer is not None else LookupResult()
        self.delay = delay
        self.calls: list[tuple[int, ...]] = []

    async def lookup(self, tokens: Any, timeout: float) -> LookupResult:
        self.calls.append(tuple(tokens))
        if self.delay:
            async with asyncio.timeout(timeout):
                await asyncio.sleep(self.delay)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class FakeTokenizer:
    def __init__(self, tokens: Any = LONG, delay: float = 0.0) -> None:
        self.tokens = tokens
        self.delay = delay
        self.calls = 0

    async def tokenize(self, body: dict[str, Any], timeout: float) -> list[int]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.tokens, BaseException):
            raise self.tokens
        return list(self.tokens)


def make(lookup: FakeLookup, tokenizer: FakeTokenizer | None = None, budget: float = 0.2,
         cache: TokenCache | None = None, breaker: CircuitBreaker | None = None,
         policy: PolicyParams | None = None, view: str = "controller") -> Router:
    return Router(
        budget=budget, state=EndpointState(IDS, 10), balancer=LoadBalancer("round_robin"),
        token_cache=cache if cache is not None else TokenCache(100, 60), lmcache=lookup,
        tokenizer=tokenizer, controller_breaker=breaker or CircuitBreaker(3, 10, 1),
        tokenizer_breaker=CircuitBreaker(3, 10, 1), failure_log=RateLimitedLog(),
        policy=policy, view=view,
    )


def req(key: str = "k", prefix: tuple[str, ...] = ()) -> LLMRequest:
    return LLMRequest("/v1/completions", "m", "p", key, "completion", prefix,
                      tokenize_body={"model": "m", "prompt": "p"})


async def test_routes_to_the_longest_holder() -> None:
    lk = FakeLookup(LookupResult({"e1": 256, "e2": 512}))
    d = await make(lk, FakeTokenizer()).route(req())
    assert (d.endpoint_id, d.reason, d.matched_tokens, d.prompt_tokens) == (
        "e2", "cache-hit", 512, 600)
    assert d.token_source == "tokenized" and lk.calls == [LONG]


async def test_next_turn_uses_earlier_conversation_tokens_without_tokenizing() -> None:
    cache = TokenCache(10, 60)
    cache.put(prompt_key("m", "turn1"), LONG)
    lk = FakeLookup(LookupResult({"e1": 512}))
    tok = FakeTokenizer()
    d = await make(lk, tok, cache=cache).route(req("turn2", (prompt_key("m", "turn1"),)))
    assert d.endpoint_id == "e1" and d.token_source == "prefix" and tok.calls == 0


async def test_unknown_instance_is_ignored_and_counted() -> None:
    r = make(FakeLookup(LookupResult({"stranger": 512})), FakeTokenizer())
    d = await r.route(req())
    assert d.reason == "round_robin" and d.why == "unknown-instance"
    assert d.endpoint_id in IDS and r.stats.unknown_instances == 1


async def test_short_prompt_skips_the_lookup() -> None:
    lk = FakeLookup(LookupResult({"e1": 512}))
    d = await make(lk, FakeTokenizer(range(100))).route(req())
    assert d.why == "short-prompt" and lk.calls == []


@pytest.mark.parametrize(("error", "why"), [
    (StatusError(500, "boom"), "lookup-http-500"),
    (UnparsableResponse("garbage"), "lookup-bad-answer"),
    (ConnectionRefusedError(), "lookup-unreachable"),
])
async def test_lookup_failures_fail_open(error: BaseException, why: str) -> None:
    d = await make(FakeLookup(error), FakeTokenizer()).route(req())
    assert d.endpoint_id in IDS and d.reason == "round_robin" and d.why == why


async def test_slow_controller_is_cut_at_the_budget() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    d = await make(FakeLookup(LookupResult({"e1": 512}), delay=5), FakeTokenizer(),
                   budget=0.05).route(req())
    assert loop.time() - t0 < 0.5
    assert d.reason == "round_robin" and d.why == "lookup-timeout"


async def test_tokenizer_down_fails_open() -> None:
    d = await make(FakeLookup(), FakeTokenizer(ConnectionError())).route(req())
    assert d.why == "tokenize-unreachable" and d.endpoint_id in IDS


async def test_open_breaker_skips_the_lookup() -> None:
    breaker = CircuitBreaker(2, 60, 1)
    lk = FakeLookup(StatusError(503))
    r = make(lk, FakeTokenizer(), breaker=breaker)
    for _ in range(2):
        await r.route(req())
    assert breaker.is_open()
    d = await r.route(req())
    assert d.why == "controller-breaker-open" and len(lk.calls) == 2


async def test_token_ids_in_request_need_no_tokenizer() -> None:
    lk = FakeLookup(LookupResult({"e2": 256}))
    r = make(lk, None)
    request = LLMRequest("/v1/completions", "m", "p", "k", "completion", (), LONG)
    d = await r.route(request)
    assert d.endpoint_id == "e2" and d.token_source == "request"


# --- the proxy's own view (prefix index) --------------------------------------------------


def ids_req(tokens: tuple[int, ...], key: str = "t") -> LLMRequest:
    return LLMRequest("/v1/completions", "m", "", key, "completion", token_ids=tokens)


@pytest.mark.parametrize(("view", "why"), [("controller", "controller-behind"),
                                           ("kv_events", "view-behind"),
                                           ("coordinator", "view-behind")])
async def test_own_memory_beyond_the_view_is_labelled_by_the_view(view: str, why: str) -> None:
    r = make(FakeLookup(LookupResult({})), view=view)
    doc = tuple(range(2600))
    first = await r.route(ids_req(doc))
    r.started("f1", first)
    d = await r.route(ids_req(doc + (7,) * 300, "t2"))
    assert (d.reason, d.why) == ("local-hit", why)


async def test_in_flight_prefix_is_merged_before_the_controller_knows() -> None:
    r = make(FakeLookup(LookupResult({})))
    doc = tuple(range(2600))
    first = await r.route(ids_req(doc))
    assert first.reason == "round_robin" and len(first.chunks) == 10
    r.started("f1", first)
    # The controller still knows nothing (prefill not over); the index does. Waiting behind
    # the first request's prefill beats recomputing its 2560 tokens elsewhere.
    d = await r.route(ids_req(doc + (7,) * 300, "t2"))
    assert (d.endpoint_id, d.reason, d.why, d.matched_tokens) == (
        first.endpoint_id, "local-hit", "controller-behind", 2560)
    assert d.answer == "controller" and r.stats.local_hits == 1
    assert "chunks" not in d.as_metadata()
    r.finished("f1", first.endpoint_id)
    assert r.state.inflight[first.endpoint_id] == 0
    d = await r.route(ids_req(doc, "t3"))
    # Finished, and the controller still knows nothing: the proxy remembers it (issue 13).
    assert (d.endpoint_id, d.reason) == (first.endpoint_id, "local-hit")


async def test_in_flight_merge_can_be_turned_off() -> None:
    r = make(FakeLookup(LookupResult({})), policy=PolicyParams(track_inflight=False))
    r.started("f1", await r.route(ids_req(LONG)))
    assert (await r.route(ids_req(LONG, "t2"))).reason == "round_robin"


async def test_token_load_steers_away_from_a_queued_holder() -> None:
    r = make(FakeLookup(LookupResult({"e1": 512})))
    big = tuple(range(100_000, 120_000))
    # 20,000 uncached tokens queued on e1 (no first byte yet): 512 cached tokens there are
    # not worth waiting behind 10,000 tokens of it.
    r.started("big", Decision("e1", "round_robin", prompt_tokens=len(big)))
    d = await r.route(ids_req(LONG))
    assert (d.endpoint_id, d.reason) == ("e2", "cache-spill")
    r.first_byte("big")  # its prefill is over: only its decode slot counts now
    d = await r.route(ids_req(LONG, "t2"))
    assert (d.endpoint_id, d.reason) == ("e1", "cache-hit")


async def test_decoding_requests_are_not_congestion() -> None:
    # The numbers below are for these knobs, whatever the defaults.
    r = make(FakeLookup(LookupResult({"e1": 2048})),
             policy=PolicyParams(request_tokens=160, congestion_tokens=3000))
    # e1 (the holder) has a 4000-token prefill queued: 0.7 x 4000 + 160 = 2960 load.
    r.started("q", Decision("e1", "round_robin", prompt_tokens=4000))
    # e2 has five requests past their first byte, decoding: 5 x 160 = 800 load, no prefill.
    for i in range(5):
        r.started(f"d{i}", Decision("e2", "round_robin", prompt_tokens=600))
        r.first_byte(f"d{i}")
    # e2 can start this prefill now: 3000 + 800 beats 952 + 2960 on e1. Counting e2's
    # decoding requests as congestion (weight 1 + 800/3000) would keep it on e1.
    d = await r.route(ids_req(tuple(range(3000))))
    assert (d.endpoint_id, d.reason, d.why) == ("e2", "cache-spill", "holder-busy")


async def test_a_hot_prefix_gets_a_second_holder() -> None:
    prompt = tuple(range(4200))
    for half_life, want in ((10.0, ("e2", "cache-spill", "hot-prefix")),
                            (0.0, ("e1", "cache-hit", ""))):
        r = make(FakeLookup(LookupResult({"e1": 4096})),
                 policy=PolicyParams(hot_half_life=half_life))
        # e1 has 2470 tokens of other work queued (0.7 x 3300 + 160): less than the 4096
        # cached tokens are worth, more than half of them (what a copy of a hot prefix is
        # credited).
        r.started("other", Decision("e1", "round_robin", prompt_tokens=3300))
        # The first requests for the prefix go to its holder: a couple of requests do not
        # make a prefix hot.
        for i in range(2):
            d = await r.route(ids_req(prompt, f"k{i}"))
            assert (d.endpoint_id, d.reason) == ("e1", "cache-hit")
            r.started(f"k{i}", d)
        # Now it is all of the recent traffic and needs both endpoints: e2 takes a copy.
        d = await r.route(ids_req(prompt, "k2"))
        assert (d.endpoint_id, d.reason, d.why) == want


async def test_a_system_prompt_is_as_hot_as_the_sessions_that_carry_it() -> None:
    r = make(FakeLookup(LookupResult({})))
    system = tuple(range(2560))

    def call(session: int, n: int) -> tuple[int, ...]:
        return chunk_hashes(system + tuple(range(10**6 * session, 10**6 * session + n)))

    # Three sessions' calls, each matching its own history beyond the system prompt.
    for s in (1, 2, 3):
        assert r.replicas({"e1": 3584}, IDS, call(s, 1024)) == 1
    # A new session matches the system prompt only; every call so far carried it, so it
    # needs both endpoints (counting only requests whose deepest match it is: one).
    assert r.replicas({"e1": 2560}, IDS, call(4, 300)) == 2
    assert r.replicas({"e1": 3584}, IDS, call(1, 1024)) == 1  # a session stays put


async def test_prefix_shares_count_unmatched_requests_while_the_controller_is_down() -> None:
    r = make(FakeLookup(ConnectionRefusedError("down")))
    prompt = tuple(range(4200))
    for i in range(3):
        d = await r.route(ids_req(prompt, f"k{i}"))
        r.started(f"k{i}", d)
    holder = d.endpoint_id
    # Six other prompts match nothing the proxy knows; they are most of the recent traffic.
    for i in range(6):
        await r.route(ids_req(tuple(range(10_000 * (i + 1), 10_000 * (i + 1) + 600)), f"o{i}"))
    # Under half of the traffic needs one holder: the busier holder keeps it. (Counting only
    # the matched requests would make it all of the traffic and copy it to the idle one.)
    d = await r.route(ids_req(prompt, "k3"))
    assert (d.endpoint_id, d.reason) == (holder, "local-hit")


async def test_controller_down_routes_by_recently_finished_prompts() -> None:
    r = make(FakeLookup(ConnectionRefusedError("down")))
    first = await r.route(ids_req(LONG))
    assert first.why == "lookup-unreachable" and first.reason == "round_robin"
    r.started("f1", first)
    r.finished("f1", first.endpoint_id)
    for i in range(3):
        d = await r.route(ids_req(LONG, f"t{i}"))
        assert (d.endpoint_id, d.reason, d.matched_tokens) == (
            first.endpoint_id, "local-hit", 512)
        assert d.why.startswith(("lookup-", "controller-"))
    assert r.stats.local_hits == 3


async def test_an_empty_controller_still_routes_by_recently_finished_prompts() -> None:
    # A fresh or emptied controller answers, but knows nothing: the proxy's memory of what
    # it routed a moment ago still counts.
    lk = FakeLookup(LookupResult({}))
    r = make(lk)
    first = await r.route(ids_req(LONG))
    assert first.why == "no-match"
    r.started("f1", first)
    r.finished("f1", first.endpoint_id)
    d = await r.route(ids_req(LONG, "again"))
    assert (d.endpoint_id, d.reason, d.why, d.matched_tokens) == (
        first.endpoint_id, "local-hit", "controller-behind", 512)
    # Where the controller knows as much, it is a plain cache hit.
    lk.answer = LookupResult({first.endpoint_id: 512})
    d = await r.route(ids_req(LONG, "known"))
    assert (d.endpoint_id, d.reason) == (first.endpoint_id, "cache-hit")


async def test_the_next_turn_follows_the_endpoint_that_served_the_turn_before() -> None:
    # Every endpoint holds the 512-token system prompt; the turn before (645 tokens) was
    # served by e2, so only e2 holds its last 133 tokens: beyond any 256-token chunk, so
    # neither the controller nor the prefix index can tell. A request in flight on e2 (a
    # decode slot, no queued prefill) does not outweigh that.
    turn1 = tuple(range(645))
    lk = FakeLookup(LookupResult({"e1": 512, "e2": 512}))
    cache = TokenCache(100, 60)
    r = make(lk, FakeTokenizer(turn1), cache=cache)
    first = await r.route(req("turn1"))
    assert first.endpoint_id == "e1"  # a tie at 512: the less loaded, first
    # Say it went to e2 (as the load may have had it), and another request is decoding there.
    r.started("turn1", dataclasses.replace(first, endpoint_id="e2"), key="turn1")
    r.first_byte("turn1")
    d = await r.route(req("turn2", prefix=("turn1",)))
    assert d.token_source == "prefix" and d.prompt_tokens == 645
    # A cache hit: the controller names e2 too, only at its 256-token granularity.
    assert (d.endpoint_id, d.reason, d.matched_tokens) == ("e2", "cache-hit", 645)


async def test_half_open_probe_is_judged_after_the_budget() -> None:
    # The controller is back but slower than the routing budget (as under load): the probe
    # lookup times out for routing, yet its late success closes the breaker.
    t = [0.0]
    breaker = CircuitBreaker(3, 10, 2, clock=lambda: t[0])
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == "open"
    t[0] = 11.0  # recovery_timeout passed: half-open
    lk = FakeLookup(LookupResult({"e1": 512}), delay=0.1)
    r = make(lk, FakeTokenizer(), budget=0.02, breaker=breaker)
    d = await r.route(req())
    assert d.why == "lookup-timeout" and r.stats.probes == 1
    await asyncio.sleep(0.3)
    assert breaker.state == "closed"
    lk.delay = 0
    d = await r.route(req())
    assert d.reason == "cache-hit"


async def test_half_open_probe_that_fails_reopens_the_breaker() -> None:
    t = [0.0]
    breaker = CircuitBreaker(1, 10, 2, clock=lambda: t[0])
    breaker.record_failure()
    t[0] = 11.0
    r = make(FakeLookup(StatusError(500, "still down")), FakeTokenizer(), breaker=breaker)
    await r.route(req())
    await asyncio.sleep(0)
    assert breaker.state == "open"


async def test_prompts_over_the_cap_are_not_tokenized() -> None:
    tok = FakeTokenizer()
    r = make(FakeLookup(LookupResult({"e1": 512})), tok)
    r.tokenize_max_chars = 0
    d = await r.route(req())
    assert d.why == "too-long-to-tokenize" and tok.calls == 0


async def test_budget_eaten_by_the_proxy_is_proxy_saturated_not_a_slow_controller() -> None:
    # Tokenizing (on a lagging loop) used the budget before the lookup was sent.
    r = make(FakeLookup(LookupResult({"e1": 512})), FakeTokenizer(delay=0.2), budget=0.05)
    r.lag = lambda: 0.2
    d = await r.route(req())
    assert d.why == "proxy-saturated" and r.stats.saturated == 1
    assert r.slow_lookup.stats()["consecutive_failures"] == 0


async def test_a_lookup_late_on_a_lagging_loop_is_judged_by_its_outcome() -> None:
    # The loop is 200 ms behind: a lookup that misses the 50 ms budget runs on. Answered in
    # 100 ms (the lag and a little more), the controller was fine: no backoff, and
    # its answer is kept for the next request on that prefix.
    r = make(FakeLookup(LookupResult({"e2": 512}), delay=0.1), FakeTokenizer(), budget=0.05)
    r.lag = lambda: 0.2
    d = await r.route(req())
    assert d.why == "proxy-saturated" and r.stats.late_lookups == 1
    await asyncio.sleep(0.15)
    assert r.slow_lookup.stats()["consecutive_failures"] == 0
    assert r._recent_answer(chunk_hashes(LONG)) == {"e2": 512}


async def test_a_hanging_controller_is_still_found_out_on_a_lagging_loop() -> None:
    r = make(FakeLookup(LookupResult({"e1": 512}), delay=5), FakeTokenizer(), budget=0.05)
    r.probe_timeout = 0.1
    r.lag = lambda: 0.2
    await r.route(req())
    await asyncio.sleep(0.4)  # the late lookup timed out at probe_timeout
    assert r.slow_lookup.stats()["consecutive_failures"] == 1


async def test_at_rest_a_lookup_past_the_budget_is_the_controllers_fault() -> None:
    r = make(FakeLookup(LookupResult({"e1": 512}), delay=5), FakeTokenizer(), budget=0.05)
    d = await r.route(req())
    assert d.why == "lookup-timeout" and r.stats.late_lookups == 0
    assert r.slow_lookup.stats()["consecutive_failures"] == 1


async def test_a_saturated_proxy_reuses_a_recent_answer_for_the_prefix() -> None:
    lk = FakeLookup(LookupResult({"e2": 512}))
    r = make(lk, FakeTokenizer(), budget=0.05)
    d = await r.route(req())
    assert d.answer == "controller" and d.controller == {"e2": 512}
    r.busy = lambda: 0.95  # the CPU is the bottleneck
    d = await r.route(req("other-key"))
    assert (d.endpoint_id, d.reason, d.answer) == ("e2", "cache-hit", "recent-answer")
    assert len(lk.calls) == 1 and r.stats.recent_answers == 1
    r.busy = lambda: 0.3  # at rest the controller is always asked
    await r.route(req("third"))
    assert len(lk.calls) == 2


async def test_a_controller_as_slow_as_the_budget_is_slow_even_on_a_lagging_loop() -> None:
    # 80 ms answers against a 50 ms budget: the loop's 20 ms lag does not excuse them.
    r = make(FakeLookup(LookupResult({"e1": 512}), delay=0.08), FakeTokenizer(), budget=0.05)
    r.lag = lambda: 0.02
    d = await r.route(req())
    assert d.why == "proxy-saturated" and r.stats.late_lookups == 1
    await asyncio.sleep(0.2)
    assert r.slow_lookup.stats()["consecutive_failures"] == 1


async def test_a_lower_tier_answer_loses_to_a_gpu_holder_of_as_much() -> None:
    # The view says e1 holds the prompt in CPU memory, e2 on its GPU (KV events' medium):
    # with e2 a little busier, the GPU copy still wins; told nothing of tiers, e1 would.
    doc = tuple(range(4096))
    lk = FakeLookup(LookupResult({"e1": 4096, "e2": 4096}, lower_tier=frozenset({"e1"})))
    r = make(lk, policy=PolicyParams(spill_margin=0))
    busy = await r.route(ids_req(tuple(range(10**6, 10**6 + 300)), "busy"))
    r.started("b", dataclasses.replace(busy, endpoint_id="e2"))
    r.first_byte("b")
    d = await r.route(ids_req(doc + (1,) * 100, "t"))
    assert (d.endpoint_id, d.reason) == ("e2", "cache-hit")
    lk.answer = LookupResult({"e1": 4096, "e2": 4096})
    d = await r.route(ids_req(doc + (1,) * 100, "t2"))
    assert d.endpoint_id == "e1"


async def test_a_decision_carries_each_candidates_costs() -> None:
    r = make(FakeLookup(LookupResult({"e1": 512})))
    d = await r.route(ids_req(LONG))
    rows = {c["endpoint"]: c for c in d.as_metadata()["candidates"]}
    assert set(rows) == {"e1", "e2"}
    assert rows["e1"]["held_view"] == 512 and rows["e2"]["held_view"] == 0
    # The winner is the cheapest: its 88 uncached tokens against e2's 600.
    assert d.endpoint_id == "e1" and rows["e1"]["cost_tokens"] < rows["e2"]["cost_tokens"]
    r.started("f1", d)
    d2 = await r.route(ids_req(LONG, "again"))
    rows = {c["endpoint"]: c for c in d2.as_metadata()["candidates"]}
    assert rows["e1"]["held_proxy"] == 512 and rows["e1"]["load_tokens"] > 0
