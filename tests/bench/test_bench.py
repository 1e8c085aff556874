"""The routing benchmark: determinism, the simulated controller's semantics, each policy's
signature behaviour, and the addon's policy against round robin on multi-round chat."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest

from addon import policy as addon_policy
from bench import policies as P
from bench.des import (
    ControllerView,
    SimConfig,
    SimRequest,
    Simulation,
    check_engine_path,
    percentile,
    run_once,
)
from bench.prompts import PREFIXAWARE_CHUNK, TREE_BLOCK, Prompt, PromptFactory, random_tokens
from bench.workloads import (
    MOONCAKE_BLOCK_TOKENS,
    Workload,
    doc_qa,
    load_trace,
    multi_round_chat,
    no_reuse,
    shared_prefix,
    standard_workloads,
    write_trace,
)
from sim.chunks import CHUNK_SIZE, chained_hashes, chunk_hashes

CFG = SimConfig(capacity_tokens=50_000)
FACTORY = PromptFactory(CFG.block_size)


def tokens(n: int, seed: int = 1) -> list[int]:
    return random_tokens(random.Random(seed), n)


def prompt(n: int, seed: int = 1) -> Prompt:
    return FACTORY.make(tokens(n, seed))


def bare_sim(policy: P.BasePolicy, n_engines: int = 4, **cfg: object) -> Simulation:
    """A cluster with nothing in flight, to call ``policy.route`` on by hand."""
    c = SimConfig(n_engines=n_engines, capacity_tokens=50_000, **cfg)  # type: ignore[arg-type]
    return Simulation([], [], policy, c, seed=5)


def hold(sim: Simulation, eid: str, p: Prompt, n_chunks: int) -> None:
    sim.controller.held[eid].update(p.chunks[:n_chunks])


# --- prompts and the engine path ------------------------------------------------------------


def test_prompt_hashes_equal_sim_chunks_whole_extended_and_truncated() -> None:
    base = tokens(1000, 2)
    new = tokens(777, 3)
    whole = base + new
    p = FACTORY.extend(FACTORY.make(base), new)
    assert p.tokens == tuple(whole)
    assert list(p.blocks) == chained_hashes(whole, CFG.block_size)
    assert list(p.chunks) == chunk_hashes(whole)
    assert list(p.pa_chunks) == chained_hashes(whole, PREFIXAWARE_CHUNK)
    assert list(p.tree_blocks) == chained_hashes(whole, TREE_BLOCK)
    cut = p.truncate(900)
    assert list(cut.chunks) == chunk_hashes(whole[:900])
    assert list(cut.blocks) == chained_hashes(whole[:900], CFG.block_size)


@pytest.mark.parametrize("block_size", [16, 128])
def test_fast_engine_path_is_the_engine_model(block_size: int) -> None:
    check_engine_path(block_size)


# --- controller view ------------------------------------------------------------------------


def test_lookup_reports_every_holder_in_multiples_of_256() -> None:
    view = ControllerView(["a", "b", "c"])
    toks = tokens(800)  # 3 full chunks; the last 32 tokens never match
    ch = chunk_hashes(toks)
    view.report(0.0, "a", ch[:2], [])
    view.report(0.0, "b", ch[:3], [])
    assert view.lookup(toks, 0.0) == {"a": 512, "b": 768}
    assert all(v % CHUNK_SIZE == 0 for v in view.lookup(toks, 0.0).values())


def test_lookup_stops_at_first_missing_chunk_and_forgets_evictions() -> None:
    view = ControllerView(["a", "b"])
    toks = tokens(1024)
    ch = chunk_hashes(toks)
    view.report(0.0, "a", [ch[0], ch[2], ch[3]], [])  # chunk 1 missing
    view.report(0.0, "b", ch, [])
    assert view.lookup(toks, 0.0) == {"a": 256, "b": 1024}
    view.report(1.0, "b", [], [ch[0]])
    assert view.lookup(toks, 1.0) == {"a": 256}


def test_short_prompts_never_match_and_down_controller_answers_nothing() -> None:
    view = ControllerView(["a"])
    toks = tokens(600)
    view.report(0.0, "a", chunk_hashes(toks), [])
    assert view.lookup(toks[:255], 0.0) == {}
    down = ControllerView(["a"], down=True)
    down.report(0.0, "a", chunk_hashes(toks), [])
    assert down.lookup(toks, 5.0) == {}


def test_stale_reports_become_visible_after_the_delay() -> None:
    view = ControllerView(["a"], staleness_s=2.0)
    toks = tokens(512)
    view.report(1.0, "a", chunk_hashes(toks), [])
    assert view.lookup(toks, 2.9) == {}
    assert view.lookup(toks, 3.0) == {"a": 512}


def test_engines_report_to_the_controller_at_the_end_of_prefill() -> None:
    p = prompt(2000)
    reqs = [SimRequest(0, p, 10), SimRequest(1, FACTORY.extend(p, tokens(300, 9)), 10)]
    sim = Simulation(reqs, [0.0, 5.0], P.RoundRobin(), CFG)
    records = sim.run()
    # The first prompt's 7 full chunks reached the controller from e0; the second request
    # ran on e1 (round robin) and found nothing cached there.
    assert sim.controller.lookup_chunks(p.chunks, sim.now)["e0"] == 7 * CHUNK_SIZE
    assert records[1].engine == "e1" and records[1].cached_tokens == 0


# --- simulation ------------------------------------------------------------------------------


def test_same_seed_same_numbers() -> None:
    w = shared_prefix(CFG, seed=3, n_requests=120)
    q = w.qps_levels(CFG)[2]
    a = [asdict(run_once(w.requests, w.times(q, 3), P.policy_factories()[name](), CFG, 9)[0])
         for name in ("ours", "sglang-0.5/32/1.1", "llm-d", "oracle")]
    w2 = shared_prefix(CFG, seed=3, n_requests=120)
    b = [asdict(run_once(w2.requests, w2.times(q, 3), P.policy_factories()[name](), CFG, 9)[0])
         for name in ("ours", "sglang-0.5/32/1.1", "llm-d", "oracle")]
    assert a == b
    other = shared_prefix(CFG, seed=4, n_requests=120)
    c = run_once(other.requests, other.times(q, 4), P.Ours(), CFG, 9)[0]
    assert asdict(c) != a[0]


def test_batching_queueing_and_ttft() -> None:
    cfg = SimConfig(n_engines=1, capacity_tokens=50_000, max_batch=2)
    cost = cfg.cost_model()
    p = [prompt(1000, s) for s in range(3)]
    reqs = [SimRequest(i, p[i], 11) for i in range(3)]
    recs = Simulation(reqs, [0.0, 0.0, 0.0], P.RoundRobin(), cfg).run()
    pre = cost.prefill_seconds(1000)
    dec = cost.decode_seconds(11)
    # Serial prefill: the second waits for the first's prefill; the third for a free slot.
    assert recs[0].ttft == pytest.approx(pre)
    assert recs[1].ttft == pytest.approx(2 * pre)
    assert recs[2].prefill_start == pytest.approx(pre + dec)
    assert recs[2].ttft == pytest.approx(pre + dec + pre)


def test_a_chat_round_waits_for_the_previous_answer() -> None:
    w = multi_round_chat(CFG, seed=1, rounds=3, users=2)
    times = [0.0] * len(w.requests)  # all "due" at once
    recs = Simulation(w.requests, times, P.RoundRobin(), CFG).run()
    for r in w.requests:
        if r.after is not None:
            assert recs[r.idx].arrival >= recs[r.after].end


def test_percentile_is_numpys_linear() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 95) == 5.0


# --- workloads -------------------------------------------------------------------------------


def test_reuse_workloads_fill_three_quarters_of_the_cluster_cache() -> None:
    total = CFG.n_engines * CFG.capacity_tokens
    for w in (shared_prefix(CFG, n_requests=50), doc_qa(CFG, questions_per_doc=3),
              multi_round_chat(CFG, rounds=3)):
        assert 0.65 <= w.working_set_tokens / total <= 0.85, w.name


def test_chat_rounds_extend_the_previous_prompt() -> None:
    w = multi_round_chat(CFG, rounds=3, users=2)
    for r in w.requests:
        if r.after is not None:
            prev = w.requests[r.after].prompt.tokens
            assert r.prompt.tokens[: len(prev)] == prev
            assert len(r.prompt) > len(prev) + 100  # + answer + question


def test_no_reuse_has_short_prompts_and_nothing_shared() -> None:
    w = no_reuse(CFG, n_requests=200)
    assert any(len(r.prompt) < CHUNK_SIZE for r in w.requests)
    firsts = [r.prompt.chunks[0] for r in w.requests if r.prompt.chunks]
    assert len(set(firsts)) == len(firsts)


def test_trace_files_both_formats(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, [
        {"timestamp": 2000, "hash_ids": [7, 8, 9], "input_length": 1300, "output_length": 20},
        {"timestamp": 1000, "hash_ids": [7, 8], "input_length": 1024, "output_length": 30},
        {"t": 3.0, "tokens": list(range(300)), "session": "s1"},
    ])
    w = load_trace(path, CFG)
    assert [len(r.prompt) for r in w.requests] == [1024, 1300, 300]  # sorted by time
    assert [r.output_tokens for r in w.requests] == [30, 20, 128]
    first, second = w.requests[0].prompt, w.requests[1].prompt
    assert second.tokens[: 2 * MOONCAKE_BLOCK_TOKENS] == first.tokens  # same ids, same blocks
    assert list(second.chunks) == chunk_hashes(second.tokens)
    assert w.requests[2].session == "s1"
    assert w.times(2.0, 0) == pytest.approx([0.0, 0.5, 1.0])  # native 1 QPS, replayed at 2


# --- policies: signature behaviour -----------------------------------------------------------


def test_ours_is_the_addons_router_with_the_hooks_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from addon import router as addon_router

    calls = []
    real = addon_router.choose

    def spy(*args: object, **kwargs: object) -> addon_policy.Choice:
        calls.append((args, kwargs))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(addon_router, "choose", spy)
    pol = P.Ours()
    sim = bare_sim(pol)
    p = prompt(1500)
    hold(sim, "e2", p, 3)
    sim.inflight["e0"] = 1
    assert pol.route(SimRequest(0, p, 5), sim) == "e2"
    assert pol.router is not None and isinstance(pol.router, addon_router.Router)
    (matches, candidates, inflight, balancer), kwargs = calls[0]
    assert matches == {"e2": 768} and list(candidates) == sim.engine_ids
    assert balancer.kind == "least_inflight"
    assert kwargs["prompt_tokens"] == 1500 and kwargs["params"] == addon_policy.PolicyParams()
    # The router's own bookkeeping saw the routing (as kvcache._apply reports it).
    assert pol.router.state.inflight["e2"] == 1
    assert pol.router.index.pending_tokens("e2") == 1500 - 768
    pol.on_first_token(SimRequest(0, p, 5), "e2", sim)
    assert pol.router.index.pending_tokens("e2") == 0
    # Under one chunk the hook does not look up: straight to the balancer.
    pol.route(SimRequest(1, prompt(200, 4), 5), sim)
    assert len(calls) == 1 and sim.reason == "least_inflight"


def test_no_stream_clients_leave_prefill_pending_until_the_end() -> None:
    pol = P.Ours("ours[no-stream,no-metrics]", stream_share=0.0, engine_metrics=False)
    sim = bare_sim(pol)
    p = prompt(1500)
    pol.route(SimRequest(0, p, 5), sim)
    assert pol.router is not None
    eid = next(e for e in sim.engine_ids if pol.router.index.inflight(e))
    pol.on_first_token(SimRequest(0, p, 5), eid, sim)
    assert pol.router.index.pending_tokens(eid) == 1500  # nothing observable yet
    pol.on_finish(SimRequest(0, p, 5), eid, sim)
    assert pol.router.index.pending_tokens(eid) == 0 and pol.router.state.inflight[eid] == 0


def test_controller_down_is_a_refused_lookup_and_the_index_routes() -> None:
    cfg = SimConfig(controller_down=True)
    pol = P.Ours("ours[controller-down]")
    sim = Simulation([], [], pol, cfg)
    p = prompt(3000)
    first = pol.route(SimRequest(0, p, 5), sim)
    pol.on_finish(SimRequest(0, p, 5), first, sim)
    assert pol.route(SimRequest(1, FACTORY.extend(p, tokens(100, 5)), 5), sim) == first
    assert sim.reason == "local-hit"


def test_kvaware_threshold_and_first_holder() -> None:
    pol = P.ProductionStackKvAware(threshold=2000)
    sim = bare_sim(pol)
    p = prompt(3000)
    hold(sim, "e2", p, 4)  # 1024 >= 3000 - 2000
    assert pol.route(SimRequest(0, p, 5, session="u"), sim) == "e2"
    assert sim.reason == "kv-hit"
    sim2 = bare_sim(pol := P.ProductionStackKvAware(threshold=2000))
    hold(sim2, "e2", p, 3)  # 768 < 1000: the session's engine instead
    ring = P.ConsistentHashRing(sim2.engine_ids)
    assert pol.route(SimRequest(0, p, 5, session="u"), sim2) == ring.get("u")
    assert sim2.reason == "session"
    # Only the first holder the controller lists counts, even if a later one qualifies.
    sim3 = bare_sim(pol := P.ProductionStackKvAware(threshold=2000))
    hold(sim3, "e0", p, 1)
    hold(sim3, "e3", p, 11)
    pol.route(SimRequest(0, p, 5), sim3)
    assert sim3.reason == "lowest-qps"


def test_sglang_balance_and_cache_thresholds() -> None:
    p = prompt(2560)
    for (thr, abs_, rel), load0, want_balance in [
        ((0.3, 64, 1.5), 40, False),  # 40 - 0 is not > 64: cache affinity holds
        ((0.5, 32, 1.1), 40, True),  # > 32 and > 1.1 x 0: least loaded
        ((0.3, 64, 1.5), 70, True),
    ]:
        pol = P.SGLangCacheAware(thr, abs_, rel)
        sim = bare_sim(pol)
        pol.route(SimRequest(0, p, 5), sim)  # empty trees: smallest tree, e0; tree learns it
        assert sim.reason == "smallest-tree"
        sim.inflight.update({"e0": load0, "e1": 0, "e2": 3, "e3": 3})
        eid = pol.route(SimRequest(1, FACTORY.extend(p, tokens(100, 8)), 5), sim)
        assert (eid, sim.reason) == (("e1", "imbalanced") if want_balance else ("e0", "cache"))
    # Match rate 0.4 (1024 of 2560 tokens): over 0.3 follows the tree, under 0.5 does not.
    q = FACTORY.extend(FACTORY.make(p.tokens[:1024]), tokens(1536, 11))
    for thr, want in [(0.3, "cache"), (0.5, "smallest-tree")]:
        pol = P.SGLangCacheAware(thr, 64, 1.5)
        sim = bare_sim(pol)
        pol.route(SimRequest(0, p, 5), sim)
        pol.route(SimRequest(1, q, 5), sim)
        assert sim.reason == want


def test_prefixaware_random_among_longest_and_never_forgets() -> None:
    pol = P.ProductionStackPrefixAware()
    sim = bare_sim(pol)
    p = prompt(1024)
    first = pol.route(SimRequest(0, p, 5), sim)
    picks = {pol.route(SimRequest(i, FACTORY.extend(p, tokens(64, i)), 5), sim)
             for i in range(1, 30)}
    assert picks == {first}  # only one endpoint ever matched the prefix
    fresh = {pol.route(SimRequest(100 + i, prompt(600, 100 + i), 5), sim) for i in range(40)}
    assert len(fresh) > 1  # no match: random over all


def test_llmd_weighs_prefix_against_queue() -> None:
    pol = P.LlmD()
    sim = bare_sim(pol)
    p = prompt(2048)
    hold(sim, "e3", p, 8)  # full prefix: +3
    assert pol.route(SimRequest(0, p, 5), sim) == "e3"
    # A long waiting queue on the holder (queue score 0 vs 1 elsewhere: -2) and a half
    # prefix (+1.5) lose to an idle engine.
    sim2 = bare_sim(pol := P.LlmD())
    hold(sim2, "e3", p, 4)
    sim2.engines["e3"].waiting.extend(range(5))
    assert pol.route(SimRequest(0, p, 5), sim2) != "e3"


def test_dynamo_prefers_overlap_until_its_load_outweighs_it() -> None:
    pol = P.DynamoKv()
    sim = bare_sim(pol)
    p = prompt(4096)
    hold(sim, "e1", p, 16)
    assert pol.route(SimRequest(0, p, 5), sim) == "e1"
    # e1 now carries the first request's blocks; a request sharing nothing with it goes
    # elsewhere.
    assert pol.route(SimRequest(1, prompt(4096, 7), 5), sim) != "e1"


def test_seed_routes_only_exact_repeats() -> None:
    pol = P.SeedDesign()
    sim = bare_sim(pol)
    p = prompt(1024)
    hold(sim, "e3", p, 4)
    assert pol.route(SimRequest(0, p, 5), sim) == "e0"  # first sight: round robin
    longer = FACTORY.extend(p, tokens(10, 3))
    assert pol.route(SimRequest(1, longer, 5), sim) == "e1"  # a prefix hit is not a repeat
    assert pol.route(SimRequest(2, p, 5), sim) == "e3"  # exact repeat: the holder
    assert sim.reason == "exact-repeat"


def test_session_affinity_is_sticky() -> None:
    pol = P.SessionAffinity()
    sim = bare_sim(pol)
    got = {pol.route(SimRequest(i, prompt(300, i), 5, session="alice"), sim) for i in range(10)}
    assert len(got) == 1


def test_oracle_trades_cache_for_queue() -> None:
    p = prompt(8000)
    warm = [SimRequest(0, p, 2)]
    # Idle cluster: the engine holding the prefix is fastest.
    pol = P.Oracle()
    sim = Simulation(warm + [SimRequest(1, FACTORY.extend(p, tokens(50, 2)), 2)],
                     [0.0, 10.0], pol, CFG)
    recs = sim.run()
    assert recs[1].engine == recs[0].engine and recs[1].cached_tokens >= 7900
    # A burst of long unrelated prompts queued on the holder makes a cold engine faster.
    burst = [SimRequest(i, prompt(8000, 50 + i), 2) for i in range(1, 4)]
    sim2 = Simulation(warm + burst, [0.0, 0.5, 0.5, 0.5], P.Oracle(), CFG)
    recs2 = sim2.run()
    assert len({r.engine for r in recs2[1:]}) == 3


def test_ours_sees_its_own_in_flight_routing() -> None:
    pol = P.Ours()
    sim = bare_sim(pol)
    p = prompt(6000)
    first = pol.route(SimRequest(0, p, 5), sim)
    sim.inflight[first] += 1
    # The controller does not know yet (prefill not finished); the proxy's index does.
    assert sim.controller.lookup_chunks(p.chunks, 0.0) == {}
    assert pol.route(SimRequest(1, FACTORY.extend(p, tokens(200, 3)), 5), sim) == first
    assert sim.reason == "local-hit"


# --- the key test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_workload() -> tuple[SimConfig, Workload]:
    # The full-size cluster and chat workload: with fewer users than this the highest loads
    # turn into a closed loop (every user waiting on its previous answer), where even round
    # robin keeps each user on one engine by accident and nothing is being compared.
    cfg = SimConfig()
    return cfg, multi_round_chat(cfg, seed=0)


# 0.5: light load, where routing every new user to the holder of the shared system prompt
# piles them all onto one engine (the longest-match rule does: p95 0.40 s vs round robin's
# 0.15 s); 1.5: round robin's saturation.
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5])
def test_addon_policy_is_not_behind_round_robin_on_multi_round_chat(
    chat_workload: tuple[SimConfig, Workload], factor: float
) -> None:
    """The addon's own policy, imported, must match or beat round robin on TTFT p95 and hit
    ratio on multi-round chat, from light load to round robin's saturation."""
    cfg, w = chat_workload
    times = w.times(w.cold_capacity(cfg) * factor, 0)
    ours, _ = run_once(w.requests, times, P.Ours(), cfg, 1)
    rr, _ = run_once(w.requests, times, P.RoundRobin(), cfg, 1)
    assert ours.hit_ratio >= rr.hit_ratio, (ours, rr)
    assert ours.ttft_p95 <= rr.ttft_p95, (ours, rr)


def test_quick_benchmark_writes_the_report(tmp_path: Path) -> None:
    from bench import run

    assert run.main(["--quick", "--workloads", "chat,no-reuse", "--jobs", "1",
                     "--out", str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "routing-benchmark.md").read_text()
    assert md.splitlines()[2].startswith("Command: `python -m bench.run --quick")
    assert "Wall time" in md
    data = json.loads((tmp_path / "routing-benchmark.json").read_text())
    assert set(data["workloads"]) == {"chat", "no-reuse"}
    assert data["headline"] and "ours" in data["headline"][0]


def test_leading_run_is_the_walk_on_prefix_closed_sets() -> None:
    p = prompt(3000)
    for k in range(len(p.tree_blocks) + 1):
        present = set(p.tree_blocks[:k]) | set(prompt(3000, 99).tree_blocks)
        assert P.leading_run(p.tree_blocks, present) == k


def test_sglang_tree_trims_leaves_first() -> None:
    pol = P.SGLangCacheAware(0.3, 64, 1.5, max_tree_tokens=1024)
    sim = bare_sim(pol)
    p = prompt(2048)
    pol.route(SimRequest(0, p, 5), sim)
    tree = pol._trees["e0"]
    assert len(tree) == 1024 // 16 and all(b in tree for b in p.tree_blocks[:64])


def test_win_condition_margins() -> None:
    from bench.report import win_holds

    p95 = {"least-loaded": 1.0, "round-robin": 1.0}.__getitem__
    assert win_holds("chat", 1.019, 1.0, p95)[0]
    assert not win_holds("chat", 1.021, 1.0, p95)[0]
    # no-reuse: also within 3% of least-loaded; hot-prefix: not behind round robin at all.
    assert not win_holds("no-reuse", 1.0, 0.97, {"least-loaded": 0.95}.__getitem__)[0]
    assert win_holds("hot-prefix", 0.999, 0.99, p95) == (True, "vs round robin 0.999")
    assert not win_holds("hot-prefix", 1.001, 0.99, p95)[0]


def test_seeds_report_runs_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.seeds as S

    # A small cluster cache shrinks every workload's working set and request count.
    monkeypatch.setattr(S, "_CFG", SimConfig(capacity_tokens=50_000))
    monkeypatch.setattr(S, "standard_workloads", lambda cfg, seed, scale, trace: [
        w for w in standard_workloads(cfg, seed, 0.1, None, ["chat"])])
    assert S.main(["--seeds", "0,1", "--jobs", "1", "--out", str(tmp_path),
                   "--vary", "hot_headroom=0.25"]) == 0
    text = (tmp_path / "routing-seeds.md").read_text()
    assert "`ours, hot_headroom 0.25` sets `hot_headroom: 0.25`" in text
    assert "- ours, hot_headroom 0.25: " in text
    with pytest.raises(SystemExit):  # a knob the addon does not have is refused
        S.main(["--vary", "no_such_knob=1", "--out", str(tmp_path)])
    assert text.startswith("# Routing benchmark: the win conditions over several seeds")
    assert "Command: `python -m bench.seeds --seeds 0,1" in text
    rows = [line for line in text.splitlines() if line.startswith("| chat |")]
    assert rows and all(len(r.split("|")[3].split("/")) == 2 for r in rows)  # a ratio per seed
    assert "- ours: " in text


def test_route_cost_report_runs_small(tmp_path: Path) -> None:
    import bench.route_cost as RC

    assert RC.main(["--sizes", "1024,4096", "--requests", "20", "--repeats", "1",
                    "--out", str(tmp_path)]) == 0
    text = (tmp_path / "route-cost.md").read_text()
    assert "Command: `python -m bench.route_cost --sizes 1024,4096" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and "us (" in line}
    assert set(rows) == {"chunk hashing only", *RC.VARIANTS}
    # Routing hashes the prompt and then does more: never cheaper than hashing alone.
    for name in RC.VARIANTS:
        ratios = [float(c.split("(")[1].rstrip("x) ")) for c in rows[name].split("|")[2:4]]
        assert all(r > 1.0 for r in ratios), (name, ratios)
