"""``python -m bench.http_clients``: the request path's HTTP client, measured against the
alternatives.

The addon's request path makes one small JSON POST per routed request (LMCache's `/lookup`,
sometimes vLLM's `/tokenize`) on mitmproxy's own event loop, so the client's CPU per request
is the proxy's throughput. This posts a 1k-token `/lookup` body to the controller stand-in
of `bench.proxy` (raw asyncio, answers in microseconds, in its own process) with:

- `addon.http1.JSONClient` (what the addon uses),
- `httpx.AsyncClient` (what the addon used before; still its background client),
- `aiohttp.ClientSession`, when aiohttp is installed (it is not a dependency of the addon),

at 1 and 16 concurrent requests, interleaved rounds, and reports this process's CPU per
request (the cost the proxy's loop would pay) and its ratio to JSONClient's in the same
round. The command is at the top of the report (`docs/http-clients.md`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from addon.http1 import JSONClient
from bench.proxy import HOST, _standin

REPORT = "http-clients.md"
Post = Callable[[dict], Awaitable[bytes]]


async def _make(name: str, url: str) -> tuple[Post, Callable[[], Awaitable[None]]]:
    if name == "JSONClient (addon/http1.py)":
        c = JSONClient(url)

        async def post_j(body: dict) -> bytes:
            return (await c.post("/lookup", body)).body

        return post_j, c.aclose
    if name == "httpx.AsyncClient":
        import httpx

        h = httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_keepalive_connections=64))

        async def post_h(body: dict) -> bytes:
            return (await h.post("/lookup", json=body, timeout=2.0)).content

        return post_h, h.aclose
    import aiohttp

    s = aiohttp.ClientSession(base_url=url)

    async def post_a(body: dict) -> bytes:
        async with s.post("/lookup", json=body) as r:
            return await r.read()

    return post_a, s.close


async def _cell(post: Post, body: dict, concurrency: int, n: int) -> tuple[float, float]:
    """(CPU ms per request in this process, wall ms per request)."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await post(body)

    c0, w0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - c0) * 1000 / n, (time.perf_counter() - w0) * 1000 / n


def _clients() -> list[str]:
    names = ["JSONClient (addon/http1.py)", "httpx.AsyncClient"]
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        pass
    else:
        names.append("aiohttp.ClientSession")
    return names


async def _run(url: str, rounds: int, n: int) -> dict[tuple[str, int], list[tuple[float, float]]]:
    rng = random.Random(0)
    body = {"tokens": [rng.randrange(50_000) for _ in range(1024)]}
    names = _clients()
    made = {name: await _make(name, url) for name in names}
    out: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for post, _ in made.values():  # connections open, imports done
            await _cell(post, body, 16, 64)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for conc in (1, 16):
                for name in order:
                    out.setdefault((name, conc), []).append(
                        await _cell(made[name][0], body, conc, n))
    finally:
        for _, close in made.values():
            await close()
    return out


def build(cmd: str, res: dict[tuple[str, int], list[tuple[float, float]]], rounds: int,
          n: int) -> list[str]:
    names = _clients()
    base = names[0]
    lines = [
        "# The request path's HTTP client against the alternatives",
        "",
        f"Command: `{cmd}`",
        "",
        __doc__.split("\n", 2)[2].strip().replace("``", "`"),
        "",
        f"{rounds} interleaved rounds of {n} POSTs per client and concurrency; medians over "
        "rounds; the ratio is per round against JSONClient, then its median.",
        "",
        "| client | concurrency | CPU ms/request | x JSONClient | wall ms/request |",
        "|---|---|---|---|---|",
    ]
    for conc in (1, 16):
        for name in names:
            cpu = [c for c, _ in res[(name, conc)]]
            ratio = [c / b for c, (b, _) in zip(cpu, res[(base, conc)], strict=True)]
            wall = [w for _, w in res[(name, conc)]]
            lines.append(f"| {name} | {conc} | {statistics.median(cpu):.3f} | "
                         f"{statistics.median(ratio):.2f}x | {statistics.median(wall):.3f} |")
    if "aiohttp.ClientSession" not in names:
        lines += ["", "aiohttp was not installed in this run (`pip install aiohttp` adds it)."]
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.http_clients", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=2000, help="POSTs per cell")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    from bench.report import publish

    cmd = "python -m bench.http_clients" + (" " + shlex.join(argv) if argv else "")
    with ExitStack() as stack:
        _, (port,) = _standin(stack, "controller", "--ids", "e1,e2")
        res = asyncio.run(_run(f"http://{HOST}:{port}", args.rounds, args.requests))
    publish(build(cmd, res, args.rounds, args.requests), args.out, REPORT)
    print(json.dumps({f"{k[0]} @{k[1]}": statistics.median(c for c, _ in v)
                      for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
