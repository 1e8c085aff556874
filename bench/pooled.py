"""``python -m bench.pooled [--seeds 0,1,2] [--out docs]``: what the proxy cannot see, pooled.

Two questions, each cell answered over several seeds pooled (every request's TTFT of every
seed in one sample, so a cell's p95 rests on ~3x the requests of one run), with the
seed-to-seed spread of the ratio beside it:

1. **Clients that do not stream.** The addon learns that a streamed request's prefill is
   over from its first body byte; of a non-streamed one only from the engine's metrics
   (scraped every ``SimConfig.scrape_interval_s``, the same for llm-d). Rows: all clients
   streaming (``ours``), half, none, and none with the engine metrics off; llm-d and Dynamo
   beside them (Dynamo's router sees the engines' tokens whatever the client does).
2. **Traffic that bypasses the policy.** ``--bypass`` (default 0.3) of the requests go
   straight to a random engine; every policy sees them only as engine metrics can show them
   (llm-d, ours); TTFT is over the policy's own requests.

Cells: every load level up to round robin's saturation (found per seed without bypass, as
in ``routing-benchmark.md``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from bench import report
from bench.des import SimConfig, percentile, run_once
from bench.policies import policy_factories
from bench.run import resolve, run_parallel
from bench.workloads import DEFAULT_TRACE, Workload, seed_of, standard_workloads

# ours[no-stream,gauges-only]: the engine metrics without vLLM's first-token and finished
# counters, what the counters add for clients that do not stream.
STREAM_ROWS = ["ours", "ours[half-stream]", "ours[no-stream]", "ours[no-stream,gauges-only]",
               "ours[no-stream,no-metrics]", "llm-d", "dynamo"]
BYPASS_WORKLOADS = ("chat", "docqa", "trace")
# ours[no-stream] against ours: the bound.
NO_STREAM_SLACK = 0.10

_WORKLOADS: dict[tuple[int, str], Workload] = {}
_CFG = SimConfig()

Key = tuple[int, str, int, str, float]  # seed, workload, level, policy, bypass share


def _run(key: Key) -> tuple[Key, list[float]]:
    seed, wname, level, pname, bypass = key
    w = _WORKLOADS[(seed, wname)]
    policy, cfg = resolve(pname, replace(_CFG, bypass_share=bypass))
    qps = w.qps_levels(_CFG)[level]
    metrics, records = run_once(w.requests, w.times(qps, seed), policy, cfg,
                                seed_of(seed, "policy", w.name, level, pname))
    sim_bypass = {r.idx for r in records if r.reason == "bypass"}
    return key, [r.ttft for r in records if r.idx not in sim_bypass]


def _p95(samples: Sequence[float]) -> float:
    return percentile(samples, 95)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.pooled", description=__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bypass", type=float, default=0.3)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--scrape-interval", type=float, default=SimConfig.scrape_interval_s,
                    help="seconds between engine-metrics reads (llm-d and ours alike)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    global _CFG
    _CFG = replace(_CFG, scrape_interval_s=args.scrape_interval)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for seed in seeds:
        for w in standard_workloads(_CFG, seed, 1.0, DEFAULT_TRACE):
            _WORKLOADS[(seed, w.name)] = w
    order = [w for s, w in _WORKLOADS if s == seeds[0]]
    levels = {w: len(_WORKLOADS[(seeds[0], w)].load_factors) for w in order}
    # Round robin first (seed by seed): it sets the levels the cells cover.
    rr = run_parallel(_run, [(s, w, lv, "round-robin", 0.0) for s in seeds for w in order
                             for lv in range(levels[w])], args.jobs)
    top: dict[str, int] = {}
    for w in order:
        tops = []
        for s in seeds:
            sat = report.saturation(_WORKLOADS[(s, w)], {
                (w, lv, "round-robin"): {"ttft_p95": _p95(rr[(s, w, lv, "round-robin", 0.0)])}
                for lv in range(levels[w])})
            tops.append(sat.at if sat.at is not None else levels[w] - 1)
        top[w] = max(tops)
    peers = [p for p in policy_factories() if not report.is_ours(p) and p != "oracle"]
    keys: list[Key] = []
    for w in order:
        for lv in range(top[w] + 1):
            keys += [(s, w, lv, p, 0.0) for s in seeds for p in STREAM_ROWS]
            if w in BYPASS_WORKLOADS:
                keys += [(s, w, lv, p, args.bypass) for s in seeds
                         for p in ["ours", *peers, "oracle"]]
    res = {**rr, **run_parallel(_run, sorted(set(keys) - set(rr)), args.jobs)}
    wall = time.perf_counter() - t0

    def pooled(w: str, lv: int, p: str, b: float) -> float:
        return _p95([x for s in seeds for x in res[(s, w, lv, p, b)]])

    def spread(w: str, lv: int, a: str, b_: str, b: float) -> str:
        rs = [_p95(res[(s, w, lv, a, b)]) / _p95(res[(s, w, lv, b_, b)]) for s in seeds]
        return f"{min(rs):.2f}-{max(rs):.2f}"

    command = "python -m bench.pooled" + (" " + shlex.join(argv) if argv else "")
    seeds_s = ", ".join(map(str, seeds))
    out = [
        "# Routing benchmark, pooled seeds: clients that do not stream, traffic that "
        "bypasses the proxy", "",
        f"Command: `{command}`. The simulation of `routing-benchmark.md`; each cell is the "
        f"TTFT p95 of every request of seeds {seeds_s} pooled (ratios: pooled p95 over pooled "
        "p95; in brackets the range of the same ratio seed by seed). Engine metrics are "
        f"read every {_CFG.scrape_interval_s:g} s by every policy that reads them (llm-d, "
        "ours); cells are the load levels up to round robin's saturation.", "",
        "## 1. Clients that do not stream", "",
        "`ours[no-stream]` / `ours` must stay within "
        f"{NO_STREAM_SLACK:.0%} at every level; `!` marks a cell where it does not.", "",
        "| workload | QPS (seed 0) | " + " | ".join(STREAM_ROWS)
        + " | no-stream / ours (per seed) |",
        "|---|---|" + "---|" * (len(STREAM_ROWS) + 1),
    ]
    held = total = 0
    for w in order:
        for lv in range(top[w] + 1):
            q = _WORKLOADS[(seeds[0], w)].qps_levels(_CFG)[lv]
            vals = {p: pooled(w, lv, p, 0.0) for p in STREAM_ROWS}
            r = vals["ours[no-stream]"] / vals["ours"]
            ok = r <= 1 + NO_STREAM_SLACK
            held += ok
            total += 1
            out.append(f"| {w} | {q:g} | " + " | ".join(f"{vals[p]:.3f}" for p in STREAM_ROWS)
                       + f" | {r:.3f}{'' if ok else ' !'} "
                       f"({spread(w, lv, 'ours[no-stream]', 'ours', 0.0)}) |")
    out += ["", f"`ours[no-stream]` within {NO_STREAM_SLACK:.0%} of `ours`: {held} of "
            f"{total} cells.", ""]
    out += [f"## 2. {args.bypass:.0%} of the traffic bypasses the policy", "",
            "Best = the lowest pooled p95 among the non-oracle peers; ours / best must be "
            f"<= 1 + {report.WIN_SLACK:g} (`!` where not).", "",
            "| workload | QPS (seed 0) | ours | best peer | ours / best (per seed) | oracle |",
            "|---|---|---|---|---|---|"]
    held = total = 0
    for w in order:
        if w not in BYPASS_WORKLOADS:
            continue
        for lv in range(top[w] + 1):
            q = _WORKLOADS[(seeds[0], w)].qps_levels(_CFG)[lv]
            ours = pooled(w, lv, "ours", args.bypass)
            best_p = min(peers, key=lambda p, w=w, lv=lv: pooled(w, lv, p, args.bypass))
            best = pooled(w, lv, best_p, args.bypass)
            r = ours / best
            ok = r <= 1 + report.WIN_SLACK
            held += ok
            total += 1
            out.append(f"| {w} | {q:g} | {ours:.3f} | {best_p}: {best:.3f} | {r:.3f}"
                       f"{'' if ok else ' !'} ({spread(w, lv, 'ours', best_p, args.bypass)}) | "
                       f"{pooled(w, lv, 'oracle', args.bypass):.3f} |")
    out += ["", f"Ours best or within {report.WIN_SLACK:.0%}: {held} of {total} cells.", "",
            f"{len(res)} simulations; wall time {wall:.1f} s on {args.jobs} process(es).", ""]
    report.publish(out, args.out, "routing-pooled.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
