"""``python -m bench.replica_throughput``: requests/s through one proxy replica vs two, and
what sharing the routing state through Redis costs, measured on real processes.

Three configurations, each real `mitmdump` processes running the addon (routing on, a copy of
addon/ taken at the start) in front of bench/proxy.py's stand-ins (one upstream process
serving two endpoints, the fast LMCache controller), warm 1k-token prompts:

- `one`: one replica (`state.backend: memory`), all the clients on it;
- `two-memory`: two replicas, each with its own state, half the clients on each;
- `two-redis`: two replicas sharing their state through one real redis-server (pub/sub into
  a local mirror: addon/redis_link.py), half the clients on each.

The load generator is bench/proxy.py's closed-loop keep-alive client, in this process. Rounds
are interleaved (every configuration once per round, the order rotated), every ratio is taken
between configurations measured in the same round, then the median over rounds is kept: the
machine is shared, so only same-round comparisons are fair. The two-redis replicas are started
afresh every round and stopped (SIGTERM) at its end; the line the addon logs when it stops
gives that round's staleness of the link under load (queueing an event on the event loop ->
Redis -> read back on the loop, from each replica's own echo: the path a peer's copy takes).
Last, the Redis round trip itself is measured in this process against the same redis-server:
a synchronous redis-py client, a redis.asyncio client inside an event loop (what a design
that read Redis on the request path would pay per request), and the addon's own link code
(addon/redis_link.py: pipelined PUBLISH, pushed messages read and decoded) against
redis.asyncio doing the same on an event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import msgpack
import psutil

from addon import redis_link
from bench.proxy import (
    ENDPOINT_IDS,
    HOST,
    STANDIN_MARGIN,
    Prompts,
    _client,
    _git,
    _machine,
    _pct,
    _proxy_command,
    _Run,
    _standin,
    _start_proxy,
    _Stats,
    _stop,
    _wait_listening,
    classify,
    snapshot_addon,
)
from sim.redis_server import redis_server

REPORT = "replica-throughput.md"
SIZE = 1024  # prompt tokens (warm: bench.proxy's N_WARM fixed prompts in turn)
PATH = "/v1/completions"
CONFIGS: dict[str, tuple[str, int]] = {  # name -> (state backend, replicas)
    "one": ("memory", 1),
    "two-memory": ("memory", 2),
    "two-redis": ("redis", 2),
}
PROBES = ("upstream completions", "controller /lookup")
CHANNEL = "kvcache-bench"
# The line the addon logs when it stops with `state.backend: redis` (addon/kvcache.py _stop).
EXIT_LINE = re.compile(
    r"shared state: (?P<batches>\d+) batches published, (?P<events>\d+) events received "
    r"from (?P<peers>\d+) peers, staleness (?P<staleness>\{[^}]*\}), (?P<disconnects>\d+) "
    r"disconnects, (?P<dropped>\d+) events dropped")
LINK_TROUBLE = ("shared state: Redis at", "Traceback")


# --- one measured window ---------------------------------------------------------------------

@dataclass
class Cell:
    n: int
    rps: float
    per_replica_rps: list[float]
    p50: float  # ms, requests started and finished in the window
    p99: float
    errors: int
    proxy_cpu_ms: float | None  # the replicas' CPU (all threads) per request
    proxy_loop_cpu_ms: float | None  # of which their main threads' (the event loop's)
    proxy_ctx_switches: float | None  # the replicas' context switches per request
    redis_cpu_ms: float  # redis-server's CPU per request
    standin_cpu_ms: float  # upstream + controller
    gen_cpu_ms: float  # this process
    others: float  # share of the machine's CPU used by processes outside the benchmark
    lookups_per_req: float  # controller /lookup calls per request
    answered: float  # share routed with a controller answer (bench.proxy.classify)
    labels: dict[str, int]


@dataclass
class Procs:
    upstream: psutil.Process
    controller: psutil.Process
    redis: psutil.Process
    stats: dict[str, _Stats] = field(default_factory=dict)

    def snapshot(self, replicas: Sequence[psutil.Process]) -> dict:
        def cpu(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        out = {"t": time.perf_counter(), "busy": busy, "gen": time.process_time(),
               "proxy": sum(cpu(p) for p in replicas), "redis": cpu(self.redis),
               "standins": cpu(self.upstream) + cpu(self.controller), "loop": 0.0,
               "ctx": 0}
        for p in replicas:
            main = next((t for t in p.threads() if t.id == p.pid), None)
            out["loop"] += main.user_time + main.system_time if main is not None else 0.0
            c = p.num_ctx_switches()
            out["ctx"] += c.voluntary + c.involuntary
        out["ours"] = out["gen"] + out["proxy"] + out["redis"] + out["standins"]
        return out


async def _window(procs: Procs, ports: Sequence[int], path: str, prompts: Prompts,
                  clients: int, warmup: float, seconds: float,
                  replicas: Sequence[psutil.Process]) -> Cell:
    """`clients` closed-loop clients spread over `ports` (client i on port i mod len)."""
    runs = [_Run() for _ in ports]
    tasks = [asyncio.create_task(_client(ports[i % len(ports)], path, prompts,
                                         runs[i % len(ports)])) for i in range(clients)]
    await asyncio.sleep(warmup)
    c0 = await procs.stats["controller"].get()
    s0 = procs.snapshot(replicas)
    w0 = time.perf_counter()
    await asyncio.sleep(seconds)
    w1 = time.perf_counter()
    s1 = procs.snapshot(replicas)
    c1 = await procs.stats["controller"].get()
    for run in runs:
        run.stop = True
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    per_port, lat, errors = [], [], 0
    labels: Counter[str] = Counter()
    answered = 0
    for run in runs:
        window = [d for d in run.done if w0 <= d[1] <= w1]
        ok = [d for d in window if d[2] < 400]
        errors += run.errors + len(window) - len(ok)
        per_port.append(len(ok))
        lat += [(d[1] - d[0]) * 1000 for d in ok if d[0] >= w0]
        for d in ok:
            if d[3] is not None:
                yes, label = classify(d[3])
                answered += yes
                labels[label] += 1
    lat.sort()
    n_ok = sum(per_port)
    n = max(n_ok, 1)
    dt = w1 - w0
    lookups = (c1["requests"].get("/lookup", 0) - c0["requests"].get("/lookup", 0))
    return Cell(
        n=n_ok, rps=n_ok / dt, per_replica_rps=[k / dt for k in per_port],
        p50=_pct(lat, 0.5), p99=_pct(lat, 0.99), errors=errors,
        proxy_cpu_ms=(s1["proxy"] - s0["proxy"]) * 1000 / n if replicas else None,
        proxy_loop_cpu_ms=(s1["loop"] - s0["loop"]) * 1000 / n if replicas else None,
        proxy_ctx_switches=(s1["ctx"] - s0["ctx"]) / n if replicas else None,
        redis_cpu_ms=(s1["redis"] - s0["redis"]) * 1000 / n,
        standin_cpu_ms=(s1["standins"] - s0["standins"]) * 1000 / n,
        gen_cpu_ms=(s1["gen"] - s0["gen"]) * 1000 / n,
        others=max(0.0, (s1["busy"] - s0["busy"]) - (s1["ours"] - s0["ours"]))
        / ((s1["t"] - s0["t"]) * (os.cpu_count() or 1)),
        lookups_per_req=lookups / n, answered=answered / n, labels=dict(labels),
    )


# --- the replicas ----------------------------------------------------------------------------

@dataclass
class Replica:
    name: str
    proc: object  # subprocess.Popen
    ps: psutil.Process
    port: int
    log: Path


class Cluster:
    """The mitmdumps: `one` and the two-memory pair live for the whole run; the two-redis pair
    is started for every round (`start_redis_pair`) and stopped at its end."""

    def __init__(self, stack: ExitStack, tmp: Path, script: Path, engines: dict[str, str],
                 controller: str, redis_url: str) -> None:
        self.stack, self.tmp, self.script = stack, tmp, script
        self.engines, self.controller, self.redis_url = engines, controller, redis_url
        self.replicas: dict[str, list[Replica]] = {}

    def _state(self, backend: str, name: str) -> dict:
        if backend == "memory":
            return {"backend": "memory"}
        return {"backend": "redis", "url": self.redis_url, "channel": CHANNEL,
                "replica_id": name}

    def _start(self, names: Sequence[str], backend: str) -> list[Replica]:
        procs = []
        for name in names:
            cmd = _proxy_command(name, self.tmp, self.engines, self.controller,
                                 {"state": self._state(backend, name)}, self.script)
            procs.append(_start_proxy(self.stack, name, cmd, self.tmp))
        out = []
        for name, proc in zip(names, procs, strict=True):
            port = _wait_listening(name, proc, self.tmp, 60)
            out.append(Replica(name, proc, psutil.Process(proc.pid), port,
                               self.tmp / f"{name}.log"))
        return out

    def start_memory(self) -> None:
        # The first one creates mitmproxy's CA in the shared confdir; the rest start together.
        self.replicas["one"] = self._start(["one"], "memory")
        self.replicas["two-memory"] = self._start(["two-memory-a", "two-memory-b"], "memory")

    def start_redis_pair(self, r: int) -> None:
        self.replicas["two-redis"] = self._start(
            [f"two-redis-a-round{r + 1}", f"two-redis-b-round{r + 1}"], "redis")

    def stop_redis_pair(self) -> list[dict]:
        """SIGTERM both together (so each still counts the other as a peer when it logs),
        then each one's exit line."""
        pair = self.replicas.pop("two-redis")
        for rep in pair:
            rep.proc.terminate()  # type: ignore[attr-defined]
        out = []
        for rep in pair:
            try:  # one SIGTERM only: a second one kills mitmdump while it shuts down
                rep.proc.wait(timeout=15)  # type: ignore[attr-defined]
            except subprocess.TimeoutExpired:
                pass
            _stop(rep.proc)  # type: ignore[arg-type]  # kills it if it did not exit
            out.append(parse_exit(rep.name, rep.log.read_text(errors="replace"),
                                  rep.proc.returncode))  # type: ignore[attr-defined]
        return out


def parse_exit(name: str, log: str, returncode: int | None = None) -> dict:
    """What one redis replica's log says about its link (None fields: the line is missing)."""
    found = list(EXIT_LINE.finditer(log))
    m = found[-1] if found else None
    out: dict = {"replica": name, "returncode": returncode, "exit_line": m is not None,
                 "trouble": [line for line in log.splitlines()
                             if any(t in line for t in LINK_TROUBLE)][:5]}
    if m is not None:
        out.update(batches=int(m["batches"]), events=int(m["events"]), peers=int(m["peers"]),
                   staleness=json.loads(m["staleness"]), disconnects=int(m["disconnects"]),
                   dropped=int(m["dropped"]))
    return out


# --- the Redis round trip, in this process -----------------------------------------------------

def _batch(seq: int) -> bytes:
    """A batch as the addon's writer publishes it: one routed request and one ended one."""
    rid = f"{seq:08x}-5f1c-4d6e-9a3b-2c7e8f0a1b2c"
    hashes = [0x1234_5678_9ABC_DEF0 + i * 7919 for i in range(SIZE // 256)]
    events = [("a", rid, "vllm-0", hashes, 0, False, f"k{seq:015x}", SIZE), ("r", rid)]
    return msgpack.packb(("two-redis-a", seq, time.time(), events), use_bin_type=True)


def _stats(lat_s: list[float], cpu_s: float, n: int, wall_s: float) -> dict:
    xs = sorted(x * 1e6 for x in lat_s)
    return {"calls": n, "p50_us": _pct(xs, 0.5), "p99_us": _pct(xs, 0.99),
            "mean_us": statistics.fmean(xs), "cpu_us_per_call": cpu_s * 1e6 / n,
            "calls_per_s": n / wall_s}


def redis_round_trip(url: str, n: int) -> dict[str, dict]:
    import redis
    import redis.asyncio as aioredis

    out: dict[str, dict] = {}
    client = redis.Redis.from_url(url)
    # Two subscribers on the channel, as with two replicas (they do not read here: Redis
    # buffers what it sends them; `n` batches stay far below its pub/sub output limit).
    subs = [redis.Redis.from_url(url).pubsub() for _ in range(2)]
    for s in subs:
        s.subscribe(CHANNEL + "-rtt")
    payloads = [_batch(i) for i in range(64)]
    out["payload_bytes"] = {"bytes": len(payloads[0])}

    def sync(label: str, call: Callable[[int], object]) -> None:
        for i in range(min(200, n)):  # warm-up: connection made, code paths hot
            call(i)
        lat = []
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            call(i)
            lat.append(time.perf_counter() - t)
        out[label] = _stats(lat, time.process_time() - c0, n, time.perf_counter() - w0)

    sync("redis-py sync PUBLISH", lambda i: client.publish(CHANNEL + "-rtt",
                                                           payloads[i % len(payloads)]))
    sync("redis-py sync PING", lambda i: client.ping())
    for s in subs:
        s.close()
    client.set("kvcache-bench:state", payloads[0])
    client.close()

    async def aio() -> None:
        r = aioredis.Redis.from_url(url)
        for _ in range(min(200, n)):
            await r.get("kvcache-bench:state")
        lat = []
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            await r.get("kvcache-bench:state")
            lat.append(time.perf_counter() - t)
        out["redis.asyncio GET"] = _stats(lat, time.process_time() - c0, n,
                                          time.perf_counter() - w0)

        # The same with 16 requests at a time (one connection each from the pool): what
        # every request of a loaded proxy would wait for.
        conc = 16
        lat = []

        async def worker(k: int) -> None:
            for _ in range(k):
                t = time.perf_counter()
                await r.get("kvcache-bench:state")
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(10) for _ in range(conc)))  # the pool's connections
        lat.clear()
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
        out[f"redis.asyncio GET, {conc} concurrent"] = _stats(
            lat, time.process_time() - c0, len(lat), time.perf_counter() - w0)

        # Publishing on the event loop: redis.asyncio awaiting each reply, against the
        # addon's link (addon/redis_link.py: RESP written by hand, the PUBLISH pipelined,
        # its reply read later by the same task).
        lat = []
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await r.publish(CHANNEL + "-rtt", payloads[i % len(payloads)])
            lat.append(time.perf_counter() - t)
        out["redis.asyncio PUBLISH"] = _stats(lat, time.process_time() - c0, n,
                                              time.perf_counter() - w0)
        u = urlsplit(url)
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        head = redis_link._command(b"PUBLISH", (CHANNEL + "-rtt").encode(), b"")[:-6]
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n):
            p = payloads[i % len(payloads)]
            writer.write(head + b"$%d\r\n" % len(p) + p + b"\r\n")
            if i % 8 == 7:
                await asyncio.sleep(0)  # a pass of the loop, as between proxied requests
        for _ in range(n):
            await redis_link._reply(reader)
        wall = time.perf_counter() - w0
        out["addon link PUBLISH (pipelined)"] = _stats(
            [wall / n] * n, time.process_time() - c0, n, wall)

        # Receiving: a batch pushed to a subscriber, read by redis.asyncio's PubSub against
        # the addon's reader.
        sub = r.pubsub()
        await sub.subscribe(CHANNEL + "-recv")
        await sub.get_message(timeout=1.0)
        sreader, swriter = await asyncio.open_connection(u.hostname, u.port)
        swriter.write(redis_link._command(b"SUBSCRIBE", (CHANNEL + "-recv").encode()))
        await redis_link._reply(sreader)
        pusher = redis.Redis.from_url(url)
        for i in range(n):
            pusher.publish(CHANNEL + "-recv", payloads[i % len(payloads)])
        pusher.close()
        c0, w0 = time.process_time(), time.perf_counter()
        got = 0
        while got < n:
            if await sub.get_message(ignore_subscribe_messages=True, timeout=1.0):
                got += 1
        wall = time.perf_counter() - w0
        out["redis.asyncio pub/sub receive"] = _stats(
            [wall / n] * n, time.process_time() - c0, n, wall)
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            msgpack.unpackb((await redis_link._reply(sreader))[2], raw=False)
        wall = time.perf_counter() - w0
        out["addon link receive (incl. msgpack decode)"] = _stats(
            [wall / n] * n, time.process_time() - c0, n, wall)
        for w in (writer, swriter):
            w.close()
        await sub.aclose()
        await r.aclose()

    asyncio.run(aio())
    return out


# --- the run ---------------------------------------------------------------------------------

async def _rounds(procs: Procs, cluster: Cluster, up_ports: list[int], ctl_port: int,
                  rounds: int, seconds: float, warmup: float, clients: int,
                  log: Callable[[str], None]) -> dict:
    procs.stats = {"controller": _Stats(ctl_port)}
    cells: list[str] = [*CONFIGS, *PROBES]
    results: dict[str, list[Cell]] = {c: [] for c in cells}
    exits: list[list[dict]] = []
    try:
        for r in range(rounds):
            cluster.start_redis_pair(r)
            order = cells[r % len(cells):] + cells[:r % len(cells)]
            for name in order:
                if name == "upstream completions":
                    cell = await _window(procs, up_ports, PATH, Prompts(SIZE, True, "warm"),
                                         clients, warmup, seconds, [])
                elif name == "controller /lookup":
                    cell = await _window(procs, [ctl_port], "/lookup",
                                         Prompts(SIZE, True, f"lookup-{r}", "lookup"),
                                         clients, warmup, seconds, [])
                else:
                    reps = cluster.replicas[name]
                    cell = await _window(procs, [x.port for x in reps], PATH,
                                         Prompts(SIZE, True, "warm"), clients, warmup,
                                         seconds, [x.ps for x in reps])
                    for x in reps:
                        if x.ps.status() == psutil.STATUS_ZOMBIE:
                            raise RuntimeError(f"mitmdump {x.name} died")
                results[name].append(cell)
                log(f"round {r + 1}/{rounds} {name}: {cell.rps:,.0f} req/s, p50 "
                    f"{cell.p50:.2f} ms, errors {cell.errors}")
            ex = cluster.stop_redis_pair()
            exits.append(ex)
            for e in ex:
                log(f"round {r + 1}/{rounds} {e['replica']} exit: "
                    + (f"{e['events']} events from {e['peers']} peers, staleness "
                       f"{e['staleness']}" if e["exit_line"] else "NO exit line"))
    finally:
        for st in procs.stats.values():
            st.close()
    return {"cells": results, "exits": exits}


def summarize(cells: dict[str, list[Cell]], exits: list[list[dict]]) -> dict:
    one = cells["one"]
    out: dict = {"configs": {}, "probes": {}}
    for name, (backend, n) in CONFIGS.items():
        xs = cells[name]
        ratios = [a.rps / b.rps for a, b in zip(xs, one, strict=True)]
        labels: Counter[str] = Counter()
        for c in xs:
            labels.update(c.labels)
        out["configs"][name] = {
            "backend": backend, "replicas": n,
            "rps": statistics.median(c.rps for c in xs), "rps_rounds": [c.rps for c in xs],
            "ratio_vs_one": statistics.median(ratios), "ratio_rounds": ratios,
            "p50_ms": statistics.median(c.p50 for c in xs),
            "p99_ms": statistics.median(c.p99 for c in xs),
            "proxy_cpu_ms": statistics.median(c.proxy_cpu_ms or 0.0 for c in xs),
            "proxy_loop_cpu_ms": statistics.median(c.proxy_loop_cpu_ms or 0.0 for c in xs),
            "proxy_ctx_switches": statistics.median(c.proxy_ctx_switches or 0.0 for c in xs),
            "redis_cpu_ms": statistics.median(c.redis_cpu_ms for c in xs),
            "standin_cpu_ms": statistics.median(c.standin_cpu_ms for c in xs),
            "gen_cpu_ms": statistics.median(c.gen_cpu_ms for c in xs),
            "lookups_per_req": statistics.median(c.lookups_per_req for c in xs),
            "answered": sum(c.answered * c.n for c in xs) / max(sum(c.n for c in xs), 1),
            "labels": dict(labels.most_common()),
            "per_replica_share": [
                min(c.per_replica_rps) / max(sum(c.per_replica_rps), 1e-9) for c in xs],
            "errors": sum(c.errors for c in xs), "requests": sum(c.n for c in xs),
        }
    if "two-memory" in cells and "two-redis" in cells:
        out["redis_vs_memory_rounds"] = [
            a.rps / b.rps for a, b in zip(cells["two-redis"], cells["two-memory"], strict=True)]
        out["redis_vs_memory"] = statistics.median(out["redis_vs_memory_rounds"])
    best = max(out["configs"].values(), key=lambda c: c["rps"])
    for p in PROBES:
        rps = statistics.median(c.rps for c in cells[p])
        if p == "upstream completions":
            need = STANDIN_MARGIN * best["rps"]
        else:
            need = STANDIN_MARGIN * max(c["rps"] * c["lookups_per_req"]
                                        for c in out["configs"].values())
        out["probes"][p] = {"rps": rps, "needed": need, "ok": rps >= need,
                            "errors": sum(c.errors for c in cells[p])}
    flat = [e for ex in exits for e in ex]
    got = [e for e in flat if e["exit_line"] and e["staleness"]]
    out["staleness"] = {
        "exit_lines": sum(e["exit_line"] for e in flat), "replica_runs": len(flat),
        "p50_ms": statistics.median(e["staleness"]["p50"] for e in got) if got else None,
        "p99_ms": statistics.median(e["staleness"]["p99"] for e in got) if got else None,
        "max_ms": max(e["staleness"]["max"] for e in got) if got else None,
        "samples": sum(e["staleness"]["samples"] for e in got),
    }
    # Batching: the events a peer received from a replica per batch that replica published
    # (heartbeats included; with two replicas, each one's peer is the other).
    per_batch = [ex[1 - i]["events"] / ex[i]["batches"] for ex in exits if len(ex) == 2
                 and all(e["exit_line"] for e in ex) for i in (0, 1) if ex[i]["batches"]]
    out["staleness"]["events_per_batch"] = statistics.median(per_batch) if per_batch else None
    out["others"] = [[c.others for name in cells for c in cells[name][r:r + 1]]
                     for r in range(len(one))]
    return out


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or x != x else fmt.format(x)


def build(cmd: str, s: dict, exits: list[list[dict]], rtt: dict[str, dict],
          meta: dict) -> list[str]:
    c = meta["clients"]
    cfg = s["configs"]
    lines = [
        "# Replica throughput: one proxy vs two, own state vs shared through Redis",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {', '.join(meta['machine'])}, redis-py {meta['redis_py']}, "
        f"{meta['redis_server']}; load average {meta['load0']} at the start, "
        f"{meta['load1']} at the end. Addon: {meta['git']}.",
        "",
        __doc__.split("\n", 2)[2].strip().replace("``", "`"),
        "",
        "## Setup",
        "",
        f"- {meta['rounds']} rounds; every cell {meta['seconds']:g} s measured after "
        f"{meta['warmup']:g} s of warm-up (not measured); {c} clients in every cell (two "
        f"replicas: {c // 2} on each, client i on replica i mod 2). Medians over rounds; "
        "\"vs one\" is the per-round ratio to `one` measured in the same round, then the median.",
        f"- Prompts: {SIZE:,} tokens (words), completions with `max_tokens: 1`; bench.proxy's "
        "8 warm prompts in turn, the same for every configuration (the addon's token cache "
        "has them after the warm-up).",
        f"- Upstream: one process serving {len(ENDPOINT_IDS)} ports = endpoints "
        f"{', '.join(ENDPOINT_IDS)}; controller: bench.proxy's fast LMCache 0.5.6 stand-in. "
        "Every mitmdump: bench.proxy's command line (sim/proxy.py's: `--mode "
        "reverse:<vllm-0> --set connection_strategy=lazy -s addon/kvcache.py`) plus `--set "
        "flow_detail=0`; addon config: those endpoints and that controller, and `state:` "
        f"`{{backend: memory}}`, or `{{backend: redis, url: <the run's redis-server>, channel: "
        f"{CHANNEL}, replica_id: <its name>}}` (every other key at its default: heartbeat "
        "0.5 s, peer_timeout 3 s).",
        "- CPU per request: user + system CPU time (all threads) over the measured window, "
        "divided by the requests completed in it: the configuration's mitmdumps summed, the "
        "redis-server, the two stand-ins, the load generator (this process).",
        "",
        "## Throughput",
        "",
        f"| configuration | replicas x clients | req/s @{c} | vs one | p50 (ms) | p99 (ms) | "
        "proxy CPU ms/req | of which event loop | proxy context switches/req | "
        "redis-server CPU ms/req | stand-ins CPU ms/req | load gen CPU "
        "ms/req | /lookup per req | routed by controller | smaller replica's share | "
        "requests | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in cfg.items():
        per = f"{x['replicas']} x {c // x['replicas']}"
        share = "—" if x["replicas"] == 1 else f"{min(x['per_replica_share']):.1%}"
        lines.append(
            f"| {name} | {per} | {x['rps']:,.0f} | {x['ratio_vs_one']:.2f}x | "
            f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['proxy_cpu_ms']:.2f} | "
            f"{x['proxy_loop_cpu_ms']:.2f} | {x['proxy_ctx_switches']:.1f} | "
            f"{x['redis_cpu_ms']:.3f} | {x['standin_cpu_ms']:.2f} | {x['gen_cpu_ms']:.2f} | "
            f"{x['lookups_per_req']:.2f} | {x['answered']:.1%} | {share} | "
            f"{x['requests']:,} | {x['errors']} |")
    lines += [
        "",
        "\"smaller replica's share\": the lowest share of a round's requests one replica of "
        "the pair served (50% = even). \"routed by controller\": `x-kvcache-route` says the "
        "controller's answer routed it (bench.proxy's `classify`). Decisions (pooled): "
        + "; ".join(f"{name}: " + ", ".join(
            f"{k} {v / max(sum(x['labels'].values()), 1):.1%}"
            for k, v in list(x["labels"].items())[:4]) for name, x in cfg.items()) + ".",
        "",
        "### Per round",
        "",
        "| round | " + " | ".join(f"{n} req/s" for n in cfg) + " | two-memory / one | "
        "two-redis / one | two-redis / two-memory | others' CPU (median / max over cells) |",
        "|---|" + "---|" * (len(cfg) + 4),
    ]
    for r in range(meta["rounds"]):
        others = s["others"][r]
        lines.append(
            f"| {r + 1} | " + " | ".join(f"{x['rps_rounds'][r]:,.0f}" for x in cfg.values())
            + f" | {cfg['two-memory']['ratio_rounds'][r]:.2f} | "
            f"{cfg['two-redis']['ratio_rounds'][r]:.2f} | "
            f"{s['redis_vs_memory_rounds'][r]:.2f} | "
            f"{statistics.median(others):.0%} / {max(others):.0%} |")
    lines += [
        "",
        "Others' CPU: the share of the whole machine used by processes outside the benchmark "
        "during the measured windows (the machine is shared).",
        "",
        "## Staleness of the Redis link under load",
        "",
        "From each two-redis replica's exit line (`[kvcache] shared state: ...`, logged when "
        "it stops): the delay from queueing an event on the event loop to reading the same "
        "batch back from Redis on the loop (its own echo), over the batches that carried "
        "events during the round (warm-up, measured window and the other cells, where it "
        "idles; at most the last 2,048 batches).",
        "",
        "| round | replica | batches published | events received | from peers | p50 (ms) | "
        "p99 (ms) | max (ms) | samples | disconnects | events dropped | exit code |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, ex in enumerate(exits):
        for e in ex:
            if not e["exit_line"]:
                lines.append(f"| {r + 1} | {e['replica']} | **no exit line** | | | | | | | | "
                             f"| {e['returncode']} |")
                continue
            st = e["staleness"]
            lines.append(
                f"| {r + 1} | {e['replica']} | {e['batches']:,} | {e['events']:,} | "
                f"{e['peers']} | {_f(st.get('p50'))} | {_f(st.get('p99'))} | "
                f"{_f(st.get('max'))} | {st.get('samples', 0):,} | {e['disconnects']} | "
                f"{e['dropped']} | {e['returncode']} |")
    st = s["staleness"]
    lines += [
        "",
        f"Median over rounds and replicas of p50: **{_f(st['p50_ms'])} ms**, of p99: "
        f"**{_f(st['p99_ms'])} ms**; worst max: **{_f(st['max_ms'])} ms** "
        f"({st['exit_lines']} of {st['replica_runs']} exit lines found). Events per batch "
        f"(what the peer received / batches published, heartbeats included; median): "
        f"{_f(st['events_per_batch'])}.",
    ]
    trouble = [t for ex in exits for e in ex for t in e["trouble"]]
    if trouble:
        lines += ["", "Link trouble logged by the replicas:", ""]
        lines += [f"- `{t.strip()[:200]}`" for t in trouble[:10]]
    n = rtt["redis-py sync PING"]["calls"]
    lines += [
        "",
        "## One Redis round trip",
        "",
        f"Measured in this process against the same redis-server after the rounds (the "
        f"two-redis replicas stopped, the others idle), {n:,} calls each after 200 unmeasured. "
        f"PUBLISH sends a {rtt['payload_bytes']['bytes']}-byte batch as the addon publishes "
        "one (one routed and one ended request) to a channel with two subscribers. "
        "GET reads a key holding that batch. CPU per call: this process's CPU time "
        "(`time.process_time`) over the calls, divided by them.",
        "",
        "| client | p50 (µs) | p99 (µs) | mean (µs) | client CPU µs/call | calls/s |",
        "|---|---|---|---|---|---|",
    ]
    for label, x in rtt.items():
        if label == "payload_bytes":
            continue
        lines.append(f"| {label} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                     f"{x['mean_us']:.0f} | {x['cpu_us_per_call']:.0f} | "
                     f"{x['calls_per_s']:,.0f} |")
    lines += [
        "",
        f"## Stand-ins measured directly ({c} clients)",
        "",
        f"In the same rounds. Each should do at least {STANDIN_MARGIN:g}x what the fastest "
        "configuration asks of it (completions: its req/s; `/lookup`: its req/s times the "
        "lookups per request); lower bounds, as the load generator shares the machine.",
        "",
        "| stand-in | req/s | needed | ok |",
        "|---|---|---|---|",
    ]
    for p, x in s["probes"].items():
        lines.append(f"| {p} | {x['rps']:,.0f} | {x['needed']:,.0f} | "
                     f"{'yes' if x['ok'] else '**no**'} |")
    lines += ["", "## What this shows", "", shows(s, rtt), "",
              f"**Wall time: {meta['wall_s'] / 60:.1f} min.**", ""]
    return lines


def shows(s: dict, rtt: dict[str, dict]) -> str:
    cfg = s["configs"]
    one, mem, red = cfg["one"], cfg["two-memory"], cfg["two-redis"]
    st = s["staleness"]
    aio = rtt["redis.asyncio GET"]
    pub = rtt["redis-py sync PUBLISH"]
    share_cpu = red["proxy_cpu_ms"] - mem["proxy_cpu_ms"]
    loop_cpu = red["proxy_loop_cpu_ms"] - mem["proxy_loop_cpu_ms"]
    per_req = aio["cpu_us_per_call"] / 1000
    text = (
        f"On this {os.cpu_count()}-core machine, one replica served {one['rps']:,.0f} req/s; "
        f"two replicas with their own state {mem['rps']:,.0f} req/s "
        f"({mem['ratio_vs_one']:.2f}x one, median of per-round ratios) and two sharing "
        f"their state through Redis {red['rps']:,.0f} req/s ({red['ratio_vs_one']:.2f}x one, "
        f"{s['redis_vs_memory']:.2f}x two-memory). The proxies' CPU per request was "
        f"{one['proxy_cpu_ms']:.2f} ms (one), {mem['proxy_cpu_ms']:.2f} ms (two-memory) and "
        f"{red['proxy_cpu_ms']:.2f} ms (two-redis): sharing cost "
        f"{share_cpu:+.2f} ms of proxy CPU per request "
        f"({share_cpu / mem['proxy_cpu_ms']:+.0%}; {loop_cpu:+.2f} ms of it on the event "
        f"loops), plus "
        f"{red['redis_cpu_ms']:.3f} ms of redis-server CPU, and "
        f"{red['proxy_ctx_switches']:.1f} context switches per request against "
        f"{mem['proxy_ctx_switches']:.1f}. Two replicas, the stand-ins, the load generator "
        f"(and Redis) share {os.cpu_count()} cores here, so a second replica adds only the "
        f"CPU left over, and whatever sharing costs comes out of it. Under that load the "
        f"link's staleness (queue -> Redis -> back on the "
        f"loop) was {_f(st['p50_ms'])} ms at p50 and {_f(st['p99_ms'])} ms at p99 (median "
        f"over rounds and replicas), {_f(st['max_ms'])} ms at worst, with "
        f"{_f(st['events_per_batch'])} events per published batch. One Redis round trip "
        f"costs {pub['p50_us']:.0f} µs (p50) and {pub['cpu_us_per_call']:.0f} µs of client "
        f"CPU for a synchronous PUBLISH, and {aio['p50_us']:.0f} µs "
        f"(p50, p99 {aio['p99_us']:.0f} µs) and "
        f"{aio['cpu_us_per_call']:.0f} µs of CPU for a redis.asyncio GET on an event loop: "
        f"reading Redis on the request path would add that latency to every request and "
        f"about {per_req / one['proxy_cpu_ms']:.0%} to one replica's "
        f"{one['proxy_cpu_ms']:.2f} ms of CPU per request, which is why the addon reads a "
        f"local mirror instead.")
    conc = next((v for k, v in rtt.items() if k.endswith("concurrent")), None)
    if conc is not None:
        text += (f" With 16 GETs in flight at once, each waited {conc['p50_us']:.0f} µs "
                 f"(p50; p99 {conc['p99_us']:.0f} µs).")
    link_pub = rtt.get("addon link PUBLISH (pipelined)")
    aio_pub = rtt.get("redis.asyncio PUBLISH")
    link_recv = rtt.get("addon link receive (incl. msgpack decode)")
    aio_recv = rtt.get("redis.asyncio pub/sub receive")
    if link_pub and aio_pub and link_recv and aio_recv:
        text += (f" On the event loop, the addon's link spends {link_pub['cpu_us_per_call']:.0f}"
                 f" µs of CPU per published batch (pipelined) and "
                 f"{link_recv['cpu_us_per_call']:.0f} µs per batch received and decoded, "
                 f"against {aio_pub['cpu_us_per_call']:.0f} µs and "
                 f"{aio_recv['cpu_us_per_call']:.0f} µs for redis.asyncio doing the same.")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.replica_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=float, default=3.0,
                    help="measured seconds per cell (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="unmeasured seconds before each cell (default 1)")
    ap.add_argument("--clients", type=int, default=16,
                    help="clients in every cell, split over the replicas (default 16)")
    ap.add_argument("--rtt-calls", type=int, default=5000,
                    help="calls per Redis round-trip measurement (default 5000)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 1 s cells and 500 round trips (for the tests)")
    ap.add_argument("--out", type=Path, default=Path("docs"),
                    help=f"directory for {REPORT} and its .json (default docs)")
    args = ap.parse_args(argv)
    if args.clients < 2 or args.clients % 2:
        ap.error("--clients must be even (split over two replicas)")
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.rtt_calls = 1, 1.0, 0.5, 500

    import redis

    from bench.report import publish
    from sim.redis_server import binary

    cmd = "python -m bench.replica_throughput" + (" " + shlex.join(argv) if argv else "")
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        script, digest = snapshot_addon(tmp)
        up_proc, up_ports = _standin(stack, "upstream", "--ports", str(len(ENDPOINT_IDS)))
        ctl_proc, (ctl_port,) = _standin(stack, "controller", "--ids", ",".join(ENDPOINT_IDS))
        server = stack.enter_context(redis_server(tmp / "redis"))
        assert server.proc is not None
        engines = {e: f"http://{HOST}:{p}" for e, p in zip(ENDPOINT_IDS, up_ports, strict=True)}
        cluster = Cluster(stack, tmp, script, engines, f"http://{HOST}:{ctl_port}", server.url)
        cluster.start_memory()
        log(f"started: upstream {up_ports}, controller {ctl_port}, redis {server.url}")
        procs = Procs(up_proc, ctl_proc, psutil.Process(server.proc.pid))
        run = asyncio.run(_rounds(procs, cluster, up_ports, ctl_port, args.rounds,
                                  args.seconds, args.warmup, args.clients, log))
        log(f"Redis round trips ({args.rtt_calls} calls each)")
        rtt = redis_round_trip(server.url, args.rtt_calls)
        exe = binary() or "redis-server"
        try:
            server_version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                            timeout=10).stdout.split(" sha=")[0].strip()
        except (OSError, subprocess.SubprocessError):
            server_version = "redis-server"
    wall = time.perf_counter() - t0
    s = summarize(run["cells"], run["exits"])
    meta = {
        "clients": args.clients, "rounds": args.rounds, "seconds": args.seconds,
        "warmup": args.warmup, "machine": _machine(), "redis_py": redis.__version__,
        "redis_server": server_version, "load0": load0,
        "load1": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": f"{_git()}; run from a copy of addon/ taken at the start (sources hash "
               f"`{digest}`)", "wall_s": wall, "command": cmd,
    }
    publish(build(cmd, s, run["exits"], rtt, meta), args.out, REPORT)
    data = {"meta": meta, "summary": s, "redis_round_trip": rtt, "exits": run["exits"],
            "cells": {k: [asdict(c) for c in v] for k, v in run["cells"].items()}}
    (args.out / REPORT.replace(".md", ".json")).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
