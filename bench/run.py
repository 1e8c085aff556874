"""``python -m bench.run [--quick] [--out docs]``: the routing benchmark.

Every (workload, load level, policy) is one independent simulation with its own seeds, so the
runs are spread over processes and the numbers do not depend on how they were scheduled.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from bench import report
from bench.des import Metrics, SimConfig, check_engine_path, run_once
from bench.policies import Ours, params_with, policy_factories
from bench.workloads import DEFAULT_TRACE, Workload, seed_of, standard_workloads

# The addon's Router logs its fail-open warnings as it would in mitmproxy; in the
# controller-down runs that is one line per simulated outage, which says nothing here.
logging.getLogger("addon").setLevel(logging.ERROR)

# How stale the controller view is in the staleness case: LMCache workers batch their
# admit/evict messages, and a controller under load answers from a view seconds old.
STALENESS_S = 2.0
# The addon's routing knobs tried in the sweep section (config key: values); the defaults
# in addon/policy.py (PolicyParams) were chosen from these tables.
SWEEPS: dict[str, tuple[float, ...]] = {
    "prefill_share": (0.5, 0.6, 0.7, 0.8, 1.0),
    "request_tokens": (64, 128, 160, 256),
    "request_output_tokens": (0, 128, 160, 256),
    "recent_tokens": (0, 50_000, 100_000, 200_000),
    "hot_half_life": (0, 3, 10, 30),
    "hot_headroom": (0, 0.25, 0.5, 0.75),
    "hot_copy_credit": (0.25, 0.5, 0.75, 1.0),
    "congestion_tokens": (0, 1000, 3000, 5000),
    "spill_margin": (0, 0.5, 1, 2),
    "spill_floor_tokens": (0, 256, 768, 1024),
}
# recent_tokens only matters when the controller cannot answer: swept with it down.
SWEEP_DOWN = {"recent_tokens"}

_WORKLOADS: dict[str, Workload] = {}
_CFG = SimConfig()
_SEED = 0

RunKey = tuple[str, int, str]  # workload, load level index, policy name
K = TypeVar("K")
V = TypeVar("V")


def variant_names() -> list[str]:
    return ["ours[controller-down]", f"ours[stale-{STALENESS_S:g}s]"]


def sweep_name(knob: str, value: float) -> str:
    down = "down," if knob in SWEEP_DOWN else ""
    return f"ours[{down}{knob}={value:g}]"


def sweep_names() -> list[str]:
    return [sweep_name(k, v) for k, values in SWEEPS.items() if params_with(**{k: values[0]})
            for v in values]


def resolve(name: str, cfg: SimConfig) -> tuple[Any, SimConfig]:
    """A fresh policy object and the cluster config for a row name."""
    if name == "ours[controller-down]":
        return Ours(name), replace(cfg, controller_down=True)
    m = re.fullmatch(r"ours\[stale-([0-9.]+)s\]", name)
    if m:
        return Ours(name), replace(cfg, staleness_s=float(m.group(1)))
    # ours[knob=value] or, several knobs at once, ours[knob=value+knob=value].
    m = re.fullmatch(r"ours\[(down,)?(\w+=[0-9.]+(?:\+\w+=[0-9.]+)*)\]", name)
    if m:
        knobs: dict[str, float | int] = {}
        for item in m.group(2).split("+"):
            field, raw = item.split("=")
            knobs[field] = float(raw) if "." in raw else int(raw)
        params = params_with(**knobs)
        if params is None:
            raise ValueError(f"the addon's PolicyParams has no {', '.join(knobs)}")
        return Ours(name, params), replace(cfg, controller_down=bool(m.group(1)))
    return policy_factories()[name](), cfg


def simulate(w: Workload, level: int, pname: str, cfg: SimConfig, seed: int) -> Metrics:
    """One run: workload `w` at its load level `level` under the policy row `pname`."""
    qps = w.qps_levels(cfg)[level]
    policy, run_cfg = resolve(pname, cfg)
    metrics, _ = run_once(w.requests, w.times(qps, seed), policy, run_cfg,
                          seed_of(seed, "policy", w.name, level, pname))
    return metrics


def _run(key: RunKey) -> tuple[RunKey, dict[str, Any]]:
    wname, level, pname = key
    return key, asdict(simulate(_WORKLOADS[wname], level, pname, _CFG, _SEED))


def _cost(key: RunKey) -> float:
    w = _WORKLOADS[key[0]]
    return sum(len(r.prompt) for r in w.requests) * (3.0 if key[2] == "oracle" else 1.0)


def run_parallel(fn: Callable[[K], tuple[K, V]], keys: Sequence[K], jobs: int) -> dict[K, V]:
    """``fn`` over ``keys`` in ``jobs`` processes forked from this one."""
    if jobs <= 1:
        return dict(fn(k) for k in keys)
    # fork: the workers inherit the workloads built in this process instead of unpickling
    # megabytes of prompts each.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return dict(pool.map(fn, keys, chunksize=1))


def run_all(keys: Sequence[RunKey], jobs: int) -> dict[RunKey, dict[str, Any]]:
    # Longest first, so the last runs to finish are short ones (less idle time per core).
    return run_parallel(_run, sorted(keys, key=_cost, reverse=True), jobs)


def main(argv: Sequence[str] | None = None) -> int:
    global _CFG, _SEED
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="a small version (fewer requests, 3 load levels) in a few seconds")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for routing-benchmark.md/.json and the plots "
                         "(default: docs, or nothing written with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workloads", default="",
                    help="comma-separated subset (shared-prefix,chat,docqa,no-reuse,"
                         "hot-prefix,trace)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                    help="JSONL trace for the trace workload (see bench/workloads.py)")
    ap.add_argument("--capacity-tokens", type=int, default=None,
                    help=f"KV cache per engine (default {SimConfig.capacity_tokens}, "
                         "a quarter of that with --quick)")
    ap.add_argument("--max-batch", type=int, default=SimConfig.max_batch)
    ap.add_argument("--block-size", type=int, default=SimConfig.block_size)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--sweeps", action="store_true",
                    help="also sweep the addon's routing knobs (how the defaults were chosen)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out if args.out is not None else (None if args.quick else Path("docs"))

    _SEED = args.seed
    capacity = args.capacity_tokens
    if capacity is None:
        # --quick shrinks the cluster's cache, and with it every working set (groups, users,
        # documents), so the workloads keep their shape with a quarter of the requests.
        capacity = SimConfig.capacity_tokens // (4 if args.quick else 1)
    _CFG = SimConfig(capacity_tokens=capacity, max_batch=args.max_batch,
                     block_size=args.block_size)
    # The fast engine path must be the engine model's; refuse to publish numbers otherwise.
    check_engine_path(_CFG.block_size)

    names = [n for n in args.workloads.split(",") if n]
    scale = 0.25 if args.quick else 1.0
    workloads = standard_workloads(_CFG, args.seed, scale, args.trace, names or None)
    if args.quick:
        for w in workloads:
            lf = w.load_factors
            w.load_factors = (lf[0], lf[len(lf) // 2], lf[-1])
    _WORKLOADS.clear()
    _WORKLOADS.update({w.name: w for w in workloads})
    t_built = time.perf_counter()

    policies = list(policy_factories()) + variant_names()
    keys = [(w.name, i, p) for w in workloads for i in range(len(w.load_factors))
            for p in policies]
    results = run_all(keys, args.jobs)

    # The sweeps of the addon's knobs run where they matter: at the highest load round
    # robin still sustains and at its saturation point.
    sweep_keys: list[RunKey] = []
    for w in workloads if args.sweeps else []:
        sat = report.saturation(w, results)
        for level in sorted({lv for lv in (sat.below, sat.at) if lv is not None}):
            for name in sweep_names():
                sweep_keys.append((w.name, level, name))
    results.update(run_all(sweep_keys, args.jobs))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not args.no_plots:
            report.plots(workloads, _CFG, policies, results, out)
    wall = time.perf_counter() - t0

    command = "python -m bench.run" + (" " + shlex.join(argv) if argv else "")
    meta = {
        "command": command,
        "seed": args.seed,
        "quick": args.quick,
        "config": asdict(_CFG),
        "cost_model": asdict(_CFG.cost_model()),
        "staleness_s": STALENESS_S,
        "sweeps": {k: list(v) for k, v in SWEEPS.items()},
        "sweep_names": {k: [sweep_name(k, x) for x in v] for k, v in SWEEPS.items()},
        "runs": len(keys) + len(sweep_keys),
        "jobs": args.jobs,
        "cpus": os.cpu_count(),
        "build_s": t_built - t0,
        "wall_s": wall,
    }
    doc = report.build(workloads, _CFG, policies, results, meta)
    print(doc.markdown)
    if out is not None:
        (out / "routing-benchmark.md").write_text(doc.markdown)
        (out / "routing-benchmark.json").write_text(doc.json_text)
        print(f"wrote {out / 'routing-benchmark.md'}, routing-benchmark.json"
              + ("" if args.no_plots else " and bench-<workload>.png"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
