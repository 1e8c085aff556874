from addon.policy import EndpointState, LoadBalancer, best_holder, choose

IDS = ["e1", "e2", "e3"]


def test_most_matched_wins_and_ties_go_to_less_loaded() -> None:
    assert best_holder({"e1": 256, "e2": 768}, IDS, {}) == ("e2", 768)
    assert best_holder({"e1": 512, "e2": 512}, IDS, {"e1": 3, "e2": 1}) == ("e2", 512)
    assert best_holder({"e1": 512, "e2": 512}, IDS, {"e1": 0, "e2": 1}) == ("e1", 512)


def test_unknown_unhealthy_and_zero_are_not_matches() -> None:
    assert best_holder({"intruder": 9999, "e1": 0}, IDS, {}) is None
    assert best_holder({"e3": 512}, ["e1", "e2"], {}) is None  # e3 is down


def test_choose_falls_back_to_balancer() -> None:
    lb = LoadBalancer("least_inflight")
    c = choose({}, IDS, {"e1": 2, "e2": 0, "e3": 1}, lb)
    assert (c.endpoint_id, c.reason) == ("e2", "least_inflight")
    hit = choose({"e3": 256}, IDS, {}, lb)
    assert (hit.endpoint_id, hit.reason, hit.matched_tokens) == ("e3", "cache-hit", 256)


def test_round_robin_cycles() -> None:
    lb = LoadBalancer("round_robin")
    assert [lb.pick(IDS, {}) for _ in range(4)] == ["e1", "e2", "e3", "e1"]


def test_least_inflight_spreads_ties() -> None:
    lb = LoadBalancer("least_inflight")
    assert {lb.pick(IDS, {}) for _ in range(3)} == set(IDS)


def test_endpoint_state_health_and_inflight() -> None:
    t = [0.0]
    s = EndpointState(IDS, cooldown=10, clock=lambda: t[0])
    s.start("e1")
    s.start("e1")
    s.finish("e1")
    assert s.inflight["e1"] == 1 and s.routed["e1"] == 2
    s.mark_down("e2")
    assert s.healthy() == ["e1", "e3"]
    t[0] = 11
    assert s.healthy() == IDS
    for e in IDS:
        s.mark_down(e)
        t[0] += 1
    # All down: one is tried rather than the request refused; not the least loaded (a dead
    # endpoint fails fast and so always looks least loaded) but, with none healthy since its
    # last failure, the one that has been failing the longest (addon/health.py).
    assert s.healthy() == ["e1"]


def test_cost_policy_keeps_affinity_until_the_holder_is_much_busier() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    # No floor: the cost rule alone (the floor would keep the request up to 3 x 256 queued).
    p = PolicyParams("cost", load_weight_tokens=256, spill_floor_tokens=0)
    # 3000-token history held by e1: it stays there despite a few requests in flight.
    c = choose({"e1": 2816, "e2": 512}, IDS, {"e1": 4, "e2": 0, "e3": 0}, lb, 3100, p)
    assert (c.endpoint_id, c.reason) == ("e1", "cache-hit")
    # A shared 512-token system prompt is not worth queueing behind 3 more requests.
    c = choose({"e1": 512}, IDS, {"e1": 3, "e2": 0, "e3": 1}, lb, 800, p)
    assert (c.endpoint_id, c.reason) == ("e2", "cache-spill")
    # The seed's rule ignores load entirely.
    c = choose({"e1": 512}, IDS, {"e1": 3, "e2": 0, "e3": 1}, lb, 800,
               PolicyParams("longest_match"))
    assert c.endpoint_id == "e1"


def test_cost_policy_prefers_a_second_holder_when_the_first_is_busy() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    c = choose({"e1": 1024, "e2": 768}, IDS, {"e1": 5, "e2": 0, "e3": 0}, lb, 1100,
               PolicyParams("cost", 256, spill_floor_tokens=0))
    assert (c.endpoint_id, c.reason, c.matched_tokens) == ("e2", "cache-hit", 768)


def test_token_load_replaces_request_counts() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    p = PolicyParams()  # load in tokens
    # e1 holds 2048 of 2500 tokens but has 3000 tokens of prefill queued: the cold e2 (no
    # queue) costs 2500 < 452 + 3000. In requests, e1 (1 in flight) would keep it.
    c = choose({"e1": 2048}, IDS, {"e1": 1, "e2": 5, "e3": 5}, lb, 2500, p,
               load_tokens={"e1": 3000, "e2": 0, "e3": 100})
    assert (c.endpoint_id, c.reason) == ("e2", "cache-spill")
    c = choose({"e1": 2048}, IDS, {"e1": 1, "e2": 5, "e3": 5}, lb, 2500,
               PolicyParams(load_unit="requests"), load_tokens={"e1": 3000, "e2": 0, "e3": 100})
    assert c.endpoint_id == "e1"
    # A small queue does not outweigh the cached prefix.
    c = choose({"e1": 2048}, IDS, {}, lb, 2500, p, load_tokens={"e1": 1000, "e2": 0, "e3": 0})
    assert (c.endpoint_id, c.reason, c.matched_tokens) == ("e1", "cache-hit", 2048)
    # No match: the balancer picks the least loaded in tokens, not in requests.
    c = choose({}, IDS, {"e1": 0, "e2": 3, "e3": 3}, lb, 500, p,
               load_tokens={"e1": 900, "e2": 100, "e3": 200})
    assert c.endpoint_id == "e2"


def test_hot_prefix_spreads_to_the_least_loaded_non_holder() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    p = PolicyParams(hot_copy_credit=0.5, spill_floor_tokens=0)
    load = {"e1": 2500, "e2": 0, "e3": 300}
    # The prefix needs two holders and has one: idle e2 takes a copy. It is credited half
    # the prefix (5000 - 2048 = 2952 tokens) against the holder's 904 uncached + 2500 queued.
    c = choose({"e1": 4096}, IDS, {}, lb, 5000, p, load_tokens=load, replicas=2)
    assert (c.endpoint_id, c.reason) == ("e2", "hot-spread")
    # A prefix that needs one holder stays on it: a full recompute (5000) costs more.
    c = choose({"e1": 4096}, IDS, {}, lb, 5000, p, load_tokens=load, replicas=1)
    assert (c.endpoint_id, c.reason, c.matched_tokens) == ("e1", "cache-hit", 4096)
    # A holder queued less than half the prefix keeps a hot prefix (904 + 600 < 2952) ...
    light = {"e1": 600, "e2": 0, "e3": 300}
    c = choose({"e1": 4096}, IDS, {}, lb, 5000, p, load_tokens=light, replicas=2)
    assert (c.endpoint_id, c.reason) == ("e1", "cache-hit")
    # ... unless a copy is credited in full: then any less loaded endpoint takes one.
    c = choose({"e1": 4096}, IDS, {}, lb, 5000,
               PolicyParams(hot_copy_credit=1.0, spill_floor_tokens=0),
               load_tokens=light, replicas=2)
    assert (c.endpoint_id, c.reason) == ("e2", "hot-spread")
    # Enough holders: the less loaded holder, no new copy.
    c = choose({"e1": 4096, "e3": 4096}, IDS, {}, lb, 5000, p, load_tokens=load, replicas=2)
    assert (c.endpoint_id, c.reason) == ("e3", "cache-hit")
    # A holder as idle as the rest keeps the request (ties go to the match).
    idle = {"e1": 0, "e2": 0, "e3": 0}
    c = choose({"e1": 4096}, IDS, {}, lb, 5000, PolicyParams(hot_copy_credit=1.0),
               load_tokens=idle, replicas=3)
    assert (c.endpoint_id, c.reason) == ("e1", "cache-hit")


def test_congestion_weighs_uncached_tokens_up() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    # e1 holds 2048 of 3000 tokens behind 4000 queued tokens; every other endpoint has at
    # least 1500 queued. Counted 1:1, the cold e2 is cheaper (3000 + 1500 < 952 + 4000)...
    busy = {"e1": 4000, "e2": 1500, "e3": 2000}
    c = choose({"e1": 2048}, IDS, {}, lb, 3000, PolicyParams(congestion_tokens=0),
               load_tokens=busy)
    assert (c.endpoint_id, c.reason) == ("e2", "cache-spill")
    # ...but with no endpoint idle, recomputing 2048 cached tokens delays everyone queued
    # behind them on e2: each uncached token weighs 1 + 1500/2000.
    c = choose({"e1": 2048}, IDS, {}, lb, 3000, PolicyParams(congestion_tokens=2000),
               load_tokens=busy)
    assert (c.endpoint_id, c.reason) == ("e1", "cache-hit")
    # One idle endpoint: no congestion, the plain cost decides again.
    c = choose({"e1": 2048}, IDS, {}, lb, 3000, PolicyParams(congestion_tokens=2000),
               load_tokens={**busy, "e3": 0})
    assert (c.endpoint_id, c.reason) == ("e3", "cache-spill")
    # Congestion is queued prefill only: requests decoding on e2 (its load is all
    # per-request tokens, nothing left to prefill) leave it free to prefill now.
    c = choose({"e1": 2048}, IDS, {}, lb, 3000, PolicyParams(congestion_tokens=2000),
               load_tokens=busy, prefill_tokens={"e1": 3000, "e2": 0, "e3": 1000})
    assert (c.endpoint_id, c.reason) == ("e2", "cache-spill")


def test_leaving_the_best_holder_must_pay_in_queued_prefill() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    p = PolicyParams(spill_floor_tokens=0)  # load in tokens; the floor is tested below
    # e1 holds 640 of the prompt, e2 and e3 the 512-token system prompt. e1 has two
    # requests decoding (320 tokens of load, no prefill queued): the 128 tokens e2 would
    # recompute are not worth a move that saves no queueing.
    load = {"e1": 320, "e2": 0, "e3": 0}
    c = choose({"e1": 640, "e2": 512, "e3": 512}, IDS, {}, lb, 700, p, load_tokens=load,
               prefill_tokens={"e1": 0, "e2": 0, "e3": 0})
    assert (c.endpoint_id, c.reason, c.matched_tokens) == ("e1", "cache-hit", 640)
    # With prefill queued on e1 beyond those 128 tokens, the move pays.
    c = choose({"e1": 640, "e2": 512, "e3": 512}, IDS, {}, lb, 700, p,
               load_tokens={"e1": 620, "e2": 0, "e3": 0},
               prefill_tokens={"e1": 300, "e2": 0, "e3": 0})
    assert (c.endpoint_id, c.matched_tokens) == ("e2", 512)
    # The spill floor does not hold it back: it counts at most twice the 128 tokens the
    # move recomputes, and 300 are queued.
    c = choose({"e1": 640, "e2": 512, "e3": 512}, IDS, {}, lb, 700, PolicyParams(),
               load_tokens={"e1": 620, "e2": 0, "e3": 0},
               prefill_tokens={"e1": 300, "e2": 0, "e3": 0})
    assert (c.endpoint_id, c.matched_tokens) == ("e2", 512)
    # The same for a spill to an endpoint that holds nothing.
    c = choose({"e1": 512}, IDS, {}, lb, 800, p, load_tokens={"e1": 480, "e2": 0, "e3": 0},
               prefill_tokens={"e1": 0, "e2": 0, "e3": 0})
    assert (c.endpoint_id, c.reason) == ("e1", "cache-hit")


def test_a_spill_margin_keeps_requests_with_their_prefix_longer() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    # e1 has 600 tokens of prefill queued: waiting for it costs more than recomputing the
    # 512 tokens it holds, so by default the request moves; a margin of 2 keeps requests
    # there until more than 2 x 512 tokens are queued.
    kw = dict(load_tokens={"e1": 600, "e2": 0, "e3": 0},
              prefill_tokens={"e1": 600, "e2": 0, "e3": 0})
    p = PolicyParams(spill_floor_tokens=0)
    assert choose({"e1": 512}, IDS, {}, lb, 800, p, **kw).endpoint_id == "e2"
    c = choose({"e1": 512}, IDS, {}, lb, 800, PolicyParams(spill_margin=2.0, spill_floor_tokens=0),
               **kw)
    assert (c.endpoint_id, c.reason) == ("e1", "cache-hit")


def test_a_spill_floor_keeps_requests_while_little_prefill_is_queued() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")

    def on(queued: int, p: PolicyParams) -> str:
        kw = dict(load_tokens={"e1": queued + 48, "e2": 0, "e3": 0},
                  prefill_tokens={"e1": queued, "e2": 0, "e3": 0})
        c = choose({"e1": 512}, IDS, {}, lb, 645, p, **kw)
        assert c.reason == "cache-hit" or c.endpoint_id != "e1"
        return c.endpoint_id

    # A cold start: the first request's ~640-token prompt is still prefilling on e1 when
    # the next ones, sharing its 512-token system prompt, arrive. Without a floor they are
    # sent to copy that prompt elsewhere; with one they stay while at most 768 tokens of
    # prefill are queued there, and leave once more are.
    assert on(600, PolicyParams(spill_floor_tokens=0)) != "e1"
    assert on(600, PolicyParams(spill_floor_tokens=768)) == "e1"
    assert on(768, PolicyParams(spill_floor_tokens=768)) == "e1"
    assert on(900, PolicyParams(spill_floor_tokens=768)) != "e1"
    # The floor and the margin: whichever allows more queued prefill holds.
    assert on(900, PolicyParams(spill_floor_tokens=768, spill_margin=2.0)) == "e1"
    assert on(1100, PolicyParams(spill_floor_tokens=768, spill_margin=2.0)) != "e1"
    # A small holder is not worth a long wait: at most twice what a move recomputes counts.
    kw = dict(load_tokens={"e1": 400, "e2": 0, "e3": 0},
              prefill_tokens={"e1": 352, "e2": 0, "e3": 0})
    p = PolicyParams(spill_floor_tokens=768)
    assert choose({"e1": 128}, IDS, {}, lb, 1000, p, **kw).endpoint_id != "e1"
    kw["prefill_tokens"] = {"e1": 256, "e2": 0, "e3": 0}
    assert choose({"e1": 128}, IDS, {}, lb, 1000, p, **kw).endpoint_id == "e1"


def test_a_lower_tier_hit_costs_a_load_but_beats_a_recompute() -> None:
    from addon.policy import PolicyParams

    lb = LoadBalancer("least_inflight")
    p = PolicyParams()
    load = {"e1": 100, "e2": 0, "e3": 0}
    prefill = {"e1": 0, "e2": 0, "e3": 0}
    # e1 holds 4096 tokens in GPU memory, e2 the same in CPU memory (KV events' medium): the
    # GPU hit wins although e1 is a little busier ...
    c = choose({"e1": 4096, "e2": 4096}, IDS, {}, lb, 4200, p, load_tokens=load,
               prefill_tokens=prefill, lower_tier={"e2"})
    assert (c.endpoint_id, c.matched_tokens) == ("e1", 4096)
    # ... which it would not if both were GPU hits.
    c = choose({"e1": 4096, "e2": 4096}, IDS, {}, lb, 4200, p, load_tokens=load,
               prefill_tokens=prefill)
    assert c.endpoint_id == "e2"
    # A CPU hit still beats recomputing on an idle endpoint that holds nothing.
    c = choose({"e2": 4096}, IDS, {}, lb, 4200, p, load_tokens={"e1": 0, "e2": 300, "e3": 0},
               prefill_tokens={"e1": 0, "e2": 300, "e3": 0}, lower_tier={"e2"})
    assert (c.endpoint_id, c.reason) == ("e2", "cache-hit")
    # At cost 1 a lower-tier hit is worth nothing.
    c = choose({"e2": 4096}, IDS, {}, lb, 4200,
               PolicyParams(lower_tier_cost=1.0, spill_margin=0, spill_floor_tokens=0),
               load_tokens={"e1": 0, "e2": 300, "e3": 0},
               prefill_tokens={"e1": 0, "e2": 300, "e3": 0}, lower_tier={"e2"})
    assert c.endpoint_id != "e2"


def test_a_requests_load_scales_with_the_answer_it_asked_for() -> None:
    from addon.policy import MAX_OUTPUT_WEIGHT, PolicyParams, request_weight
    from addon.prefix_index import PrefixIndex

    p = PolicyParams(request_output_tokens=128)
    assert request_weight(None, p) == 1.0  # did not say: counts once
    assert request_weight(16, p) == 16 / 128
    assert request_weight(128, p) == 1.0
    assert request_weight(100_000, p) == MAX_OUTPUT_WEIGHT
    assert request_weight(16, PolicyParams(request_output_tokens=0)) == 1.0  # turned off
    idx = PrefixIndex(["e1", "e2"], prefill_share=1.0, request_tokens=160)
    for i in range(4):  # four short answers on e1, one long one on e2
        idx.add(f"s{i}", "e1", (), 0, weight=request_weight(16, p))
    idx.add("long", "e2", (), 0, weight=request_weight(512, p))
    assert idx.load() == {"e1": 80, "e2": 640}
    for i in range(4):
        idx.remove(f"s{i}")
    assert idx.load()["e1"] == 0
