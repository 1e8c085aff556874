"""The replicas benchmark (bench/replicas.py): N routers sharing their requests through
ReplicaSync see each other's requests, without sharing they do not, one replica is one
router, and the report has a row per configuration."""

from __future__ import annotations

import heapq
import random

import pytest

from bench import replicas as R
from bench.des import SimConfig, run_once
from bench.workloads import seed_of, standard_workloads

CFG = SimConfig(capacity_tokens=SimConfig.capacity_tokens // 4)
LEVEL = 1  # a load at which requests overlap


@pytest.fixture(scope="module")
def workload():
    return standard_workloads(CFG, 0, 0.25, None, ["shared-prefix"])[0]


@pytest.fixture(scope="module")
def runs(workload):
    out = {}
    for config in R.config_names([2]):
        for mode in ("up", "down"):
            out[(config, mode)] = R.run_cell(workload, LEVEL, config, CFG, 0, 0.001, mode)
    return out


def test_shared_replicas_see_each_others_requests(runs) -> None:
    for mode in ("up", "down"):
        res, policy = runs[("redis-2", mode)]
        assert isinstance(policy, R.Replicas) and policy.shared
        # Every replica's index held the other's in-flight requests at some point.
        assert all(v["foreign_max"] > 0 for v in res.views), res.views
        assert all(v["foreign_seen"] > 0 for v in res.views)
        for i, sync in enumerate(policy.syncs):
            assert sync.stats.gaps == 0 and sync.stats.peers_expired == 0
            assert sync.stats.batches_received > 0
            assert sync.stats.events_sent > 0
            # Everything the other replica sent was applied here, but the batches still in
            # flight at the end (one event per batch).
            other = policy.syncs[1 - i]
            queued = sum(1 for _, sender, _, _ in policy._queue if sender == 1 - i)
            assert sync.stats.batches_received == other.stats.events_sent - queued


def test_unshared_replicas_see_only_their_own(runs) -> None:
    for mode in ("up", "down"):
        res, policy = runs[("memory-2", mode)]
        assert not policy.syncs and policy.batches == 0
        assert all(v["foreign_max"] == 0 for v in res.views), res.views
        # Both replicas routed requests.
        assert all(o.router is not None and o.router.index.seq > 0 for o in policy.replicas)


def test_sharing_changes_routing(runs) -> None:
    assert runs[("memory-2", "down")][0].ttfts != runs[("redis-2", "down")][0].ttfts


def test_one_replica_is_one_router(workload) -> None:
    one, _ = R.run_cell(workload, LEVEL, "one", CFG, 0, 0.001, "up")
    for shared in (False, True):
        policy = R.Replicas(1, shared, 0.001, 0)
        qps = workload.qps_levels(CFG)[LEVEL]
        _, records = run_once(workload.requests, workload.times(qps, 0), policy, CFG,
                              seed_of(0, "policy", workload.name, LEVEL, "ours"))
        assert [r.ttft for r in records] == one.ttfts


def test_report_has_a_row_per_configuration(runs, workload) -> None:
    configs = R.config_names([2])
    res = {(0, workload.name, LEVEL, c, m): runs[(c, m)][0] for c, m in runs}
    data = R.summarize(res, [0], [(workload.name, LEVEL)], configs)
    assert set(data) == {"up", "down"}
    for mode in data:
        assert set(data[mode]["summary"]) == set(configs)
        assert data[mode]["summary"]["one"]["geomean"] == pytest.approx(1.0)
        assert set(data[mode]["cells"][0]["configs"]) == set(configs)
    qps = {(workload.name, LEVEL): workload.qps_levels(CFG)[LEVEL]}
    meta = {"runs": len(res), "wall_s": 0.0, "jobs": 1}
    text = "\n".join(R.render(data, "python -m bench.replicas --quick", [0], configs,
                              {2: R.Staleness.constant(0.001)}, qps, meta))
    assert text.startswith("# ") and "Command: `python -m bench.replicas --quick`" in text
    for mode in ("up", "down"):
        for c in configs[1:]:
            assert f"| {mode} | {c} |" in text
    assert text.count("PASS") + text.count("FAIL") >= 4  # redis-2, up and down (x2 lines)


def test_cli_quick(tmp_path) -> None:
    assert R.main(["--quick", "--seeds", "0", "--replicas", "2", "--workloads", "chat",
                   "--modes", "up", "--all-levels", "--jobs", "1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "replicas-sim.md").read_text()
    assert "redis-2" in md and (tmp_path / "replicas-sim.json").exists()


def test_staleness_is_drawn_from_the_measured_percentiles() -> None:
    st = R.Staleness.measured({"p10": 1.0, "p50": 2.0, "p99": 10.0, "max": 50.0}, "m")
    rng = random.Random(1)
    xs = sorted(st.draw(rng) for _ in range(20_000))
    assert xs[0] >= 0.001 and xs[-1] <= 0.050
    assert abs(xs[len(xs) // 2] - 0.002) < 0.0002
    assert 0.009 < xs[int(0.99 * len(xs))] < 0.016
    assert R.Staleness.constant(0.003).draw(rng) == 0.003


def test_a_replicas_batches_arrive_in_the_order_sent() -> None:
    # Variable delays must not reorder one sender's batches (one TCP stream through Redis).
    st = R.Staleness.measured({"p10": 0.1, "p50": 5.0, "max": 40.0}, "m")
    p = R.Replicas(2, True, st, 3)

    class Sim:
        now = 0.0

    sim = Sim()
    for i in range(200):
        sim.now = i * 0.001
        p._send(0, [("x", i)], sim)  # type: ignore[arg-type]
    dues = [due for due, *_ in p._queue]
    got = [heapq.heappop(p._queue)[3] for _ in range(len(p._queue))]
    assert got == list(range(200))
    assert len(set(dues)) > 20  # the delays did vary
