"""``python -m bench.seeds``: the win conditions over several seeds.

One seed's table (``python -m bench.run``) judges each cell on one sample of arrivals and
prompts: a cell's p95 moves by ~10% between seeds, five times the 2% win margin. This runs the
cells the win conditions cover (every load level up to round robin's saturation, found per
seed) for several seeds, with every non-oracle peer and the addon's policy with its defaults
and with each of its newer knobs turned off, and reports ours / best peer per seed. The trace
workload replays fixed arrival times, so its seeds differ only in the policies' own random
tie-breaks.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.des import SimConfig
from bench.policies import params_with, policy_factories
from bench.run import run_parallel, simulate
from bench.workloads import DEFAULT_TRACE, Workload, standard_workloads

# The addon's policy with one knob changed: what each part of the policy is worth.
OURS_VARIANTS: dict[str, tuple[tuple[str, float], ...]] = {
    "ours, no hot-prefix spreading": (("hot_half_life", 0),),
    "ours, no congestion weight": (("congestion_tokens", 0),),
    "ours, copies credited in full": (("hot_copy_credit", 1),),
    "ours, no spill floor": (("spill_floor_tokens", 0),),
}

_WORKLOADS: dict[tuple[int, str], Workload] = {}
_CFG = SimConfig()

Key = tuple[int, str, int, str]  # seed, workload, load level index, policy row name


def _run(key: Key) -> tuple[Key, float]:
    seed, wname, level, pname = key
    return key, simulate(_WORKLOADS[(seed, wname)], level, pname, _CFG, seed).ttft_p95


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("docs"),
                    help="directory for routing-seeds.md")
    ap.add_argument("--vary", action="append", default=[], metavar="KNOB=VALUE",
                    help="one more row: ours with this PolicyParams knob changed (repeatable)")
    args = ap.parse_args(argv)
    variants_spec = dict(OURS_VARIANTS)
    for item in args.vary:
        knobs: list[tuple[str, float]] = []
        for part in item.split("+"):
            knob, _, value = part.partition("=")
            try:
                knobs.append((knob, float(value)))
            except ValueError:
                ap.error(f"--vary {item}: expected KNOB=NUMBER[+KNOB=NUMBER...]")
        if params_with(**dict(knobs)) is None:
            ap.error(f"--vary {item}: PolicyParams has no knob among {[k for k, _ in knobs]}")
        variants_spec["ours, " + ", ".join(f"{k} {v:g}" for k, v in knobs)] = tuple(knobs)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for seed in seeds:
        for w in standard_workloads(_CFG, seed, 1.0, DEFAULT_TRACE):
            _WORKLOADS[(seed, w.name)] = w
    names = list(_WORKLOADS)
    # Round robin at every level first: it decides which levels the conditions cover.
    rr = run_parallel(_run, [(s, w, lv, "round-robin") for s, w in names
                   for lv in range(len(_WORKLOADS[(s, w)].load_factors))], args.jobs)
    cells: list[tuple[int, str, int]] = []
    for s, wname in names:
        w = _WORKLOADS[(s, wname)]
        sat = report.saturation(w, {(wname, lv, "round-robin"): {"ttft_p95": v}
                                    for (s2, w2, lv, _), v in rr.items()
                                    if (s2, w2) == (s, wname)})
        top = sat.at if sat.at is not None else len(w.load_factors) - 1
        cells += [(s, wname, lv) for lv in range(top + 1)]
    peers = [p for p in policy_factories() if not report.is_ours(p) and p != "oracle"]
    variants = {label: "ours[" + "+".join(f"{k}={v:g}" for k, v in knobs) + "]"
                for label, knobs in variants_spec.items()}
    rows = ["ours", *variants.values()]
    keys = [(s, w, lv, p) for s, w, lv in cells for p in peers + rows
            if p != "round-robin"]
    p95 = {**rr, **run_parallel(_run, keys, args.jobs)}
    wall = time.perf_counter() - t0

    command = "python -m bench.seeds" + (" " + shlex.join(argv) if argv else "")
    out: list[str] = [
        "# Routing benchmark: the win conditions over several seeds", "",
        f"Command: `{command}`. Same simulation as `routing-benchmark.md` (seed 0 there); "
        "here the workloads, arrivals and policies' random choices are drawn for each seed. "
        "Each cell: ours' TTFT p95 / the best non-oracle peer's at that seed; `!` = the win "
        "condition of `routing-benchmark.md` does not hold there (for no-reuse also against "
        "least-loaded, for hot-prefix against round robin). The trace replays fixed arrival "
        "times, so its seeds differ only in the policies' random tie-breaks.", "",
        "Rows: `ours` is the addon's defaults; "
        + "; ".join(f"`{label}` sets " + ", ".join(f"`{k}: {v:g}`" for k, v in knobs)
                    for label, knobs in variants_spec.items())
        + ".", "",
    ]
    held: dict[str, list[bool]] = {r: [] for r in rows}
    # Load levels are multiples of each seed's own capacity: a row is a level index.
    by_level: dict[tuple[str, int], dict[int, dict[str, str]]] = {}
    for s, wname, lv in cells:

        def get(p: str, s: int = s, wname: str = wname, lv: int = lv) -> float:
            return p95[(s, wname, lv, p)]

        best = min(get(p) for p in peers)
        for r in rows:
            ok, _ = report.win_holds(wname, get(r), best, get)
            held[r].append(ok)
            by_level.setdefault((wname, lv), {}).setdefault(s, {})[r] = (
                f"{get(r) / best:.3f}{'' if ok else ' !'}")
    header = ["ours", *variants]
    out.append("| workload | QPS (seed 0) | " + " | ".join(
        f"{h} (seeds {', '.join(map(str, seeds))})" for h in header) + " |")
    out.append("|---|---|" + "---|" * len(header))
    order = [w for s, w in names if s == seeds[0]]
    for (wname, lv), per_seed in sorted(by_level.items(),
                                        key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        q0 = _WORKLOADS[(seeds[0], wname)].qps_levels(_CFG)[lv]
        cols = [" / ".join(per_seed.get(s, {}).get(r, "-") for s in seeds) for r in rows]
        out.append(f"| {wname} | {q0:g} | " + " | ".join(cols) + " |")
    out.append("")
    out.append("Cells where the win condition holds, over all seeds:")
    out.append("")
    for label, r in zip(header, rows, strict=True):
        out.append(f"- {label}: {sum(held[r])} of {len(held[r])}")
    out += ["", f"{len(p95)} simulations; wall time {wall:.1f} s on {args.jobs} process(es) "
            "(the only number here that depends on the machine).", ""]
    report.publish(out, args.out, "routing-seeds.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
