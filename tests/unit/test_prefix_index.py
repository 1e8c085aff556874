"""The proxy's own prefix view: chunk hashes, the in-flight index, its load estimate."""

from collections import Counter

import pytest

from addon.prefix_index import (
    CHUNK_TOKENS,
    PrefixHeat,
    PrefixIndex,
    chunk_hashes,
    leading_match,
    merge_matches,
    release,
)

A = tuple(range(1000))  # 3 full chunks
B = A[:512] + tuple(range(5000, 5600))  # shares A's first 2 chunks


def test_chunk_hashes_are_chained_and_only_full_chunks() -> None:
    assert chunk_hashes(A[:255]) == ()
    ha, hb = chunk_hashes(A), chunk_hashes(B)
    assert len(ha) == 3 and len(hb) == 4
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    # Chained: the same chunk after a different prefix hashes differently.
    shifted = tuple(range(7, 7 + CHUNK_TOKENS)) + A[CHUNK_TOKENS:768]
    assert chunk_hashes(shifted)[1] != ha[1]
    assert chunk_hashes(list(A)) == ha  # lists and tuples alike
    assert len(chunk_hashes([2**70] * 256)) == 1  # odd ids still hash


def test_local_matches_follow_routing_and_finish() -> None:
    idx = PrefixIndex(["e1", "e2"])
    ha, hb = chunk_hashes(A), chunk_hashes(B)
    assert idx.local_matches(hb) == {}
    idx.add("r1", "e1", ha, 1000)
    assert idx.local_matches(hb) == {"e1": 512}
    assert idx.local_matches(ha) == {"e1": 768}
    idx.add("r2", "e1", ha, 0)
    idx.remove("r1")
    assert idx.local_matches(ha) == {"e1": 768}  # refcounted: r2 still carries it
    assert idx.remove("r2") == "e1"
    assert idx.local_matches(ha) == {} and len(idx) == 0
    assert idx.remove("r2") is None  # a second end is harmless


def test_load_is_queued_prefill_share_plus_per_request_tokens() -> None:
    idx = PrefixIndex(["e1", "e2"], prefill_share=0.5, request_tokens=64)
    idx.add("r1", "e1", (), 1000)
    idx.add("r2", "e1", (), 200)
    assert idx.load() == {"e1": 600 + 128, "e2": 0}
    assert idx.prefill_load() == {"e1": 600, "e2": 0}
    idx.prefill_done("r1")
    idx.prefill_done("r1")  # once only
    assert idx.load()["e1"] == 100 + 128
    assert idx.prefill_load()["e1"] == 100
    idx.remove("r2")
    assert idx.load()["e1"] == 64
    assert idx.prefill_load()["e1"] == 0  # r1 is decoding: no prefill queued
    idx.remove("r1")
    assert idx.load() == {"e1": 0, "e2": 0}


def test_recent_memory_is_a_bounded_lru_used_only_on_request() -> None:
    idx = PrefixIndex(["e1"], recent_tokens=3 * CHUNK_TOKENS)
    ha, hb = chunk_hashes(A), chunk_hashes(B)
    idx.add("r1", "e1", ha, 0)
    idx.remove("r1")
    assert idx.local_matches(ha) == {}
    assert idx.local_matches(ha, recent=True) == {"e1": 768}
    idx.add("r2", "e1", hb, 0)
    idx.remove("r2")  # 2 new chunks in a 3-chunk memory: tails go first
    assert idx.local_matches(hb, recent=True) == {"e1": 768}
    assert idx.local_matches(ha, recent=True) == {"e1": 512}  # A's tail was trimmed
    off = PrefixIndex(["e1"], recent_tokens=0)
    off.add("r", "e1", ha, 0)
    off.remove("r")
    assert off.local_matches(ha, recent=True) == {}


def test_tracked_requests_are_bounded() -> None:
    idx = PrefixIndex(["e1"], max_tracked=2)
    for i in range(5):
        idx.add(i, "e1", chunk_hashes(A), 100)
    assert len(idx) == 2 and idx.dropped == 3
    assert idx.inflight("e1") == 2 and idx.pending_tokens("e1") == 200


def test_re_adding_a_request_replaces_it() -> None:
    idx = PrefixIndex(["e1", "e2"])
    idx.add("r", "e1", chunk_hashes(A), 100)
    idx.add("r", "e2", chunk_hashes(A), 50)
    assert idx.inflight("e1") == 0 and idx.local_matches(chunk_hashes(A)) == {"e2": 768}


def test_helpers() -> None:
    counts = Counter({"a": 2, "b": 1})
    release(counts, ["a", "b"])
    assert counts == Counter({"a": 1}) and "b" not in counts  # zero counts are dropped
    assert leading_match([1, 2, 3], {1: 1}, {2: 1}) == 2
    assert merge_matches({"a": 256, "b": 512}, {"a": 768}) == {"a": 768, "b": 512}
    with pytest.raises(ValueError):
        PrefixIndex(prefill_share=-1)


def test_prefix_heat_is_a_decayed_share_of_recent_requests() -> None:
    heat = PrefixHeat(half_life=10.0)
    for t in range(8):
        heat.record(["hot"], 1, float(t))
    assert heat.record(["new"], 0, 8.0) == (0.0, 0.0)  # a request matching nothing
    count, share = heat.record(["hot"], 1, 8.0)
    hot = sum(0.5 ** ((8 - t) / 10) for t in range(8)) + 1  # each request halves per 10 s
    assert count == pytest.approx(hot)
    # Every request counts in the total, the one that matched nothing too.
    assert share == pytest.approx(hot / (hot + 1))
    # A new prefix counts 1 against everything recent; a half-life later, "hot" counts half.
    count, share = heat.record(["cold"], 1, 18.0)
    assert count == 1.0 and share == pytest.approx(1 / ((hot + 1) / 2 + 1))
    assert heat.record(["hot"], 1, 18.0)[0] == pytest.approx(hot / 2 + 1)


def test_prefix_heat_counts_the_requests_containing_a_prefix() -> None:
    heat = PrefixHeat(half_life=1e9)  # no decay: plain counts
    # Three sessions of one agent: each prompt is the system prompt "sys" + its own chunks.
    for s in ("a", "b", "c"):
        heat.record(["sys", f"{s}1", f"{s}2"], 3, 0.0)
    # A fourth session's first call matches only the system prompt: every earlier call
    # carried it, so it is all of the traffic, not a quarter of it.
    assert heat.record(["sys", "d1"], 1, 0.0) == (4.0, 1.0)
    # A session's own history is its own share.
    assert heat.record(["sys", "a1", "a2", "a3"], 3, 0.0) == (2.0, 2 / 5)


def test_prefix_heat_forgets_beyond_its_bound() -> None:
    heat = PrefixHeat(half_life=10.0, max_prefixes=2)
    heat.record(["a"], 1, 0.0)
    heat.record(["b"], 1, 0.0)
    heat.record(["c"], 1, 0.0)  # "a" is the least recently seen: dropped
    assert heat.record(["a"], 1, 0.0)[0] == 1.0
    with pytest.raises(ValueError):
        PrefixHeat(half_life=0)


def test_chunk_hashes_of_the_token_cache_array_equal_the_tuples() -> None:
    from array import array

    tokens = list(range(40_000, 40_000 + 1000))
    assert chunk_hashes(array("i", tokens)) == chunk_hashes(tuple(tokens))
    assert chunk_hashes(array("q", tokens)) == chunk_hashes(tuple(tokens))


def test_engine_report_ends_the_prefill_of_all_but_the_newest_waiting() -> None:
    # Non-streamed requests: nothing but the engine's own queue says their prefill started.
    idx = PrefixIndex(["e1", "e2"], prefill_share=1.0, request_tokens=0)
    for i in range(4):
        idx.add(f"r{i}", "e1", (), 100 * (i + 1))  # 100, 200, 300, 400 uncached
    seq = idx.seq
    idx.add("late", "e1", (), 1000)  # sent after the scrape: not in the report
    idx.engine_report("e1", waiting=1, running=3, seq=seq)
    # FIFO: r0-r2 have started; r3 (the newest the engine had) may still wait; "late" too.
    assert idx.pending_tokens("e1") == 400 + 1000
    assert idx.foreign("e1") == (0, 0)
    # A later report in which everything it had has started.
    idx.engine_report("e1", waiting=0, running=5, seq=idx.seq)
    assert idx.pending_tokens("e1") == 0
    assert idx.foreign("e1") == (0, 0)


def test_engine_report_counts_traffic_the_proxy_did_not_send() -> None:
    idx = PrefixIndex(["e1", "e2"], prefill_share=1.0, request_tokens=10)
    idx.add("r0", "e1", (), 300)
    idx.add("r1", "e2", (), 300)
    idx.engine_report("e1", waiting=3, running=2, seq=idx.seq)
    # One of the 3 waiting is the proxy's (r0); 2 foreign waiting; 2 running, none ours.
    assert idx.foreign("e1") == (2, 2)
    assert idx.pending_tokens("e1") == 300  # r0 may be the one still waiting
    load, prefill = idx.load(), idx.prefill_load()
    guess = int(2 * idx.mean_uncached)
    assert prefill["e1"] == 300 + guess and prefill["e2"] == 300
    assert load["e1"] == 300 + guess + 10 * 5 and load["e2"] == 300 + 10
    idx.engine_lost("e1")  # a failed scrape: the proxy's own view alone again
    assert idx.foreign("e1") == (0, 0) and idx.load()["e1"] == 300 + 10


def test_engine_report_walks_only_requests_sent_before_it() -> None:
    idx = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0)
    idx.add("a", "e1", (), 100)
    seq = idx.seq
    idx.add("b", "e1", (), 100)
    idx.prefill_done("a")  # streamed: its first byte already came
    idx.engine_report("e1", waiting=0, running=1, seq=seq)
    assert idx.pending_tokens("e1") == 100  # b was sent after the scrape
    assert idx.foreign("e1") == (0, 0)  # a is the one running


def test_engine_reports_leave_streamed_requests_to_their_first_byte() -> None:
    # A started prefill may still be running: only the first byte of a streamed answer says
    # it is over, so a report does not end a streamed request's prefill early.
    idx = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0)
    idx.add("streamed", "e1", (), 500, watched=True)
    idx.add("plain", "e1", (), 300)
    idx.engine_report("e1", waiting=0, running=2, seq=idx.seq)
    assert idx.pending_tokens("e1") == 500
    idx.prefill_done("streamed")
    assert idx.pending_tokens("e1") == 0


def test_a_started_prefill_runs_for_its_tokens_at_the_learned_rate() -> None:
    # Non-streamed requests: the engine's queue says which started; only the newest started
    # can still be prefilling, and it counts for its rest at the rate the engine was seen to
    # start uncached tokens while it had a queue.
    now = [0.0]
    idx = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0, clock=lambda: now[0])
    for rid in ("a", "b", "c"):
        idx.add(rid, "e1", (), 1000)
    idx.engine_report("e1", waiting=3, running=0, seq=idx.seq)
    assert idx.start_rate("e1") == 0 and idx.prefill_load()["e1"] == 3000
    now[0] = 1.0
    idx.engine_report("e1", waiting=2, running=1, seq=idx.seq)  # a started: 1000 tokens in 1 s
    assert idx.start_rate("e1") == 1000
    assert idx.pending_tokens("e1") == 2000  # a's estimated end (1.0 s) has come
    now[0] = 1.5
    idx.engine_report("e1", waiting=1, running=1, seq=idx.seq)  # b started: 2000 tokens/s
    rate = 1000 + 0.3 * (2000 - 1000)
    assert idx.start_rate("e1") == rate
    end = 1.0 + 1000 / rate  # b could start at the previous report
    left = int((end - 1.5) * rate)
    assert idx.prefill_load()["e1"] == 1000 + left  # c in full, b for what is left
    now[0] = end + 0.01
    assert idx.prefill_load()["e1"] == 1000 and idx.pending_tokens("e1") == 1000
    # An idle engine (nothing running) ends every started prefill at once.
    idx.add("d", "e1", (), 500)
    idx.engine_report("e1", waiting=0, running=0, seq=idx.seq)
    assert idx.pending_tokens("e1") == 0


def test_first_token_and_finished_counters_say_which_prefills_are_over() -> None:
    # vLLM prefills several requests at once (chunked prefill shares a step's token
    # budget), so "only the newest started can still prefill" does not hold there; its
    # counters say how many requests decode (first tokens - ended), hence how many of the
    # started ones are still prefilling. Non-streamed requests, no rate learned yet.
    idx = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0)
    for i in range(4):
        idx.add(f"r{i}", "e1", (), 100 * (i + 1))  # 100, 200, 300, 400 uncached
    # r0-r2 started (1 waiting), one of them decodes: r1 and r2 still prefill.
    idx.engine_report("e1", waiting=1, running=3, seq=idx.seq, first_tokens=1, finished=0)
    assert idx.pending_tokens("e1") == 200 + 300 + 400
    # Without the counters the same report ends every started prefill (no rate known).
    gauges = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0)
    for i in range(4):
        gauges.add(f"r{i}", "e1", (), 100 * (i + 1))
    gauges.engine_report("e1", waiting=1, running=3, seq=gauges.seq)
    assert gauges.pending_tokens("e1") == 400
    # Later: r0 ended, r1 and r2 decode, r3 prefills.
    idx.remove("r0")
    idx.engine_report("e1", waiting=0, running=3, seq=idx.seq, first_tokens=3, finished=1)
    assert idx.pending_tokens("e1") == 400


def test_requests_ended_without_a_first_token_do_not_skew_the_counters() -> None:
    # Aborted requests count as ended but never had a first token: the counters' difference
    # then reads low. An idle report (nothing running) resets what it is measured against.
    idx = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0)
    idx.engine_report("e1", waiting=0, running=0, seq=idx.seq, first_tokens=10, finished=13)
    idx.add("a", "e1", (), 100)
    idx.add("b", "e1", (), 200)
    # a decodes (one more first token than at the idle report), b prefills.
    idx.engine_report("e1", waiting=0, running=2, seq=idx.seq, first_tokens=11, finished=13)
    assert idx.pending_tokens("e1") == 200
    # Against the raw difference (-2) nothing would decode and a would still count.
    raw = PrefixIndex(["e1"], prefill_share=1.0, request_tokens=0)
    raw.add("a", "e1", (), 100)
    raw.add("b", "e1", (), 200)
    raw.engine_report("e1", waiting=0, running=2, seq=raw.seq, first_tokens=11, finished=13)
    assert raw.pending_tokens("e1") == 300


def test_foreign_requests_still_prefilling_count_as_queued_prefill() -> None:
    # Traffic that bypassed the proxy: the counters say two more prefills run there than
    # the proxy sent, and they delay a new request as waiting ones would.
    idx = PrefixIndex(["e1", "e2"], prefill_share=1.0, request_tokens=0)
    idx.add("r0", "e1", (), 300)
    idx.engine_report("e1", waiting=0, running=3, seq=idx.seq, first_tokens=0, finished=0)
    assert idx.foreign("e1") == (2, 2)
    assert idx.prefill_load()["e1"] == 300 + int(2 * idx.mean_uncached)
    # With the gauges alone the two look like requests decoding: no prefill queued.
    gauges = PrefixIndex(["e1", "e2"], prefill_share=1.0, request_tokens=0)
    gauges.add("r0", "e1", (), 300)
    gauges.engine_report("e1", waiting=0, running=3, seq=gauges.seq)
    assert gauges.prefill_load()["e1"] == 0  # r0 counted as started (no rate known)
