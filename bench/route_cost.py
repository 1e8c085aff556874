"""``python -m bench.route_cost``: CPU time of the routing step on the request path.

Every LLM request pays for ``Router.route`` (chunk hashing, the merge with the proxy's own
view, hot-prefix counting, the policy) plus ``started``/``finished`` bookkeeping before and
after it is sent. This times that work with an in-process controller that answers at once,
so only the proxy's own CPU time is measured (the lookup's network time is the controller's
and is bounded by the routing budget), for several prompt sizes and with each of the newer
parts of the policy off. Results are ratios to the plain chunk hashing of the same prompt,
measured in the same run: the machine is shared, so absolute microseconds move between
runs and only the ratios compare.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from addon.lmcache import LookupResult
from addon.policy import EndpointState, LoadBalancer, PolicyParams
from addon.prefix_index import chunk_hashes
from addon.request import LLMRequest
from addon.resilience import CircuitBreaker, RateLimitedLog
from addon.router import Router
from bench import report

ENDPOINTS = [f"e{i}" for i in range(4)]
SIZES = (1024, 4096, 16384, 65536)
# Rows: the addon's defaults, and each newer part turned off.
VARIANTS: dict[str, PolicyParams] = {
    "defaults": PolicyParams(),
    "no hot-prefix counting (routing_hot_half_life: 0)": PolicyParams(hot_half_life=0),
    "no in-flight merge (routing_track_inflight: false)": PolicyParams(track_inflight=False),
}


class _Instant:
    """A controller that answers at once: the first endpoint holds half of every prompt."""

    async def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        return LookupResult({ENDPOINTS[0]: len(tokens) // 512 * 256})


def _router(params: PolicyParams) -> Router:
    return Router(
        budget=1.0, state=EndpointState(ENDPOINTS, 10.0),
        balancer=LoadBalancer("least_inflight"), token_cache=None, lmcache=_Instant(),
        tokenizer=None, controller_breaker=CircuitBreaker(5, 10.0, 2),
        tokenizer_breaker=CircuitBreaker(5, 10.0, 2), failure_log=RateLimitedLog(),
        policy=params,
    )


def _prompts(size: int, n: int, rng: random.Random) -> list[tuple[int, ...]]:
    """`n` prompts of `size` tokens: a shared half (a system prompt) + a unique half."""
    shared = tuple(rng.randrange(50_000) for _ in range(size // 2))
    return [shared + tuple(rng.randrange(50_000) for _ in range(size - size // 2))
            for _ in range(n)]


def _time_per_call(fn: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n


def measure(size: int, n: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per request, over `repeats` rounds of `n` requests: chunk hashing
    alone, and route + started + finished for each variant (interleaved per round, so a
    noisy neighbour hits every row alike)."""
    prompts = _prompts(size, n, random.Random(seed))
    loop = asyncio.new_event_loop()
    samples: dict[str, list[float]] = {"chunk hashing only": []}
    samples.update({name: [] for name in VARIANTS})
    try:
        for _ in range(repeats):
            samples["chunk hashing only"].append(
                _time_per_call(lambda i: chunk_hashes(prompts[i]), n))
            for name, params in VARIANTS.items():
                router = _router(replace(params))

                def one(i: int, router: Router = router) -> None:
                    req = LLMRequest("/v1/completions", "m", "", f"k{i}", "completion",
                                     token_ids=prompts[i])
                    d = loop.run_until_complete(router.route(req))
                    router.started(i, d)
                    if i >= 32:  # keep 32 requests in flight, as under load
                        router.finished(i - 32, ENDPOINTS[0])

                samples[name].append(_time_per_call(one, n))
    finally:
        loop.close()
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.route_cost", description=__doc__)
    ap.add_argument("--requests", type=int, default=200, help="requests per round")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (the median is kept)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="comma-separated prompt sizes in tokens")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="directory for route-cost.md")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    t0 = time.perf_counter()
    results = {size: measure(size, args.requests, args.repeats) for size in sizes}
    wall = time.perf_counter() - t0
    command = "python -m bench.route_cost" + (" " + shlex.join(argv) if argv else "")
    rows = ["chunk hashing only", *VARIANTS]
    out = [
        "# Routing step: CPU time per request", "",
        f"Command: `{command}`. {__doc__.split(chr(10), 2)[2].strip()}", "",
        "Each cell: median microseconds per request, then the ratio to chunk hashing alone "
        "for the same prompt size (the ratios are what compare between runs).", "",
        "| | " + " | ".join(f"{s:,} tokens" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for row in rows:
        cells = []
        for size in sizes:
            r = results[size]
            cells.append(f"{r[row] * 1e6:,.0f} us ({r[row] / r['chunk hashing only']:.2f}x)")
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    out += ["", f"Wall time {wall:.1f} s (machine-dependent).", ""]
    report.publish(out, args.out, "route-cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
