"""Markdown, JSON and plots of a benchmark run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addon.policy import PolicyParams
from bench.des import SimConfig
from bench.workloads import Workload

Results = Mapping[tuple[str, int, str], Mapping[str, Any]]

# Round robin is saturated at a load level when its TTFT p95 exceeds both this multiple of its
# p95 at the lightest level and that p95 + SAT_ABS_S (the absolute floor keeps a p95 that
# moves from 20 to 70 ms from counting as a blow-up).
SAT_FACTOR = 4.0
SAT_ABS_S = 0.5
# Ours "loses" to a policy at a load level when that policy's p95 is below LOSS_RATIO x ours
# and at least LOSS_ABS_S lower.
LOSS_RATIO = 0.8
LOSS_ABS_S = 0.02
# The issue's win conditions: ours' p95 within WIN_SLACK of the best non-oracle policy at every
# load level up to saturation; on no-reuse within NO_REUSE_SLACK of least-loaded.
WIN_SLACK = 0.02
NO_REUSE_SLACK = 0.03

POLICY_NOTES = {
    "ours": "the addon: its `addon.router.Router` (prefix index + `addon.policy.choose`) "
            "with `PolicyParams()` defaults, fed the controller lookup and the hooks' events; "
            "clients stream, so the first SSE body byte tells it the prefill is over",
    "ours[no-stream]": "the addon with clients that do not stream: between routing and the "
                       "end of a response it learns only what the engines' metrics say",
    "ours[half-stream]": "the addon with every other client streaming",
    "ours[kv-events]": "the addon with `cache_view: kv_events`: each engine's own prefix "
                       "cache as its KV events tell it (block by block, no controller lag) "
                       "instead of the controller lookup",
    "ours[no-stream,no-metrics]": "the addon with clients that do not stream and engine "
                                  "metrics off (`engine_metrics_interval: 0s`): it learns "
                                  "nothing until a response ends",
    "ours[request-load]": "the addon before the prefix index: controller matches only, load "
                          "= 256 tokens x in-flight requests",
    "ours[longest-match]": "the addon with `PolicyParams(kind=\"longest_match\")`: most "
                           "matched tokens whatever the load, ties to the least loaded",
    "ours[controller-down]": "the addon with the controller down for the whole run "
                             "(lookups refused: the breaker opens, the proxy's own view of "
                             "in-flight and recently finished prompts routes)",
    "random": "uniform random",
    "round-robin": "round robin",
    "least-loaded": "fewest in-flight requests (proxy's count)",
    "session": "consistent hash of the session/user id",
    "ps-kvaware": "vLLM production-stack kvaware: first holder if matched >= prompt - 2000, "
                  "else session hash / lowest QPS",
    "ps-prefixaware": "production-stack prefixaware: 128-token chunk trie, random among the "
                      "longest matches, never evicts",
    "sglang-0.3/64/1.5": "SGLang cache_aware (cache 0.3, balance abs 64, rel 1.5), "
                         "approximate tree from its own routing",
    "sglang-0.5/32/1.1": "SGLang cache_aware (0.5, 32, 1.1)",
    "llm-d": "llm-d scorers: 3 x prefix (precise) + 2 x (1 - KV usage) + 2 x queue",
    "dynamo": "Dynamo KV router: prefill blocks after overlap + active decode blocks, lowest",
    "seed": "the seed as designed: only exact repeats go to the holder, else round robin",
    "oracle": "knows every cache and queue exactly, picks the smallest estimated TTFT "
              "(greedy reference, not a bound)",
}


def publish(lines: Sequence[str], out_dir: Path, name: str) -> None:
    """Print a markdown report and write it to `out_dir/name` (the scripts' last step)."""
    text = "\n".join(lines)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(text)
    print(f"wrote {out_dir / name}", file=sys.stderr)


def is_ours(name: str) -> bool:
    return name.startswith("ours")


def peers_of(policies: Sequence[str]) -> list[str]:
    return [p for p in policies if not is_ours(p) and p != "oracle"]


@dataclass(frozen=True)
class Saturation:
    below: int | None  # highest level round robin still sustains
    at: int | None  # first level where round robin's p95 blows up


def win_holds(
    workload: str, ours: float, best_peer: float, p95: Callable[[str], float]
) -> tuple[bool, str]:
    """The issue's win condition at one load level, and the workload's extra comparison."""
    ok = ours <= best_peer * (1 + WIN_SLACK)
    if workload == "no-reuse":
        r = ours / p95("least-loaded")
        return ok and r <= 1 + NO_REUSE_SLACK, f"vs least-loaded {r:.3f}"
    if workload == "hot-prefix":
        r = ours / p95("round-robin")
        return ok and r <= 1.0, f"vs round robin {r:.3f}"
    return ok, ""


def saturation(w: Workload, results: Results) -> Saturation:
    rr = [results[(w.name, i, "round-robin")]["ttft_p95"] for i in range(len(w.load_factors))]
    base = rr[0]
    for i in range(1, len(rr)):
        if rr[i] > max(SAT_FACTOR * base, base + SAT_ABS_S):
            return Saturation(i - 1, i)
    return Saturation(len(rr) - 1, None)


@dataclass
class Doc:
    markdown: str
    json_text: str


def _s(x: float) -> str:
    """Seconds: ms precision below 10 s."""
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _cell(m: Mapping[str, Any]) -> str:
    return f"{_s(m['ttft_p95'])} s ({_pct(m['hit_ratio'])})"


def _best(names: Sequence[str], get: Any) -> tuple[str, Mapping[str, Any]]:
    best = min(names, key=lambda p: (get(p)["ttft_p95"], -get(p)["hit_ratio"]))
    return best, get(best)


def build(
    workloads: Sequence[Workload],
    cfg: SimConfig,
    policies: Sequence[str],
    results: Results,
    meta: Mapping[str, Any],
) -> Doc:
    peers = peers_of(policies)
    # The addon as seen by clients that do not stream: shown next to ours when measured.
    has_cand = "ours[no-stream]" in policies
    lines: list[str] = []
    add = lines.append
    cost = meta["cost_model"]
    add("# Routing benchmark: the addon's policy against the field's")
    add("")
    add(f"Command: `{meta['command']}` (seed {meta['seed']}). "
        "Virtual-time discrete-event simulation: the numbers are the same on every run and "
        "machine for a seed; only the wall time at the end varies. Produced by "
        "`bench/run.py`; machine-readable: `routing-benchmark.json`.")
    add("")
    add("## Setup")
    add("")
    add(f"- Cluster: {cfg.n_engines} engines, each a `sim.engine_model.EngineModel` with "
        f"{cfg.capacity_tokens:,} tokens of prefix cache in {cfg.block_size}-token blocks "
        "(LRU), and its `CostModel`: prefill "
        f"{cost['step_overhead_s'] * 1e3:.2f} ms + {cost['prefill_per_token_s'] * 1e6:.0f} us "
        f"per uncached token, decode {cost['decode_step_s'] * 1e3:.0f} ms per output token "
        f"(+{cost['decode_per_extra_seq_s'] * 1e3:g} ms per extra running request), at most "
        f"{cost['max_batch']} requests running per engine (the rest wait FIFO), "
        f"{'one prefill at a time' if cost['serial_prefill'] else 'parallel prefills'}. "
        "TTFT = queueing + prefill of the uncached tokens; the prompt (not the answer: "
        "LMCache's default) enters the cache.")
    add("- Controller: per engine, the 256-token chunk hashes its worker reported "
        "(admitted/evicted, at the end of each prefill); lookup returns every holder with its "
        "matched prefix (a multiple of 256, up to its first missing chunk). Prompts under "
        "256 tokens are not looked up (as in the addon). Extra cases for ours: controller "
        f"down for the whole run, and reports visible only {meta['staleness_s']:g} s late.")
    add("- Load levels: multiples of the cluster's capacity with nothing cached; round robin "
        f"is *saturated* at a level when its TTFT p95 exceeds {SAT_FACTOR:g}x its p95 at the "
        f"lightest level and that + {SAT_ABS_S:g} s. Throughput = requests (or output tokens) "
        "/ (last finish - first arrival): finite runs, so past saturation it is the capacity "
        "reached, and at light load it reads a little below the offered rate.")
    add("- Hit ratio = prompt tokens the engine found cached / prompt tokens. "
        "Busiest = share of requests on the busiest engine.")
    add("")
    add("Limits of the model (read the numbers with them):")
    add("")
    add("- One seed per cell (`--seed` changes it). Between seeds 0 and 1 a cell's p95 moved "
        "by 10% (median) and 27% (75th percentile), more past saturation: trust a gap of "
        "~1.5x, or a pattern that holds across load levels and workloads, not a single "
        "cell. `python -m bench.seeds` re-judges the win conditions on seeds 0-2 "
        "(`routing-seeds.md`), on which the defaults were chosen, and `--seeds 3,4,5` on "
        "held-out ones (`held-out/routing-seeds.md`). Past saturation TTFT keeps growing "
        "with the length of the run, so compare policies at the same level rather than "
        "absolute values.")
    add("- The engine model decodes at a flat step time (batch size does not slow it), "
        "charges nothing for attention over a cached context, and has one GPU tier: a miss "
        "is a full recompute (no LMCache CPU/disk offload to fall back on), which is the "
        "setting where routing matters most.")
    add("- Chat users wait for their previous answer: at the highest chat loads part of the "
        "offered rate is never issued (a closed loop), so look at req/s there.")
    add(f"- Engine metrics (vLLM's waiting and running requests, KV usage) are read every "
        f"{cfg.scrape_interval_s:g} s by the policies that read them (llm-d and ours alike); "
        "`waiting` counts the requests whose prefill has not started, as vLLM's does.")
    add("- Peers get some inputs for free: Dynamo and llm-d use the controller view as their "
        "KV index, Dynamo's router sees every engine's first token (whatever the client "
        "does), production-stack kvaware sees chat prompts it would skip in reality. "
        "`python -m bench.pooled` adds clients that do not stream and traffic that bypasses "
        "the router, over pooled seeds (`routing-pooled.md`).")
    add("")
    add("Policies:")
    add("")
    for p in policies:
        note = POLICY_NOTES.get(p)
        if note is None and p.startswith("ours[stale"):
            note = (f"the addon with controller reports visible {meta['staleness_s']:g} s "
                    "late")
        add(f"- `{p}`: {note or ''}")
    add("")

    # --- headline --------------------------------------------------------------------------
    sats = {w.name: saturation(w, results) for w in workloads}
    headline: list[dict[str, Any]] = []
    add("## Headline")
    add("")
    add("TTFT p95 (hit ratio) at the highest load round robin sustains and at its saturation "
        "point. Best peer = lowest p95 among all non-ours policies except the oracle.")
    add("")
    cols = ["workload", "load", "QPS", "ours"] + (["ours[no-stream]"] if has_cand else []) + [
        "round-robin", "least-loaded", "best peer", "oracle"]
    add("| " + " | ".join(cols) + " |")
    add("|" + "---|" * len(cols))
    for w in workloads:
        levels = w.qps_levels(cfg)
        sat = sats[w.name]
        for label, lv in (("highest sustained", sat.below), ("saturation", sat.at)):
            if lv is None:
                continue

            def get(p: str, lv: int = lv, w: Workload = w) -> Mapping[str, Any]:
                return results[(w.name, lv, p)]

            bp, bm = _best(peers, get)
            row = [w.name, label, f"{levels[lv]:g}", f"**{_cell(get('ours'))}**"]
            if has_cand:
                row.append(_cell(get("ours[no-stream]")))
            row += [_cell(get("round-robin")), _cell(get("least-loaded")),
                    f"{bp}: {_cell(bm)}", _cell(get("oracle"))]
            add("| " + " | ".join(row) + " |")
            headline.append({
                "workload": w.name, "load": label, "qps": levels[lv],
                "ours": dict(get("ours")), "round_robin": dict(get("round-robin")),
                "least_loaded": dict(get("least-loaded")), "best_peer": bp,
                "best_peer_metrics": dict(bm), "oracle": dict(get("oracle")),
                **({"ours_no_stream": dict(get("ours[no-stream]"))} if has_cand else {}),
            })
        if sat.at is None:
            add(f"| {w.name} | (round robin never saturated up to {levels[-1]:g} QPS) "
                + "| " * (len(cols) - 2) + "|")
    add("")

    # --- losses ----------------------------------------------------------------------------
    losses: list[dict[str, Any]] = []
    add("## Where the addon's policy loses")
    add("")
    add(f"Every load level where a peer's TTFT p95 is under {LOSS_RATIO:g}x ours (and "
        f"{LOSS_ABS_S * 1000:.0f}+ ms lower). `!` marks round robin / least-loaded / random, "
        "i.e. cache-unaware routing beating ours.")
    add("")
    any_loss = False
    for w in workloads:
        levels = w.qps_levels(cfg)
        for lv, q in enumerate(levels):
            ours = results[(w.name, lv, "ours")]
            beat = []
            for p in peers:
                m = results[(w.name, lv, p)]
                if (m["ttft_p95"] < LOSS_RATIO * ours["ttft_p95"]
                        and ours["ttft_p95"] - m["ttft_p95"] >= LOSS_ABS_S):
                    beat.append((m["ttft_p95"], p, m))
            if not beat:
                continue
            any_loss = True
            beat.sort()
            naive = {"round-robin", "least-loaded", "random"}
            parts = ", ".join(
                f"{'!' if p in naive else ''}{p} {_cell(m)}" for _, p, m in beat)
            add(f"- **{w.name} @ {q:g} QPS**: ours {_cell(ours)}, p50 {_s(ours['ttft_p50'])} s,"
                f" busiest {_pct(ours['busiest_share'])}; better: {parts}")
            losses.append({
                "workload": w.name, "qps": q, "ours": dict(ours),
                "better": [{"policy": p, **dict(m)} for _, p, m in beat],
            })
    if not any_loss:
        add("- nowhere")
    add("")

    # --- win conditions ------------------------------------------------------------------
    add("## Win conditions")
    add("")
    add(f"Every load level up to round robin's saturation point: ours' TTFT p95 against the "
        f"best non-oracle policy (peers; win = best or within {WIN_SLACK:.0%}), the oracle, "
        f"and on no-reuse least-loaded (within {NO_REUSE_SLACK:.0%}), on hot-prefix round "
        "robin (not worse).")
    add("")
    add("| workload | QPS | ours | best peer | ours / best | ours / oracle | extra | holds |")
    add("|---|---|---|---|---|---|---|---|")
    wins: list[dict[str, Any]] = []
    for w in workloads:
        levels = w.qps_levels(cfg)
        sat = sats[w.name]
        top = sat.at if sat.at is not None else len(levels) - 1
        for lv in range(top + 1):

            def get3(p: str, lv: int = lv, w: Workload = w) -> Mapping[str, Any]:
                return results[(w.name, lv, p)]

            ours = get3("ours")["ttft_p95"]
            bp, bm = _best(peers, get3)
            ratio = ours / bm["ttft_p95"]
            ok, extra = win_holds(w.name, ours, bm["ttft_p95"],
                                  lambda p, g=get3: g(p)["ttft_p95"])
            orc = ours / get3("oracle")["ttft_p95"]
            add(f"| {w.name} | {levels[lv]:g} | {_s(ours)} s | {bp}: {_s(bm['ttft_p95'])} s | "
                f"{ratio:.3f} | {orc:.3f} | {extra} | {'yes' if ok else '**no**'} |")
            wins.append({"workload": w.name, "qps": levels[lv], "ours_p95": ours,
                         "best_peer": bp, "best_peer_p95": bm["ttft_p95"],
                         "ratio": ratio, "oracle_ratio": orc, "holds": ok})
    add("")

    # --- sweeps --------------------------------------------------------------------------
    sweep_names: Mapping[str, Sequence[str]] = meta.get("sweep_names", {})
    for knob, names in sweep_names.items():
        rows = [(w, lv) for w in workloads for lv in range(len(w.qps_levels(cfg)))
                if names and all((w.name, lv, n) in results for n in names)]
        if not rows:
            continue
        values = meta["sweeps"][knob]
        default = getattr(PolicyParams(), knob, None)
        down = names[0].startswith("ours[down,")
        add(f"## Sweep: `{knob}`" + (" (controller down)" if down else ""))
        add("")
        add(f"The addon's defaults with `PolicyParams.{knob}` changed"
            + (", and the controller down for the whole run" if down else "")
            + f"; TTFT p95 (hit ratio). Default: {default:g}.")
        add("")
        add("| workload | QPS | " + " | ".join(
            f"{'**' if v == default else ''}{v:g}{'**' if v == default else ''}"
            for v in values) + " |")
        add("|---|---|" + "---|" * len(values))
        for w, lv in rows:
            q = w.qps_levels(cfg)[lv]
            cells = [_cell(results[(w.name, lv, n)]) for n in names]
            add(f"| {w.name} | {q:g} | " + " | ".join(cells) + " |")
        add("")

    # --- per workload ----------------------------------------------------------------------
    add("## Results per workload")
    for w in workloads:
        levels = w.qps_levels(cfg)
        sat = sats[w.name]
        add("")
        add(f"### {w.title} (`{w.name}`)")
        add("")
        add(w.description)
        share = w.working_set_tokens / (cfg.n_engines * cfg.capacity_tokens)
        if w.working_set_tokens:
            add(f"Working set {w.working_set_tokens:,} tokens = {_pct(share)} of the "
                "cluster's cache.")
        cap = w.cold_capacity(cfg)
        marks = ", ".join(
            f"{q:g}" + (" (saturated)" if sat.at is not None and i >= sat.at else "")
            for i, q in enumerate(levels))
        add(f"Capacity with nothing cached: {cap:.1f} req/s. Load levels (QPS): {marks}.")
        add("")
        add(f"![TTFT p95 vs QPS, {w.name}](bench-{w.name}.png)")
        for lv, q in enumerate(levels):
            add("")
            tag = " — round robin saturated" if sat.at is not None and lv >= sat.at else ""
            add(f"#### {w.name} @ {q:g} QPS{tag}")
            add("")
            add("| policy | hit | TTFT p50 (s) | p95 (s) | p99 (s) | req/s | out tok/s | "
                "busiest |")
            add("|---|---|---|---|---|---|---|---|")
            best_p95 = min(results[(w.name, lv, p)]["ttft_p95"] for p in policies)
            for p in policies:
                m = results[(w.name, lv, p)]
                name = f"**{p}**" if p == "ours" else p
                p95 = _s(m["ttft_p95"])
                if m["ttft_p95"] == best_p95:
                    p95 = f"**{p95}**"
                add(f"| {name} | {_pct(m['hit_ratio'])} | {_s(m['ttft_p50'])} | {p95} | "
                    f"{_s(m['ttft_p99'])} | {m['throughput_rps']:.1f} | "
                    f"{m['output_tok_s']:.0f} | {_pct(m['busiest_share'])} |")
    add("")
    add("## Run")
    add("")
    add(f"{meta['runs']} simulations on {meta['jobs']} worker process(es) "
        f"({meta['cpus']} CPUs); building the workloads took {meta['build_s']:.1f} s.")
    add("")
    add(f"**Wall time: {meta['wall_s']:.1f} s.**")
    add("")

    data = {
        "meta": dict(meta),
        "saturation_rule": {"factor": SAT_FACTOR, "abs_s": SAT_ABS_S},
        "headline": headline,
        "losses": losses,
        "win_conditions": wins,
        "workloads": {
            w.name: {
                "title": w.title,
                "description": w.description,
                "params": w.params,
                "working_set_tokens": w.working_set_tokens,
                "cold_capacity_rps": w.cold_capacity(cfg),
                "qps_levels": w.qps_levels(cfg),
                "saturation": {"sustained_level": sats[w.name].below,
                               "saturated_level": sats[w.name].at},
                "results": [
                    {
                        "qps": q,
                        "policies": {
                            p: dict(results[(w.name, lv, p)])
                            for (wn, lvl, p) in results
                            if wn == w.name and lvl == lv
                        },
                    }
                    for lv, q in enumerate(w.qps_levels(cfg))
                ],
            }
            for w in workloads
        },
    }
    return Doc("\n".join(lines), json.dumps(data, indent=1, sort_keys=True) + "\n")


def plots(
    workloads: Sequence[Workload],
    cfg: SimConfig,
    policies: Sequence[str],
    results: Results,
    out: Path,
) -> list[Path]:
    """One PNG per workload: TTFT p95 against QPS, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    written = []
    for w in workloads:
        levels = w.qps_levels(cfg)
        fig, ax = plt.subplots(figsize=(11, 5.5), dpi=100)
        sat = saturation(w, results)
        if sat.at is not None:
            ax.axvline(levels[sat.at], color="tab:blue", alpha=0.25, linewidth=6,
                       label="round robin saturated")
        for k, p in enumerate(policies):
            ys = [results[(w.name, lv, p)]["ttft_p95"] for lv in range(len(levels))]
            # tab10 colours, then the same colours dash-dotted: 20 tellable-apart lines.
            style: dict[str, Any] = {"color": cmap(k % 10), "linewidth": 1.2, "marker": ".",
                                     "linestyle": "-" if k < 10 else "-."}
            if p == "ours":
                style.update(color="black", linewidth=2.8, marker="o")
            elif p == "ours[no-stream]":
                style.update(color="tab:red", linewidth=2.2, linestyle="--", marker="o")
            elif p == "oracle":
                style.update(color="grey", linestyle=":", linewidth=2)
            elif p == "round-robin":
                style.update(color="tab:blue", linewidth=2)
            ax.plot(levels, ys, label=p, **style)
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("TTFT p95 (s, log)")
        ax.set_title(f"{w.title}: TTFT p95 vs load ({cfg.n_engines} engines)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / f"bench-{w.name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
