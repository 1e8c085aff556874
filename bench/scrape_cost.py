"""``python -m bench.scrape_cost [--url URL] [--out docs]``: what reading the engines' metrics
costs the proxy.

The addon's scraper thread (``addon.engine_metrics.EngineScraper``) reads every endpoint's
``/metrics`` every ``engine_metrics_interval``. This measures the CPU time of that thread
per scrape (fetch over a kept-alive connection + parse), against a local HTTP server that
serves the page captured from a real vLLM 0.32 server (``tests/data/vllm-0.32-metrics.txt``,
55 KB), or against ``--url`` (a live vLLM). Beside it, the parse alone by the hand-written
scan and by ``prometheus_client.parser`` (why the scan is hand-written). Rounds alternate
between the two parsers; the spread is over rounds.
"""

from __future__ import annotations

import argparse
import http.server
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from addon.engine_metrics import EngineScraper, parse
from bench.report import publish

PAGE = Path(__file__).resolve().parents[1] / "tests" / "data" / "vllm-0.32-metrics.txt"


def serve(body: bytes) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn (vLLM's server) does

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.scrape_cost", description=__doc__)
    ap.add_argument("--url", default="", help="a live vLLM base URL instead of the page")
    ap.add_argument("--endpoints", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes per round")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    page = PAGE.read_bytes()
    srv = None
    url = args.url
    if not url:
        srv, url = serve(page)
    scraper = EngineScraper({f"e{i}": url for i in range(args.endpoints)}, args.interval,
                            timeout=2.0, mark=lambda: 0, deliver=lambda *a: None)
    per_scrape: list[float] = []
    scan: list[float] = []
    prom: list[float] = []
    body = page
    for _ in range(2):  # warm the connections
        scraper.scrape_once()
    for _ in range(args.rounds):
        before, cpu0 = scraper.stats.scrapes, scraper.stats.cpu_seconds
        while scraper.stats.scrapes - before < args.scrapes:
            scraper.scrape_once()
        n = scraper.stats.scrapes - before
        per_scrape.append((scraper.stats.cpu_seconds - cpu0) / n)
        t = time.thread_time()
        for _ in range(200):
            parse(body)
        scan.append((time.thread_time() - t) / 200)
        t = time.thread_time()
        for _ in range(5):
            list(text_string_to_metric_families(body.decode()))
        prom.append((time.thread_time() - t) / 5)
    failures = scraper.stats.failures
    if srv is not None:
        srv.shutdown()

    def ms(xs: list[float]) -> str:
        return (f"{statistics.median(xs) * 1000:.3f} ms "
                f"({min(xs) * 1000:.3f}-{max(xs) * 1000:.3f})")

    med = statistics.median(per_scrape)
    share = med * args.endpoints / args.interval
    command = "python -m bench.scrape_cost" + (" " + shlex.join(argv) if argv else "")
    lines = [
        "# What reading the engines' metrics costs", "",
        f"Command: `{command}`. CPU time of the scraper thread "
        "(`addon/engine_metrics.py`, `http.client` over a kept-alive connection + the "
        "hand-written scan), per scrape, median of "
        f"{args.rounds} rounds of {args.scrapes} scrapes (range over rounds), against "
        + (f"`{args.url}`" if args.url else
           "a local server of the page captured from a real vLLM 0.32 server "
           f"({len(page):,} bytes)") + f"; {failures} failed.", "",
        "| what | CPU per call |", "|---|---|",
        f"| one scrape (fetch + parse) | {ms(per_scrape)} |",
        f"| parse only, hand-written scan | {ms(scan)} |",
        f"| parse only, `prometheus_client.parser` | {ms(prom)} |", "",
        f"At the default `engine_metrics_interval` ({args.interval:g} s) with "
        f"{args.endpoints} endpoints: {args.endpoints / args.interval:.0f} scrapes/s, "
        f"{share * 100:.1f}% of one core.", "",
    ]
    publish(lines, args.out, "engine-metrics-cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
