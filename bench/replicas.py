"""``python -m bench.replicas [--seeds 0,1,2] [--staleness-from FILE | --staleness-ms 1.0]``:
N proxy replicas behind an L4 load balancer, against one router.

Each request goes to a replica drawn at random (seeded); every replica is the addon's
``Router`` (``bench.policies.Ours``) in front of the same simulated cluster and the same
LMCache controller. Rows:

- ``one``: a single router sees every request (``routing-pooled.md``'s ``ours``);
- ``memory-N``: N replicas, each with only its own state (the ``memory`` state backend);
- ``redis-N``: N replicas sharing their requests through ``addon.replicas.ReplicaSync``;
  every batch one replica publishes reaches every other one after a delay drawn from the
  staleness the real link showed with N real replicas (``--staleness-from``, the report
  of ``python -m bench.replica_staleness``; the default) or a fixed ``--staleness-ms``,
  in the order each replica sent them.

Cells are those of ``bench.pooled`` (every load level up to round robin's saturation, found
per seed), with the controller up and down; each cell's TTFT p95 pools every request of the
seeds, and each row is given as its ratio to ``one`` in the same cell.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from addon.replicas import ReplicaSync
from bench import report
from bench.des import SimConfig, SimRequest, Simulation, percentile, run_once
from bench.policies import BasePolicy, Ours, _event_loop
from bench.run import resolve, run_parallel
from bench.workloads import DEFAULT_TRACE, Workload, seed_of, standard_workloads

# The controller-down runs log one fail-open warning per outage per router.
logging.getLogger("addon").setLevel(logging.ERROR)

# The bound: redis-N's geometric mean of p95 ratios to one router, over all cells.
WIN_BOUND = 1.03
MODES = ("up", "down")  # the controller


@dataclass(frozen=True)
class Staleness:
    """Seconds a batch takes from one replica to the others: drawn by inverse transform
    from measured percentiles (piecewise linear between them), or a constant."""

    knots: tuple[tuple[float, float], ...]  # (cumulative share, seconds), shares ascending
    label: str

    @classmethod
    def constant(cls, seconds: float) -> Staleness:
        return cls(((0.0, seconds), (1.0, seconds)), f"{seconds * 1000:g} ms")

    @classmethod
    def measured(cls, ms: dict[str, float], label: str) -> Staleness:
        """From {"p10": .., ..., "p99": .., "max": ..} in milliseconds; below p10, p10."""
        pts = sorted((float(k[1:]) / 100, v / 1000) for k, v in ms.items()
                     if k.startswith("p") and k[1:].isdigit())
        if not pts:
            raise ValueError("no percentiles")
        knots = [(0.0, pts[0][1]), *pts]
        if "max" in ms:
            knots.append((1.0, ms["max"] / 1000))
        return cls(tuple(knots), label)

    def draw(self, rng: random.Random) -> float:
        u = rng.random()
        prev = self.knots[0]
        for k in self.knots[1:]:
            if u <= k[0]:
                span = k[0] - prev[0]
                return prev[1] + (k[1] - prev[1]) * ((u - prev[0]) / span if span else 1.0)
            prev = k
        return prev[1]


def load_staleness(path: Path, ns: Sequence[int], rate: float) -> dict[int, Staleness]:
    """Per replica count, the staleness measured with that many real replicas (else the
    nearest count measured) at `rate` req/s (else the nearest rate), from
    ``bench.replica_staleness``'s JSON."""
    runs = json.loads(path.read_text())["runs"]
    if not runs:
        raise ValueError(f"{path}: no runs")
    out = {}
    for n in ns:
        run = min(runs, key=lambda r: (abs(r["replicas"] - n), abs(r["rate"] - rate)))
        out[n] = Staleness.measured(
            run["staleness_ms"], f"measured with {run['replicas']} replicas at "
            f"{run['rate']:g} req/s: p50 {run['staleness_ms']['p50']:g} ms, p99 "
            f"{run['staleness_ms']['p99']:g} ms, max {run['staleness_ms']['max']:g} ms")
    return out


@dataclass
class ReplicaView:
    """What one replica's index held of the others' requests, over a run."""

    foreign_max: int = 0  # most requests of other replicas in its index at once
    foreign_seen: int = 0  # callbacks at which it held at least one


class Replicas(BasePolicy):
    """`n` routers (``Ours``), each request routed by one drawn at random; with `shared`,
    each router's ``ReplicaSync`` batches reach every other one after `staleness` (seconds,
    or drawn per batch), each sender's in the order sent (one TCP stream through Redis)."""

    def __init__(self, n: int, shared: bool, staleness: float | Staleness, seed: int,
                 name: str | None = None, **ours: Any) -> None:
        if n < 1:
            raise ValueError("at least one replica")
        self.name = name or f"{'redis' if shared else 'memory'}-{n}"
        self.n = n
        self.shared = shared
        self.staleness = (staleness if isinstance(staleness, Staleness)
                          else Staleness.constant(staleness))
        self.rng = random.Random(seed)
        self.delay_rng = random.Random(seed + 1)
        self.replicas = [Ours(f"{self.name}#{i}", **ours) for i in range(n)]
        self.syncs: list[ReplicaSync] = []
        self.owner: dict[int, int] = {}  # request -> the replica that routed it
        self.own: list[int] = [0] * n  # each replica's own requests in flight
        self.views = [ReplicaView() for _ in range(n)]
        # (due, order sent, sender, seq, events), a heap by due time
        self._queue: list[tuple[float, int, int, int, list[Any]]] = []
        self._last_due = [0.0] * n
        self._seq = [0] * n
        self.batches = 0

    # -- the replicas and the link between them ------------------------------------------

    def _build(self, sim: Simulation) -> None:
        """Every replica's router at once (the first route, as ``Ours`` does for its one),
        so that each can hear of the others' requests before it routes one itself."""
        loop = _event_loop()
        for i, o in enumerate(self.replicas):
            o.router = o._make(sim)
            o._loop = loop
            if self.shared:
                self.syncs.append(ReplicaSync(
                    o.router, f"p{i}", lambda events, i=i: self._send(i, events, sim),
                    peer_timeout=1e9, clock=lambda: sim.now))

    def _send(self, sender: int, events: list[Any], sim: Simulation) -> None:
        due = max(sim.now + self.staleness.draw(self.delay_rng), self._last_due[sender])
        self._last_due[sender] = due
        heapq.heappush(self._queue, (due, self.batches, sender, self._seq[sender], events))
        self._seq[sender] += 1
        self.batches += 1

    def _deliver(self, sim: Simulation) -> None:
        """Every batch due by now, in the order sent, to every other replica."""
        q = self._queue
        while q and q[0][0] <= sim.now:
            _, _, sender, seq, events = heapq.heappop(q)
            for j, sync in enumerate(self.syncs):
                if j != sender:
                    sync.receive(f"p{sender}", seq, events)
        for i, o in enumerate(self.replicas):
            assert o.router is not None
            foreign = len(o.router.index) - self.own[i]
            v = self.views[i]
            if foreign > 0:
                v.foreign_seen += 1
                v.foreign_max = max(v.foreign_max, foreign)

    # -- the simulation's callbacks ----------------------------------------------------
    # No on_bypass: Ours has none, and the simulation calls on_finish for bypassing
    # requests when a policy has one.

    def route(self, req: SimRequest, sim: Simulation) -> str:
        if self.replicas[0].router is None:
            self._build(sim)
        self._deliver(sim)
        i = self.rng.randrange(self.n)
        self.owner[req.idx] = i
        self.own[i] += 1
        return self.replicas[i].route(req, sim)

    def on_first_token(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        self._deliver(sim)
        self.replicas[self.owner[req.idx]].on_first_token(req, eid, sim)

    def on_finish(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        self._deliver(sim)
        i = self.owner.pop(req.idx)
        self.own[i] -= 1
        self.replicas[i].on_finish(req, eid, sim)

    def on_scrape(self, sim: Simulation) -> None:
        if self.replicas[0].router is None:
            return  # as Ours: nothing to report to before the first route
        self._deliver(sim)
        for o in self.replicas:  # each replica scrapes the engines itself
            o.on_scrape(sim)


def config_names(ns: Sequence[int]) -> list[str]:
    return ["one"] + [f"{kind}-{n}" for n in ns for kind in ("memory", "redis")]


def make_policy(config: str, staleness: float | Staleness, seed: int) -> Any:
    """A fresh policy for a row name (`seed`: the replicas' draw)."""
    if config == "one":
        return Ours("one")
    kind, _, n = config.partition("-")
    if kind not in ("memory", "redis") or not n.isdigit():
        raise ValueError(f"unknown configuration {config!r}")
    return Replicas(int(n), kind == "redis", staleness, seed)


@dataclass
class RunResult:
    ttfts: list[float]
    cached: int
    prompt: int
    views: list[dict[str, int]] = field(default_factory=list)
    batches: int = 0


def run_cell(w: Workload, level: int, config: str, cfg: SimConfig, seed: int,
             staleness: float | Staleness, mode: str = "up") -> tuple[RunResult, Any]:
    """One run of `config` on workload `w` at load level `level`; the policy object too.

    The simulation's seed is ``bench.pooled``'s for ``ours`` whatever the row, and the
    replicas' draw is the same for memory-N and redis-N: rows differ only in how they route.
    """
    if mode not in MODES:
        raise ValueError(f"controller mode {mode!r}")
    qps = w.qps_levels(cfg)[level]
    run_cfg = replace(cfg, controller_down=mode == "down")
    n = config.rpartition("-")[2]
    policy = make_policy(config, staleness, seed_of(seed, "replicas", w.name, level, n))
    _, records = run_once(w.requests, w.times(qps, seed), policy, run_cfg,
                          seed_of(seed, "policy", w.name, level, "ours"))
    res = RunResult([r.ttft for r in records], sum(r.cached_tokens for r in records),
                    sum(r.prompt_tokens for r in records))
    if isinstance(policy, Replicas):
        res.views = [asdict(v) for v in policy.views]
        res.batches = policy.batches
    return res, policy


# --- the runs, spread over processes ----------------------------------------------------

_WORKLOADS: dict[tuple[int, str], Workload] = {}
_CFG = SimConfig()
_STALENESS: dict[int, Staleness] = {}

Key = tuple[int, str, int, str, str]  # seed, workload, level, row, controller mode


def _run(key: Key) -> tuple[Key, RunResult]:
    seed, wname, level, config, mode = key
    w = _WORKLOADS[(seed, wname)]
    if config == "round-robin":
        policy, cfg = resolve(config, _CFG)
        _, records = run_once(w.requests, w.times(w.qps_levels(_CFG)[level], seed), policy,
                              cfg, seed_of(seed, "policy", w.name, level, config))
        return key, RunResult([r.ttft for r in records], 0, 0)
    n = config.rpartition("-")[2]
    staleness = _STALENESS.get(int(n)) if n.isdigit() else None
    return key, run_cell(w, level, config, _CFG, seed,
                         staleness or Staleness.constant(0.001), mode)[0]


def _p95(samples: Sequence[float]) -> float:
    return percentile(samples, 95)


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def cells_of(seeds: Sequence[int], order: Sequence[str], levels: dict[str, int],
             rr: dict[Key, RunResult], all_levels: bool = False) -> list[tuple[str, int]]:
    """``bench.pooled``'s cells: per workload, every level up to round robin's saturation
    at the seed where it comes latest."""
    cells = []
    for w in order:
        tops = []
        for s in seeds:
            if all_levels:
                tops.append(levels[w] - 1)
                continue
            sat = report.saturation(_WORKLOADS[(s, w)], {
                (w, lv, "round-robin"): {"ttft_p95": _p95(rr[(s, w, lv, "round-robin", "up")]
                                                          .ttfts)}
                for lv in range(levels[w])})
            tops.append(sat.at if sat.at is not None else levels[w] - 1)
        cells += [(w, lv) for lv in range(max(tops) + 1)]
    return cells


def summarize(res: dict[Key, RunResult], seeds: Sequence[int], cells: Sequence[tuple[str, int]],
              configs: Sequence[str]) -> dict[str, Any]:
    """Per mode: per cell the pooled p95 and hit ratio of each row and its ratio to one; per
    row the geometric mean of the ratios and the worst cell."""
    out: dict[str, Any] = {}
    for mode in MODES:
        if not any(k[4] == mode for k in res):
            continue
        rows: list[dict[str, Any]] = []
        for w, lv in cells:
            row: dict[str, Any] = {"workload": w, "level": lv, "configs": {}}
            for c in configs:
                runs = [res[(s, w, lv, c, mode)] for s in seeds]
                p95 = _p95([x for r in runs for x in r.ttfts])
                prompt = sum(r.prompt for r in runs)
                row["configs"][c] = {
                    "ttft_p95": p95,
                    "hit_ratio": sum(r.cached for r in runs) / prompt if prompt else 0.0,
                    "per_seed_p95": [_p95(r.ttfts) for r in runs],
                    "foreign_max": max((v["foreign_max"] for r in runs for v in r.views),
                                       default=0),
                }
            one = row["configs"]["one"]
            for c in configs:
                d = row["configs"][c]
                d["ratio"] = d["ttft_p95"] / one["ttft_p95"]
                d["hit_ratio_ratio"] = (d["hit_ratio"] / one["hit_ratio"]
                                        if one["hit_ratio"] else float("nan"))
                d["per_seed_ratio"] = [a / b for a, b in
                                       zip(d["per_seed_p95"], one["per_seed_p95"], strict=True)]
            rows.append(row)
        summary: dict[str, Any] = {}
        for c in configs:
            ratios = [r["configs"][c]["ratio"] for r in rows]
            worst = max(range(len(rows)), key=lambda i: ratios[i])
            hits = [r["configs"][c]["hit_ratio_ratio"] for r in rows
                    if r["configs"]["one"]["hit_ratio"] > 0]
            summary[c] = {
                "geomean": geomean(ratios),
                "worst": ratios[worst],
                "worst_cell": [rows[worst]["workload"], rows[worst]["level"]],
                "best": min(ratios),
                "hit_ratio_geomean": geomean(hits) if hits else float("nan"),
                "pass": geomean(ratios) <= WIN_BOUND,
            }
        out[mode] = {"cells": rows, "summary": summary}
    return out


def render(data: dict[str, Any], command: str, seeds: Sequence[int], configs: Sequence[str],
           staleness: dict[int, Staleness], qps: dict[tuple[str, int], float],
           meta: dict[str, Any]) -> list[str]:
    seeds_s = ", ".join(map(str, seeds))
    redis = [c for c in configs if c.startswith("redis-")]
    lines = [
        "# Routing benchmark: N proxy replicas against one router", "",
        f"Command: `{command}`. The simulation of `routing-benchmark.md` (virtual time, "
        "deterministic). Each request goes to one of N replicas drawn at random (an L4 load "
        "balancer); every replica is the addon's `Router` in front of the same 4 engines and "
        "the same LMCache controller, and scrapes the engines' metrics itself. "
        "`memory-N`: each replica knows only its own requests. "
        "`redis-N`: replicas share them through `addon/replicas.py` (`ReplicaSync`); each "
        "batch one publishes reaches the others after a delay drawn per batch from the "
        "staleness measured on the real link (each sender's batches in the order sent). "
        "`one`: a single router sees every request.", "",
        "Staleness: " + "; ".join(f"N={n}: {st.label}" for n, st in sorted(staleness.items()))
        + ".", "",
        f"Each cell is the TTFT p95 of every request of seeds {seeds_s} pooled; rows are given "
        "as their ratio to `one` in the same cell (in brackets: the range of the same ratio "
        "seed by seed). Cells are `routing-pooled.md`'s (every load level up to round robin's "
        f"saturation), with the controller up and down. "
        f"Win condition: `redis-N` geometric mean over all cells <= {WIN_BOUND:g}, for every N, "
        "controller up and down.", "",
        "## Summary", "",
        "| controller | row | geomean p95 / one | worst cell (p95 / one) | best cell | "
        "hit ratio / one (geomean) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        if mode not in data:
            continue
        for c in configs:
            if c == "one":
                continue
            s = data[mode]["summary"][c]
            w, lv = s["worst_cell"]
            verdict = ("PASS" if s["pass"] else "FAIL") if c in redis else ""
            lines.append(
                f"| {mode} | {c} | {s['geomean']:.3f} | {s['worst']:.3f} ({w} @ "
                f"{qps[(w, lv)]:g} QPS) | {s['best']:.3f} | {s['hit_ratio_geomean']:.3f} "
                f"| {verdict} |")
    lines += [""]
    for mode in MODES:
        if mode not in data:
            continue
        verdicts = [f"N={c.split('-')[1]}: "
                    f"{'PASS' if data[mode]['summary'][c]['pass'] else 'FAIL'} "
                    f"({data[mode]['summary'][c]['geomean']:.3f})" for c in redis]
        lines.append(f"- controller {mode}: " + "; ".join(verdicts))
    lines += [""]
    for mode in MODES:
        if mode not in data:
            continue
        lines += [f"## Controller {mode}", "",
                  "`one`: pooled TTFT p95 in seconds and hit ratio; other rows: p95 / one "
                  "(per-seed range).", "",
                  "| workload | QPS (seed 0) | one | " + " | ".join(configs[1:]) + " |",
                  "|---|---|---|" + "---|" * (len(configs) - 1)]
        for row in data[mode]["cells"]:
            w, lv = row["workload"], row["level"]
            one = row["configs"]["one"]
            cols = []
            for c in configs[1:]:
                d = row["configs"][c]
                ps = d["per_seed_ratio"]
                cols.append(f"{d['ratio']:.3f} ({min(ps):.2f}-{max(ps):.2f})")
            lines.append(f"| {w} | {qps[(w, lv)]:g} | {one['ttft_p95']:.3f} "
                         f"({one['hit_ratio']:.0%}) | " + " | ".join(cols) + " |")
        lines.append("")
    lines += [
        f"{meta['runs']} simulations; wall time {meta['wall_s']:.1f} s on {meta['jobs']} "
        "process(es).", ""]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    global _CFG
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--staleness-from", type=Path,
                    default=Path(__file__).parents[1] / "docs" / "replica-staleness.json",
                    help="bench.replica_staleness's JSON: per N, the delays measured with N "
                         "real replicas (default docs/replica-staleness.json)")
    ap.add_argument("--staleness-rate", type=float, default=100.0,
                    help="which of its runs: the total request rate (default 100 req/s)")
    ap.add_argument("--staleness-ms", type=float, default=None,
                    help="a fixed delay instead, in ms")
    ap.add_argument("--replicas", default="2,4,8", help="comma-separated replica counts")
    ap.add_argument("--workloads", default="",
                    help="comma-separated subset (shared-prefix,chat,docqa,no-reuse,"
                         "hot-prefix,trace)")
    ap.add_argument("--modes", default="up,down", help="controller modes (up,down)")
    ap.add_argument("--all-levels", action="store_true",
                    help="every load level, not only those up to round robin's saturation")
    ap.add_argument("--quick", action="store_true",
                    help="a small version (a quarter of the cache and requests, 3 levels)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for replicas-sim.md/.json (default: docs, nothing "
                         "written with --quick)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    ns = [int(n) for n in args.replicas.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    if not seeds or not ns or any(m not in MODES for m in modes):
        ap.error("need seeds, replica counts and modes among up,down")
    out_dir = args.out if args.out is not None else (None if args.quick else Path("docs"))
    _STALENESS.clear()
    if args.staleness_ms is not None:
        _STALENESS.update({n: Staleness.constant(args.staleness_ms / 1000) for n in ns})
    else:
        _STALENESS.update(load_staleness(args.staleness_from, ns, args.staleness_rate))
    scale = 0.25 if args.quick else 1.0
    _CFG = SimConfig(capacity_tokens=SimConfig.capacity_tokens // (4 if args.quick else 1))
    names = [n for n in args.workloads.split(",") if n] or None
    _WORKLOADS.clear()
    for seed in seeds:
        for w in standard_workloads(_CFG, seed, scale, DEFAULT_TRACE, names):
            if args.quick:
                lf = w.load_factors
                w.load_factors = (lf[0], lf[len(lf) // 2], lf[-1])
            _WORKLOADS[(seed, w.name)] = w
    order = [w for s, w in _WORKLOADS if s == seeds[0]]
    levels = {w: len(_WORKLOADS[(seeds[0], w)].load_factors) for w in order}
    rr: dict[Key, RunResult] = {}
    if not args.all_levels:
        rr = run_parallel(_run, [(s, w, lv, "round-robin", "up") for s in seeds for w in order
                                 for lv in range(levels[w])], args.jobs)
    cells = cells_of(seeds, order, levels, rr, args.all_levels)
    configs = config_names(ns)
    # Seed by seed, cell by cell, every row and mode next to each other.
    keys = [(s, w, lv, c, m) for s in seeds for w, lv in cells for m in modes for c in configs]
    res = run_parallel(_run, keys, args.jobs)
    wall = time.perf_counter() - t0

    command = "python -m bench.replicas" + (" " + shlex.join(argv) if argv else "")
    data = summarize(res, seeds, cells, configs)
    qps = {(w, lv): _WORKLOADS[(seeds[0], w)].qps_levels(_CFG)[lv] for w, lv in cells}
    meta = {"command": command, "seeds": seeds, "replicas": ns,
            "staleness": {n: st.label for n, st in _STALENESS.items()},
            "quick": args.quick, "config": asdict(_CFG), "win_bound": WIN_BOUND,
            "runs": len(rr) + len(keys), "jobs": args.jobs, "cpus": os.cpu_count(),
            "wall_s": wall}
    lines = render(data, command, seeds, configs, _STALENESS, qps, meta)
    for mode in data:
        for row in data[mode]["cells"]:
            row["qps_seed0"] = qps[(row["workload"], row["level"])]
    if out_dir is None:
        print("\n".join(lines))
    else:
        report.publish(lines, out_dir, "replicas-sim.md")
        (out_dir / "replicas-sim.json").write_text(
            json.dumps({"meta": meta, "results": data}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
