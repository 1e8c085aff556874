"""Each engine's own queue, read from vLLM's `/metrics` in a background thread.

What the proxy sees of a request (its first streamed byte, its end) says nothing about a
non-streamed request's prefill, nor about traffic that did not pass through this proxy. The
engine's own gauges do: `vllm:num_requests_waiting` (not yet scheduled: its prefill has not
started) and `vllm:num_requests_running`, and two counters, the requests that produced a
first token (`vllm:time_to_first_token_seconds_count`) and those that ended
(`vllm:request_success_total`), whose difference is the requests decoding. Every
`interval` seconds this thread reads them from every endpoint and hands them to the event
loop (`deliver`), which reconciles them with the proxy's own view
(`PrefixIndex.engine_report`). Never on the request path: a scrape
that fails or is late leaves the proxy's own view in charge (counted, logged once a minute).
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from addon.resilience import RateLimitedLog

logger = logging.getLogger(__name__)

WAITING = b"vllm:num_requests_waiting"
RUNNING = b"vllm:num_requests_running"
KV_USAGE = b"vllm:kv_cache_usage_perc"
# Counters: requests that produced a first token (the count of vLLM's TTFT histogram) and
# requests that ended, whatever the reason (stop, length, abort, error, ...).
FIRST_TOKENS = b"vllm:time_to_first_token_seconds_count"
FINISHED = b"vllm:request_success_total"


@dataclass(frozen=True)
class EngineReading:
    waiting: int
    running: int
    kv_usage: float  # 0..1, or -1 when the engine does not report it
    # Cumulative counts (None when the page lacks them): their difference is the requests
    # decoding, so the proxy knows how many prefills are over without streamed answers.
    first_tokens: int | None = None
    finished: int | None = None


def _sum_gauge(text: bytes, name: bytes) -> float | None:
    """The sum of a gauge's (or counter's) samples over its label sets (a data-parallel
    server reports one per engine), or None when absent.

    Hand-written: vLLM's page is ~55 KB of mostly histograms and it ignores prometheus'
    `name[]` filter; `prometheus_client.parser` turns every line into objects (~140x
    this cost per scrape), while a few series are found with `bytes.find` in C.
    """
    total, found, start = 0.0, False, 0
    needle = b"\n" + name
    while (i := text.find(needle, start)) >= 0:
        j = i + len(needle)
        start = j
        if j < len(text) and text[j : j + 1] not in (b"{", b" "):
            continue  # a longer name that starts the same (num_requests_waiting_by_reason)
        end = text.find(b"\n", j)
        line = text[j : end if end >= 0 else len(text)]
        try:
            total += float(line.rsplit(b" ", 1)[-1])
        except ValueError:
            continue
        found = True
    return total if found else None


def parse(text: bytes) -> EngineReading | None:
    """The queue gauges of one `/metrics` page; None if it has none (not a vLLM server)."""
    text = b"\n" + text  # every sample line then starts after a newline
    waiting, running = _sum_gauge(text, WAITING), _sum_gauge(text, RUNNING)
    if waiting is None or running is None:
        return None
    kv = _sum_gauge(text, KV_USAGE)
    first, done = _sum_gauge(text, FIRST_TOKENS), _sum_gauge(text, FINISHED)
    if first is None or done is None:  # one without the other tells nothing
        first = done = None
    return EngineReading(int(waiting), int(running), -1.0 if kv is None else kv,
                         None if first is None else int(first),
                         None if done is None else int(done))


@dataclass
class ScrapeStats:
    scrapes: int = 0
    failures: int = 0
    # Readings with the queue gauges but not the first-token and finished counters: the
    # end of a non-streamed prefill is then estimated from the gauges alone.
    gauges_only: int = 0
    cpu_seconds: float = 0.0  # this thread's CPU time spent scraping (fetch + parse)


class _Fetcher:
    """GET one URL over a kept-alive connection.

    `http.client` rather than httpx: a scrape of vLLM's 55 KB page costs ~0.25-0.4 ms of
    CPU with it against ~1 ms with httpx (measured here), and this runs several times a second
    per endpoint for the proxy's whole life.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self._conn is None:
                cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self._conn = cls(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("GET", self.path, headers={"Accept": "text/plain"})
                r = self._conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle kept-alive connection: one fresh try.
                self.close()
                if attempt:
                    raise
            except Exception:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class EngineScraper:
    """A daemon thread that reads every endpoint's `/metrics` every `interval` seconds.

    `mark()` is read just before each request (the proxy's send counter: the reading covers
    what was sent up to then); `deliver(endpoint_id, reading or None, mark)` is called from
    this thread and must hand over to the event loop itself (call_soon_threadsafe).
    """

    def __init__(
        self,
        urls: Mapping[str, str],
        interval: float,
        timeout: float,
        mark: Callable[[], int],
        deliver: Callable[[str, EngineReading | None, int], None],
        failure_log: RateLimitedLog | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.urls = {eid: url.rstrip("/") + "/metrics" for eid, url in urls.items()}
        self.interval = interval
        self.timeout = timeout
        self.mark = mark
        self.deliver = deliver
        self.failure_log = failure_log or RateLimitedLog()
        self.stats = ScrapeStats()
        self.last: dict[str, EngineReading | None] = {}
        self._fetchers = {eid: _Fetcher(url, timeout) for eid, url in self.urls.items()}
        self._gauges_only: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvcache-metrics",
                                            daemon=True)
            self._thread.start()

    def stop(self, wait: bool = False) -> None:
        """Stop after the current request (at most `timeout`); `wait` joins the thread."""
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join(timeout=self.timeout + 1)
        self._thread = None

    def scrape_once(self) -> None:
        for eid, fetcher in self._fetchers.items():
            if self._stop.is_set():
                return
            t0 = time.thread_time()
            seq = self.mark()
            reading: EngineReading | None = None
            why = ""
            try:
                status, body = fetcher.get()
                if status == 200:
                    reading = parse(body)
                    why = "" if reading is not None else "no vLLM queue gauges"
                else:
                    why = f"HTTP {status}"
            except Exception as e:  # refused, timed out, TLS, malformed: all "no reading"
                why = type(e).__name__
            self.stats.scrapes += 1
            self.stats.cpu_seconds += time.thread_time() - t0
            if reading is None:
                self.stats.failures += 1
                log_now, n = self.failure_log.should_log(f"metrics:{eid}")
                if log_now:
                    more = f" ({n} more since the last report)" if n else ""
                    logger.warning(f"[kvcache] reading {self.urls[eid]} failed ({why}); "
                                   f"routing on the proxy's own view of {eid}'s load{more}")
            elif (reading.first_tokens is None) != (eid in self._gauges_only):
                self._counters_changed(eid, reading.first_tokens is None)
            if reading is not None and reading.first_tokens is None:
                self.stats.gauges_only += 1
            self.last[eid] = reading
            self.deliver(eid, reading, seq)

    def _counters_changed(self, eid: str, missing: bool) -> None:
        # Logged when it changes, not per reading: an older vLLM lacks them for good.
        if missing:
            self._gauges_only.add(eid)
            logger.warning(f"[kvcache] {self.urls[eid]} has vLLM's queue gauges but not "
                           f"{FIRST_TOKENS.decode()} and {FINISHED.decode()}: the end of "
                           f"non-streamed prefills on {eid} is estimated from the gauges "
                           f"alone (counted in kvcache_engine_metrics_gauges_only)")
        else:
            self._gauges_only.discard(eid)
            logger.info(f"[kvcache] {self.urls[eid]} reports vLLM's first-token and "
                        f"finished counters again")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    self.scrape_once()
                except Exception:  # never let the thread die: the next round may work
                    logger.debug("[kvcache] metrics scrape round failed", exc_info=True)
                self._stop.wait(max(self.interval - (time.monotonic() - t0), 0.0))
        finally:
            for f in self._fetchers.values():
                f.close()
