"""``python -m bench.replica_staleness``: how stale the replicas' shared state is, measured
on real processes at the request rates the routing simulation models.

N real ``mitmdump`` replicas with the addon (``state.backend: redis``, one real
redis-server) in front of bench/proxy.py's stand-ins take an open-loop Poisson stream of
warm 1k-token completions at a fixed total rate, each request to a replica drawn at random
(an L4 load balancer). When a replica stops it logs its link's staleness: the delay from
queueing an event on its event loop to reading the same batch back from Redis on the loop
(its own echo, the path a peer's copy takes), as percentiles. ``bench.replicas`` samples its
simulated staleness from these (``--staleness-from docs/replica-staleness.json``).

bench.replica_throughput measures the same link with saturated proxies (closed-loop
clients): there the staleness is mostly the event loop's own lag, which delays a replica's
own requests as much.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from bench.proxy import (
    ENDPOINT_IDS,
    HOST,
    Prompts,
    _git,
    _machine,
    _parse_head,
    _read_body,
    _standin,
    snapshot_addon,
)
from bench.replica_throughput import Cluster, parse_exit
from sim.redis_server import redis_server

REPORT = "replica-staleness"
PATH = "/v1/completions"
SIZE = 1024
QUANTILES = ("p10", "p25", "p50", "p75", "p90", "p99", "max")


async def _drive(ports: Sequence[int], rate: float, seconds: float, seed: int,
                 conns: int = 8) -> tuple[int, int]:
    """Open-loop Poisson arrivals at `rate` req/s for `seconds`, each to a random replica,
    over `conns` keep-alive connections per replica; (answered, errors)."""
    rng = random.Random(seed)
    prompts = Prompts(SIZE, True, "warm")
    queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue() for _ in ports]
    counts = [0, 0]

    async def worker(port: int, q: asyncio.Queue[bytes | None]) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        head = b"POST %b HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json\r\n" % (
            PATH.encode(), HOST.encode(), port)
        try:
            while (body := await q.get()) is not None:
                writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
                first, fields = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                await _read_body(reader, fields)
                counts[int(first.split(b" ", 2)[1]) >= 400] += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker(p, q)) for p, q in zip(ports, queues, strict=True)
             for _ in range(conns)]
    end = time.perf_counter() + seconds
    t = time.perf_counter()
    while t < end:
        t += rng.expovariate(rate)
        await asyncio.sleep(max(t - time.perf_counter(), 0))
        queues[rng.randrange(len(ports))].put_nowait(prompts.next())
    for q in queues:
        for _ in range(conns):
            q.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return counts[0], counts[1]


def stop_all(reps: Sequence) -> list[dict]:  # type: ignore[type-arg]
    """SIGTERM every replica at once (each still counts the others when it logs), then each
    one's exit line."""
    for rep in reps:
        rep.proc.terminate()
    out = []
    for rep in reps:
        try:  # one SIGTERM only: a second one kills mitmdump while it shuts down
            rep.proc.wait(timeout=15)
        except Exception:
            rep.proc.kill()
            rep.proc.wait(5)
        out.append(parse_exit(rep.name, rep.log.read_text(errors="replace"),
                              rep.proc.returncode))
    return out


def pooled(exits: Sequence[dict]) -> dict[str, float]:
    """Per percentile, the median over the replicas of a run (each has about as many
    samples); the worst max."""
    out: dict[str, float] = {}
    for q in QUANTILES:
        xs = sorted(e["staleness"][q] for e in exits if e.get("staleness", {}).get(q) is not None)
        if xs:
            out[q] = xs[-1] if q == "max" else xs[len(xs) // 2]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.replica_staleness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="2,4,8", help="replica counts (default 2,4,8)")
    ap.add_argument("--rates", default="100,300",
                    help="total request rates in req/s (default 100,300)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.replicas.split(",")]
    rates = [float(x) for x in args.rates.split(",")]
    cmd = "python -m bench.replica_staleness" + (" " + shlex.join(argv) if argv else "")
    runs: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-staleness-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        script, digest = snapshot_addon(tmp)
        _, up_ports = _standin(stack, "upstream", "--ports", str(len(ENDPOINT_IDS)))
        _, (ctl_port,) = _standin(stack, "controller", "--ids", ",".join(ENDPOINT_IDS))
        server = stack.enter_context(redis_server(tmp / "redis"))
        engines = {e: f"http://{HOST}:{p}" for e, p in zip(ENDPOINT_IDS, up_ports, strict=True)}
        cluster = Cluster(stack, tmp, script, engines, f"http://{HOST}:{ctl_port}", server.url)
        # mitmproxy's CA is created by the first one to start, in the shared confdir.
        stop_all(cluster._start(["ca"], "memory"))
        for n in ns:
            for rate in rates:
                reps = cluster._start([f"r{n}-{int(rate)}-{i}" for i in range(n)], "redis")
                time.sleep(1.0)  # every replica subscribed and heard from the others
                ok, errors = asyncio.run(_drive([r.port for r in reps], rate, args.seconds,
                                                seed=n * 1000 + int(rate)))
                exits = stop_all(reps)
                run = {"replicas": n, "rate": rate, "answered": ok, "errors": errors,
                       "staleness_ms": pooled(exits), "exits": exits}
                runs.append(run)
                print(f"[{time.perf_counter() - t0:5.0f} s] {n} replicas @ {rate:g} req/s: "
                      f"{ok} answered, {errors} errors, staleness {run['staleness_ms']}",
                      file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{REPORT}.json").write_text(json.dumps(
        {"command": cmd, "addon_sources": digest, "runs": runs}, indent=1) + "\n")
    lines = [
        "# Staleness of the replicas' shared state at a fixed request rate", "",
        f"Command: `{cmd}`", "",
        f"Machine: {', '.join(_machine())}. Addon: {_git()}, sources hash `{digest}`.", "",
        __doc__.split("\n\n", 1)[1].replace("``", "`").strip(), "",
        f"Each run: {args.seconds:g} s of open-loop Poisson arrivals (warm 1k-token "
        "completions, max_tokens 1), each request to a random replica; the replicas' "
        "percentiles pooled as the median over the replicas (the worst max).", "",
        "| replicas | req/s (all replicas) | answered | errors | "
        + " | ".join(f"{q} (ms)" for q in QUANTILES) + " | disconnects |",
        "|---|---|---|---|" + "---|" * len(QUANTILES) + "---|",
    ]
    for r in runs:
        st = r["staleness_ms"]
        lines.append(
            f"| {r['replicas']} | {r['rate']:g} | {r['answered']:,} | {r['errors']} | "
            + " | ".join(f"{st.get(q, float('nan')):.2f}" for q in QUANTILES)
            + f" | {sum(e.get('disconnects', 0) for e in r['exits'])} |")
    lines += ["", f"Wall time: {wall / 60:.1f} min.", ""]
    (args.out / f"{REPORT}.md").write_text("\n".join(lines))
    print(f"wrote {args.out / REPORT}.md", file=sys.stderr)
    return 0 if all(r["errors"] == 0 and r["staleness_ms"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
