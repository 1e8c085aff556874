"""``python -m bench.proxy``: what the proxy costs a request, measured on real processes.

Bare ``mitmdump`` (reverse mode, no script) against the addon loaded but disabled and the
addon routing (1k- and 16k-token prompts, warm and cold token cache, a fast and a 50 ms
controller), at 1 client and at 16 clients, each configuration a real ``mitmdump`` started
once. The upstream "vLLM" and the LMCache controller are small raw-asyncio HTTP/1.1 servers
in their own processes (``--serve``, answering in tens of microseconds); the load generator
is a raw-asyncio keep-alive client in this process (one connection per client, closed loop).
Rounds are interleaved (every configuration at 1 then at 16 clients, then the next round),
and each ratio is taken against bare mitmdump measured in the same round, then the median
over rounds is kept: the machine is shared, so only same-round comparisons are fair. The
stand-ins are measured directly in the same rounds, and the report is refused when they are
not at least three times (``STANDIN_MARGIN``) as fast as the proxy they serve.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sim.cluster import stop_process
from sim.proxy import command, route_info, write_config

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
VOCAB = 50_000
MAX_MODEL_LEN = 32768
ENDPOINT_IDS = ("vllm-0", "vllm-1")  # two ports of one upstream process
N_WARM = 8  # distinct prompts a warm workload cycles through
COLD_HEAD = 16  # fresh words at the start of every cold prompt
CHUNK = 256  # LMCache's chunk: the controller stand-in matches whole chunks
STANDIN_MARGIN = 3.0  # stand-ins must do this many times the proxy's req/s
REPORT = "proxy-overhead.md"

# What counts as "routed with a controller answer" (see `classify`).
ANSWERED_REASONS = ("cache-hit", "cache-spill")
ANSWERED_WHYS = ("no-match", "unknown-instance")


# --- HTTP/1.1 on raw asyncio streams (the stand-ins and the load generator) --------------------

def _parse_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    lines = head[:-4].split(b"\r\n")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        fields[k.strip().lower()] = v.strip()
    return lines[0], fields


async def _read_body(reader: asyncio.StreamReader, fields: dict[bytes, bytes]) -> bytes:
    n = fields.get(b"content-length")
    if n is not None:
        size = int(n)
        return await reader.readexactly(size) if size else b""
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])
    return b""


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 422: b"Unprocessable Entity"}
JSON = b"application/json"
TEXT = b"text/plain; version=0.0.4"
App = Callable[[bytes, str, bytes], tuple[int, bytes, bytes]]


class _Server:
    """Keep-alive HTTP/1.1 server around a synchronous app; counts connections and requests
    per path (served at GET /_stats, which is not counted)."""

    def __init__(self, app: App, delay_s: float = 0.0) -> None:
        self.app = app
        self.delay_s = delay_s  # before answering /lookup (the "slow controller")
        self.connections = 0
        self.requests: Counter[str] = Counter()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                first, fields = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                method, target, _ = first.split(b" ", 2)
                body = await _read_body(reader, fields)
                path = target.split(b"?", 1)[0].decode()
                if path == "/_stats":
                    status, ctype, out = 200, JSON, json.dumps(
                        {"connections": self.connections, "requests": self.requests}).encode()
                else:
                    self.requests[path] += 1
                    if self.delay_s and path == "/lookup":
                        await asyncio.sleep(self.delay_s)
                    status, ctype, out = self.app(method, path, body)
                writer.write(b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n\r\n"
                             % (status, _REASONS.get(status, b"X"), ctype, len(out)) + out)
                if fields.get(b"connection", b"").lower() == b"close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass
        finally:
            writer.close()


def _prompt_text(data: dict) -> str:
    """The text a /tokenize body asks about: a completion prompt or the chat messages."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    texts = []
    for m in data.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if isinstance(p, dict)]
    if not texts:
        raise ValueError("no prompt")
    return "\n".join(texts)


_COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()
_CHAT = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()
_METRICS = b"".join(
    b'# TYPE %b gauge\n%b{model_name="m"} %b\n' % (name, name, value)
    for name, value in ((b"vllm:num_requests_running", b"0.0"),
                        (b"vllm:num_requests_waiting", b"0.0"),
                        (b"vllm:kv_cache_usage_perc", b"0.1")))


_SPACE_TO_COMMA = bytes.maketrans(b" ", b",")


def _word_id(word: str) -> str:
    if word[:1] == "w" and word[1:].isdigit() and word[1:].isascii():
        return str(int(word[1:]))
    return str(zlib.crc32(word.encode()) % VOCAB)


class Upstream:
    """The vLLM stand-in: fixed completions, /tokenize with one id per whitespace-separated
    word, /health and /metrics. A word `w<n>` (what the load generator sends) is id n, read
    with whole-string operations so a 16k-token prompt costs well under a millisecond; any
    other word is a stable hash (crc32) mod VOCAB."""

    def __init__(self) -> None:
        self.memo: dict[str, str] = {}  # word -> its id as text (the general path)

    def tokenize(self, text: str) -> tuple[int, bytes]:
        """(token count, the ids as comma-separated text)."""
        t = text.encode()
        if t[:1] == b"w" and t.count(b"w") == t.count(b" ") + 1 == t.count(b" w") + 1:
            ids = t.translate(_SPACE_TO_COMMA, b"w")  # one pass: "w12 w7" -> "12,7"
            if (not ids.translate(None, b"0123456789,") and b",," not in ids
                    and b",0" not in ids and ids[:1] not in (b",", b"0")
                    and ids[-1:] != b","):  # else: an empty word, or a leading zero
                return ids.count(b",") + 1, ids
        words = text.split()
        out = list(map(self.memo.get, words))
        if None in out:
            if len(self.memo) > 1_000_000:
                self.memo.clear()
            for i, s in enumerate(out):
                if s is None:
                    out[i] = self.memo[words[i]] = _word_id(words[i])
        return len(out), ",".join(out).encode()  # type: ignore[arg-type]

    def __call__(self, method: bytes, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        if method == b"POST" and path == "/v1/completions":
            return 200, JSON, _COMPLETION
        if method == b"POST" and path == "/v1/chat/completions":
            return 200, JSON, _CHAT
        if method == b"POST" and path == "/tokenize":
            try:
                n, ids = self.tokenize(_prompt_text(json.loads(body)))
            except (ValueError, AttributeError, TypeError):
                return 400, JSON, b'{"error":{"message":"bad request","code":400}}'
            return 200, JSON, b'{"count":%d,"max_model_len":%d,"tokens":[%b]}' % (
                n, MAX_MODEL_LEN, ids)
        if path == "/health":
            return 200, TEXT, b""
        if path == "/metrics":
            return 200, TEXT, _METRICS
        return 404, JSON, b'{"detail":"Not Found"}'


class Controller:
    """The LMCache 0.5.6 controller stand-in: /lookup names one endpoint id (by a hash of the
    prompt's first 256 tokens) holding every whole chunk of the prompt; /pin, /compress,
    /clear and /move answer that nothing was done; /evict does not exist (as in 0.5.x)."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = [i.encode() for i in ids]
        self.events = 0

    def __call__(self, method: bytes, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        if path == "/health":
            return 200, JSON, b"{}"
        if method == b"POST" and path == "/lookup":
            return self.lookup(body)
        if method == b"POST" and path in ("/pin", "/compress", "/clear", "/move"):
            self.events += 1
            return 200, JSON, b'{"event_id":"x%d","num_tokens":0}' % self.events
        return 404, JSON, b'{"detail":"Not Found"}'

    def lookup(self, body: bytes) -> tuple[int, bytes, bytes]:
        # No JSON parsing of a 16k-token list: count the commas, hash the first chunk's text.
        lo, hi = body.find(b"["), body.rfind(b"]")
        if lo < 0 or hi < lo:
            return 422, JSON, b'{"detail":"tokens missing"}'
        seg = body[lo + 1:hi].strip()
        n = seg.count(b",") + 1 if seg else 0
        self.events += 1
        matched = n // CHUNK * CHUNK
        layout = b"{}"
        if matched:
            head = b",".join(p.strip() for p in seg.split(b",", CHUNK)[:CHUNK])
            inst = self.ids[zlib.crc32(head) % len(self.ids)]
            layout = b'{"%b":["LocalCPUBackend",%d]}' % (inst, matched)
        return 200, JSON, b'{"event_id":"lookup-%d","layout_info":%b}' % (self.events, layout)


async def _serve(kind: str, ports: int, delay_ms: float, ids: Sequence[str]) -> None:
    app: App = Upstream() if kind == "upstream" else Controller(ids)
    server = _Server(app, delay_ms / 1000)
    servers = [await asyncio.start_server(server.handle, HOST, 0) for _ in range(ports)]
    print("PORTS", *[s.sockets[0].getsockname()[1] for s in servers], flush=True)
    # Serve until the parent closes our stdin (or dies): no orphan is left behind.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# --- the load generator ----------------------------------------------------------------------

def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(1, VOCAB)}" for _ in range(n))


class Prompts:
    """Request bodies for one cell. Warm: `N_WARM` fixed prompts in turn (the addon's token
    cache holds them after their first sight). Cold: every prompt new, `COLD_HEAD` random
    words before one of a few pre-built tails, so its key, its tokens and every chained
    chunk hash are new. `kind` is the body's form: completion, tokenize or lookup."""

    def __init__(self, size: int, warm: bool, seed: str, kind: str = "completion") -> None:
        self.rng = random.Random(seed)
        self.kind = kind
        self.i = 0
        n = size if warm else size - COLD_HEAD
        if kind == "lookup":
            self.bodies = [json.dumps({"tokens": [self.rng.randrange(VOCAB) for _ in range(size)]},
                                      separators=(",", ":")).encode() for _ in range(N_WARM)]
        else:
            self.tails = [_words(self.rng, n) for _ in range(N_WARM)]
            self.bodies = [self._wrap(t) for t in self.tails]
        self.warm = warm or kind == "lookup"

    def _wrap(self, text: str) -> bytes:
        end = b'","max_tokens":1}' if self.kind == "completion" else b'"}'
        return b'{"model":"m","prompt":"' + text.encode() + end

    def next(self) -> bytes:
        self.i += 1
        if self.warm:
            return self.bodies[self.i % len(self.bodies)]
        tail = self.tails[self.i % len(self.tails)]
        return self._wrap(_words(self.rng, COLD_HEAD) + " " + tail)


@dataclass
class _Run:
    stop: bool = False
    errors: int = 0
    # (start, end, status, x-kvcache-route or None) per completed request
    done: list[tuple[float, float, int, bytes | None]] = field(default_factory=list)


async def _client(port: int, path: str, prompts: Prompts, run: _Run) -> None:
    """One simulated client: one keep-alive connection, one request at a time."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    start = b"POST %b HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json\r\n" % (
        path.encode(), HOST.encode(), port)
    while not run.stop:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                run.errors += 1
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        body = prompts.next()
        t0 = time.perf_counter()
        try:
            writer.write(start + b"content-length: %d\r\n\r\n" % len(body) + body)
            first, fields = _parse_head(await reader.readuntil(b"\r\n\r\n"))
            await _read_body(reader, fields)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            run.errors += 1
            writer.close()
            writer = None
            continue
        t1 = time.perf_counter()
        run.done.append((t0, t1, int(first.split(b" ", 2)[1]), fields.get(b"x-kvcache-route")))
        if fields.get(b"connection", b"").lower() == b"close":
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


class _Stats:
    """A stand-in's /_stats over one persistent connection (so asking opens none)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self) -> dict:
        if self.conn is None:
            self.conn = await asyncio.open_connection(HOST, self.port)
        reader, writer = self.conn
        writer.write(b"GET /_stats HTTP/1.1\r\nhost: x\r\n\r\n")
        _, fields = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        return json.loads(await _read_body(reader, fields))

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()


# --- classifying the addon's decisions --------------------------------------------------------

def classify(header: str | bytes | None) -> tuple[bool, str]:
    """(routed with a controller answer, label) for one `x-kvcache-route` header.

    Answered: reason cache-hit or cache-spill, or why no-match / unknown-instance (the
    controller answered but held nothing usable). Not answered: every other why
    (lookup-timeout, controller-slow, controller-breaker-open, proxy-saturated, ...), a
    local-hit (the proxy's own view, used when the controller could not answer), no header.
    The label is `reason` or `reason/why`."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header:
        return False, "(no header)"
    info = route_info(header)
    reason, why = info.get("reason", ""), info.get("why", "")
    answered = reason in ANSWERED_REASONS or why in ANSWERED_WHYS
    label = f"{reason}/{why}" if why else reason
    if info.get("answer"):  # should the header ever say where the answer came from
        label += f" [{info['answer']}]"
    return answered, label


def _route_ms(header: bytes) -> float | None:
    try:
        return float(route_info(header.decode("latin-1")).get("route_ms", ""))
    except ValueError:
        return None


# --- configurations --------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    name: str
    proxy: str | None  # which mitmdump (see PROXIES); None: straight to the upstream
    size: int  # prompt tokens
    warm: bool = True


ROWS = (
    Row("direct 1k", None, 1024),
    Row("bare 1k", "bare", 1024),
    Row("addon off 1k", "off", 1024),
    Row("addon on 1k warm", "on-1k-warm", 1024),
    Row("addon on 1k cold", "on-1k-cold", 1024, warm=False),
    Row("addon on 1k warm, 50 ms controller", "on-1k-slow", 1024),
    Row("addon on 1k warm, every lookup fresh", "on-1k-fresh", 1024),
    Row("direct 16k", None, 16384),
    Row("bare 16k", "bare", 16384),
    Row("addon off 16k", "off", 16384),
    Row("addon on 16k warm", "on-16k-warm", 16384),
    Row("addon on 16k cold", "on-16k-cold", 16384, warm=False),
)
BASE = {1024: "bare 1k", 16384: "bare 16k"}
FAST_ON = ("addon on 1k warm", "addon on 1k cold", "addon on 16k warm", "addon on 16k cold")
SLOW, SLOW_REF = "addon on 1k warm, 50 ms controller", "addon on 1k warm"
# mitmdump processes: name -> (addon config extras, or None for no addon; slow controller)
PROXIES: dict[str, tuple[dict | None, bool]] = {
    "bare": (None, False),
    "off": ({"enabled": False}, False),
    "on-1k-warm": ({}, False),
    "on-1k-cold": ({}, False),
    "on-16k-warm": ({}, False),
    "on-16k-cold": ({}, False),
    "on-1k-slow": ({}, True),
    # No reuse of recent answers: every request asks the controller, saturated or not.
    "on-1k-fresh": ({"lookup_reuse_ttl": "0s"}, False),
}


@dataclass(frozen=True)
class Probe:
    """A stand-in measured directly, and the rows whose proxy it must outpace."""

    name: str
    target: str  # "upstream" or "controller"
    path: str
    size: int
    serves: tuple[str, ...]


PROBES = (
    Probe("upstream /tokenize 1k", "upstream", "/tokenize", 1024,
          ("addon on 1k warm", "addon on 1k cold")),
    Probe("upstream /tokenize 16k", "upstream", "/tokenize", 16384,
          ("addon on 16k warm", "addon on 16k cold")),
    Probe("controller /lookup 1k", "controller", "/lookup", 1024,
          ("addon on 1k warm", "addon on 1k cold", "addon on 1k warm, every lookup fresh")),
    Probe("controller /lookup 16k", "controller", "/lookup", 16384,
          ("addon on 16k warm", "addon on 16k cold")),
)
# The direct rows are the upstream's completions measured directly.
FRESH = "addon on 1k warm, every lookup fresh"
DIRECT_SERVES = {"direct 1k": ("bare 1k", "addon off 1k", *FAST_ON[:2], SLOW, FRESH),
                 "direct 16k": ("bare 16k", "addon off 16k", *FAST_ON[2:])}


@dataclass
class Measure:
    n: int  # successful requests completed in the window
    rps: float
    p50: float  # ms, requests started and finished in the window
    p99: float
    errors: int
    proxy_cpu_ms: float | None  # mitmdump user+system CPU per request
    standin_cpu_ms: float  # the upstream's and both controllers' CPU per request
    gen_cpu_ms: float  # this process (the load generator) per request
    others: float  # share of the machine's CPU used by processes not in the benchmark
    labels: Counter[str]
    answered: int
    route_ms: float | None  # median of the header's route_ms
    per_req: dict[str, float]  # stand-in counters per request


def _pct(sorted_ms: Sequence[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    k = (len(sorted_ms) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


@dataclass
class Env:
    upstream_ports: list[int]
    controller_port: int
    slow_port: int
    proxy_ports: dict[str, int]
    procs: dict[str, psutil.Process]  # "upstream", "controller", "slow", and every proxy
    stats: dict[str, _Stats] = field(default_factory=dict)

    def cpu(self, name: str) -> float:
        t = self.procs[name].cpu_times()
        return t.user + t.system

    async def snapshot(self, proxy: str | None) -> dict:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        out: dict = {"gen": time.process_time(),
                     "standins": sum(self.cpu(n) for n in ("upstream", "controller", "slow")),
                     "busy": busy, "t": time.perf_counter()}
        out["ours"] = sum(self.cpu(n) for n in self.procs) + out["gen"]
        if proxy is not None:
            out["proxy"] = self.cpu(proxy)
        for name, st in self.stats.items():
            out[name] = await st.get()
        return out


def _counter_deltas(a: dict, b: dict) -> dict[str, float]:
    up0, up1 = a["upstream"], b["upstream"]
    out = {"upstream conns": up1["connections"] - up0["connections"]}
    for what, src in (("/tokenize", ("upstream",)), ("/v1/completions", ("upstream",)),
                      ("/lookup", ("controller", "slow")), ("/pin", ("controller", "slow"))):
        out[what] = sum(b[s]["requests"].get(what, 0) - a[s]["requests"].get(what, 0)
                        for s in src)
    return out


async def _cell(env: Env, port: int, path: str, prompts: Prompts, clients: int,
                warmup: float, seconds: float, proxy: str | None) -> Measure:
    run = _Run()
    tasks = [asyncio.create_task(_client(port, path, prompts, run)) for _ in range(clients)]
    await asyncio.sleep(warmup)
    s0 = await env.snapshot(proxy)
    w0 = time.perf_counter()
    await asyncio.sleep(seconds)
    w1 = time.perf_counter()
    s1 = await env.snapshot(proxy)
    run.stop = True
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    window = [d for d in run.done if w0 <= d[1] <= w1]
    ok = [d for d in window if d[2] < 400]
    errors = run.errors + len(window) - len(ok)
    n = max(len(ok), 1)
    lat = sorted((d[1] - d[0]) * 1000 for d in ok if d[0] >= w0)
    labels: Counter[str] = Counter()
    answered = 0
    route_ms = []
    for d in ok:
        if d[3] is None:
            continue
        yes, label = classify(d[3])
        answered += yes
        labels[label] += 1
        ms = _route_ms(d[3])
        if ms is not None:
            route_ms.append(ms)
    deltas = _counter_deltas(s0, s1)
    return Measure(
        n=len(ok), rps=len(ok) / (w1 - w0), p50=_pct(lat, 0.5), p99=_pct(lat, 0.99),
        errors=errors,
        proxy_cpu_ms=(s1["proxy"] - s0["proxy"]) * 1000 / n if proxy is not None else None,
        standin_cpu_ms=(s1["standins"] - s0["standins"]) * 1000 / n,
        gen_cpu_ms=(s1["gen"] - s0["gen"]) * 1000 / n,
        others=max(0.0, (s1["busy"] - s0["busy"]) - (s1["ours"] - s0["ours"]))
        / ((s1["t"] - s0["t"]) * (os.cpu_count() or 1)),
        labels=labels, answered=answered,
        route_ms=statistics.median(route_ms) if route_ms else None,
        per_req={k: v / n for k, v in deltas.items()},
    )


Results = dict[tuple[str, int], list[Measure]]


async def _bench(env: Env, rounds: int, seconds: float, warmup: float, clients: int,
                 log: Callable[[str], None]) -> tuple[Results, dict[str, list[float]]]:
    env.stats = {"upstream": _Stats(env.upstream_ports[0]),
                 "controller": _Stats(env.controller_port), "slow": _Stats(env.slow_port)}
    results: Results = {}
    probes: dict[str, list[float]] = {p.name: [] for p in PROBES}
    cells: list[Row | Probe] = [*ROWS, *PROBES]
    try:
        for r in range(rounds):
            order = cells[r % len(cells):] + cells[:r % len(cells)]
            for cell in order:
                if isinstance(cell, Probe):
                    port = (env.upstream_ports[0] if cell.target == "upstream"
                            else env.controller_port)
                    kind = "tokenize" if cell.path == "/tokenize" else "lookup"
                    prompts = Prompts(cell.size, True, f"{cell.name}-{r}", kind)
                    m = await _cell(env, port, cell.path, prompts, clients, warmup, seconds,
                                    None)
                    probes[cell.name].append(m.rps)
                    log(f"round {r + 1}/{rounds} {cell.name} @{clients}: {m.rps:,.0f} req/s")
                    continue
                port = (env.upstream_ports[0] if cell.proxy is None
                        else env.proxy_ports[cell.proxy])
                for c in (1, clients):
                    # Warm prompts are the same in every round and configuration; cold ones
                    # are new in every cell.
                    seed = f"warm-{cell.size}" if cell.warm else f"cold-{cell.name}-{r}-{c}"
                    prompts = Prompts(cell.size, cell.warm, seed)
                    m = await _cell(env, port, "/v1/completions", prompts, c, warmup, seconds,
                                    cell.proxy)
                    results.setdefault((cell.name, c), []).append(m)
                    log(f"round {r + 1}/{rounds} {cell.name} @{c}: {m.rps:,.0f} req/s, "
                        f"p50 {m.p50:.2f} ms, answered {m.answered}/{m.n}, "
                        f"errors {m.errors}")
                    if cell.proxy is not None and env.procs[cell.proxy].status() == "zombie":
                        raise RuntimeError(f"mitmdump {cell.proxy} died")
    finally:
        for st in env.stats.values():
            st.close()
    return results, probes


# --- processes -------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    stop_process(proc, 10)


def _standin(stack: ExitStack, kind: str, *args: str) -> tuple[psutil.Process, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.proxy", "--serve", kind, *args], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stack.callback(_stop, proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORTS"):
        raise RuntimeError(f"the {kind} stand-in did not start")
    return psutil.Process(proc.pid), [int(p) for p in line.split()[1:]]


_LISTEN = re.compile(r"listening at (?:http://)?([\d.]+):(\d+)")


def snapshot_addon(tmp: Path) -> tuple[Path, str]:
    """A copy of addon/ to run (edits made while the benchmark runs neither reach it nor make
    mitmproxy hot-reload it), and a hash of its sources."""
    dst = tmp / "snapshot" / "addon"
    shutil.copytree(ROOT / "addon", dst, ignore=shutil.ignore_patterns("__pycache__"))
    h = hashlib.sha256()
    for f in sorted(dst.rglob("*.py")):
        h.update(f.relative_to(dst).as_posix().encode() + b"\0" + f.read_bytes())
    return dst / "kvcache.py", h.hexdigest()[:12]


def _proxy_command(name: str, tmp: Path, engines: dict[str, str], controller: str,
                   extra: dict | None, script: Path) -> list[str]:
    """sim.proxy's command line (the addon, reverse mode, lazy upstream connections) with
    `script` as the addon, or without one for bare mitmdump; flow lines off
    (`flow_detail=0`) for every configuration."""
    cfg = write_config(tmp / f"{name}.yaml", engines, controller, **(extra or {}))
    cmd = command(cfg, tmp / "mitmconf")
    i = cmd.index("-s")
    cmd[i + 1] = str(script)
    if extra is None:
        del cmd[i:i + 2]
        j = cmd.index(f"kvcache_config={cfg}")
        del cmd[j - 1:j + 1]
    return [*cmd, "--set", "flow_detail=0"]


def _start_proxy(stack: ExitStack, name: str, cmd: list[str], tmp: Path) -> subprocess.Popen:
    log = tmp / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=tmp,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    stack.callback(_stop, proc)
    return proc


def _wait_listening(name: str, proc: subprocess.Popen, tmp: Path, timeout: float) -> int:
    log = tmp / f"{name}.log"
    end = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        m = _LISTEN.search(text)
        if m:
            return int(m.group(2))
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"mitmdump {name} did not start:\n{text[-3000:]}")
        time.sleep(0.05)


def start(stack: ExitStack, tmp: Path, slow_ms: float, script: Path) -> Env:
    """The stand-ins and every mitmdump; all stopped when `stack` closes."""
    up_proc, up_ports = _standin(stack, "upstream", "--ports", str(len(ENDPOINT_IDS)))
    ids = ",".join(ENDPOINT_IDS)
    ctl_proc, (ctl_port,) = _standin(stack, "controller", "--ids", ids)
    slow_proc, (slow_port,) = _standin(stack, "controller", "--ids", ids,
                                       "--delay-ms", str(slow_ms))
    engines = {eid: f"http://{HOST}:{p}" for eid, p in zip(ENDPOINT_IDS, up_ports, strict=True)}
    procs = {"upstream": up_proc, "controller": ctl_proc, "slow": slow_proc}
    started: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    # The first creates mitmproxy's CA in the shared confdir; the rest start together.
    for group in (["bare"], [n for n in PROXIES if n != "bare"]):
        for name in group:
            extra, slow = PROXIES[name]
            ctl = f"http://{HOST}:{slow_port if slow else ctl_port}"
            started[name] = _start_proxy(
                stack, name, _proxy_command(name, tmp, engines, ctl, extra, script), tmp)
        for name in group:
            ports[name] = _wait_listening(name, started[name], tmp, 60)
            procs[name] = psutil.Process(started[name].pid)
    return Env(up_ports, ctl_port, slow_port, ports, procs)


# --- the report ------------------------------------------------------------------------------

@dataclass
class Summary:
    p50: float
    added_p50: float
    p99: float
    rps: float
    ratio: float
    cpu_ms: float | None
    cpu_ms_1: float | None
    share: float | None  # answered by the controller @16 (pooled), None without the addon
    share_1: float | None
    labels: Counter[str]
    labels_1: Counter[str]
    route_ms_1: float | None
    route_ms_16: float | None
    per_req: dict[str, float]
    standin_cpu_ms: float
    gen_cpu_ms: float
    errors: int
    n1: int
    n16: int
    added_rounds: list[float]
    ratio_rounds: list[float]


def _med(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def summarize(results: Results, clients: int) -> dict[str, Summary]:
    out = {}
    for row in ROWS:
        one, many = results[(row.name, 1)], results[(row.name, clients)]
        b1, b16 = results[(BASE[row.size], 1)], results[(BASE[row.size], clients)]
        added = [m.p50 - b.p50 for m, b in zip(one, b1, strict=True)]
        ratios = [m.rps / b.rps for m, b in zip(many, b16, strict=True)]
        has_addon = row.proxy not in (None, "bare")
        labels: Counter[str] = sum((m.labels for m in many), Counter())
        share = sum(m.answered for m in many) / max(sum(m.n for m in many), 1)
        share_1 = sum(m.answered for m in one) / max(sum(m.n for m in one), 1)
        out[row.name] = Summary(
            p50=statistics.median(m.p50 for m in one), added_p50=statistics.median(added),
            p99=statistics.median(m.p99 for m in one), rps=statistics.median(m.rps for m in many),
            ratio=statistics.median(ratios), cpu_ms=_med([m.proxy_cpu_ms for m in many]),
            cpu_ms_1=_med([m.proxy_cpu_ms for m in one]),
            share=share if has_addon else None, share_1=share_1 if has_addon else None,
            labels=labels, labels_1=sum((m.labels for m in one), Counter()),
            route_ms_1=_med([m.route_ms for m in one]),
            route_ms_16=_med([m.route_ms for m in many]),
            per_req={k: statistics.median(m.per_req[k] for m in many) for k in many[0].per_req},
            standin_cpu_ms=statistics.median(m.standin_cpu_ms for m in many),
            gen_cpu_ms=statistics.median(m.gen_cpu_ms for m in many),
            errors=sum(m.errors for m in one + many), n1=sum(m.n for m in one),
            n16=sum(m.n for m in many), added_rounds=added, ratio_rounds=ratios,
        )
    return out


@dataclass(frozen=True)
class Check:
    what: str
    measured: str
    target: str
    ok: bool


def goals(s: dict[str, Summary], results: Results, clients: int) -> list[Check]:
    """The issue's goals, computed from the run."""
    w = s["addon on 1k warm"]
    out = [
        Check("addon on, 1k warm: added p50 over bare mitmdump, 1 client",
              f"{w.added_p50:+.2f} ms", "<= 1.5 ms", w.added_p50 <= 1.5),
        Check(f"addon on, 1k warm: req/s vs bare mitmdump, {clients} clients",
              f"{w.ratio:.2f}x", ">= 0.8x", w.ratio >= 0.8),
    ]
    f = s[FRESH]
    out.append(Check(f"1k warm with every lookup fresh (no answer reuse): added p50 @1 / req/s "
                     f"vs bare @{clients}", f"{f.added_p50:+.2f} ms / {f.ratio:.2f}x",
                     "<= 1.5 ms / >= 0.8x", f.added_p50 <= 1.5 and f.ratio >= 0.8))
    for name in ("addon on 16k warm", "addon on 16k cold"):
        out.append(Check(f"{name[9:]}: req/s vs bare mitmdump (16k), {clients} clients",
                         f"{s[name].ratio:.2f}x", ">= 0.5x", s[name].ratio >= 0.5))
    for name in FAST_ON:
        share = s[name].share or 0.0
        out.append(Check(f"{name[9:]}: routed with a controller answer, {clients} clients, "
                         "50 ms budget", f"{share:.1%}", ">= 95%", share >= 0.95))
    slow = [a.rps / b.rps for a, b in zip(results[(SLOW, clients)], results[(SLOW_REF, clients)],
                                          strict=True)]
    r = statistics.median(slow)
    share = s[SLOW].share or 0.0
    out.append(Check(f"50 ms controller: req/s vs the fast controller (1k warm), {clients} "
                     f"clients (routed by it: {share:.0%})", f"{r:.2f}x", ">= 0.9x", r >= 0.9))
    return out


def standin_checks(s: dict[str, Summary], probes: dict[str, list[float]]) -> list[Check]:
    out = []
    for name, serves in DIRECT_SERVES.items():
        need = STANDIN_MARGIN * max(s[n].rps for n in serves)
        out.append(Check(f"upstream completions ({name})", f"{s[name].rps:,.0f} req/s",
                         f">= {need:,.0f} req/s", s[name].rps >= need))
    for p in PROBES:
        rps = statistics.median(probes[p.name])
        # The calls the proxy makes to it: its req/s times calls per request (a warm prompt's
        # tokens are cached, so it calls /tokenize for none of them).
        need = STANDIN_MARGIN * max(s[n].rps * s[n].per_req.get(p.path, 1.0) for n in p.serves)
        out.append(Check(p.name, f"{rps:,.0f} req/s", f">= {need:,.0f} req/s", rps >= need))
    return out


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None or x != x else fmt.format(x)


def _machine() -> list[str]:
    import mitmproxy.version

    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [f"{os.cpu_count()} CPUs ({model})", f"Python {platform.python_version()}",
            f"mitmproxy {mitmproxy.version.VERSION}", f"psutil {psutil.__version__}"]


def _git() -> str:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "addon")
    n = len(dirty.splitlines())
    return f"commit `{head}`" + (f", with uncommitted changes in {n} file(s) under addon/"
                                 if n else ", addon/ clean")


def build(cmd: str, s: dict[str, Summary], results: Results, probes: dict[str, list[float]],
          meta: dict) -> list[str]:
    c = meta["clients"]
    lines = [
        "# Proxy overhead: bare mitmdump, the addon off, the addon on",
        "",
        f"Command: `{cmd}`",
        "",
        __doc__.split("\n", 2)[2].strip().replace("``", "`"),
        "",
        "## Setup",
        "",
        f"- Machine: {', '.join(meta['machine'])}; load average "
        f"{meta['load0']} at the start, {meta['load1']} at the end (shared machine: other "
        "processes' CPU per round is under \"Per round\"). "
        f"Addon: {meta['git']}.",
        f"- {meta['rounds']} rounds; every cell {meta['seconds']:g} s measured after "
        f"{meta['warmup']:g} s of warm-up (not measured); at 1 and {c} clients. Medians over "
        "rounds; \"added\" and \"vs bare\" are per-round differences and ratios against bare "
        "mitmdump with the same prompt size in the same round, then their median.",
        f"- Upstream: one process serving {len(ENDPOINT_IDS)} ports = endpoints "
        f"{', '.join(ENDPOINT_IDS)} (a fixed completion; `/tokenize`: one token per word). "
        "Controller: one process (LMCache 0.5.6 `/lookup` shape: one endpoint, chosen by a hash "
        "of the prompt's first 256 tokens, holds every whole 256-token chunk); the \"50 ms "
        f"controller\" is a second one that awaits {meta['slow_ms']:g} ms before each `/lookup` "
        "answer. Addon config: those endpoints and that controller, every other key at its "
        "default (`lookup_routing_timeout` 50 ms, `tokenize_on_request_path: true`, "
        "least_inflight fallback). Every mitmdump: sim/proxy.py's command line "
        "(`--mode reverse:<vllm-0> --set connection_strategy=lazy`, `-s addon/kvcache.py` except "
        "bare) plus `--set flow_detail=0` (no per-flow output).",
        f"- Prompts: 1k = 1,024 tokens, 16k = 16,384 (words), completions with "
        f"`max_tokens: 1`. Warm: {N_WARM} fixed prompts in turn (the token cache has them after "
        f"the first sight, in the warm-up). Cold: every request a new prompt ({COLD_HEAD} fresh "
        "words ahead of the rest: new key, new tokens, new chunk hashes), so the addon "
        "tokenizes it on the request path. direct / bare / addon off send the warm prompts.",
        "- Routed with a controller answer: `x-kvcache-route` reason cache-hit or cache-spill, "
        "or why no-match / unknown-instance (the controller answered, with nothing usable). "
        "Anything else (lookup-timeout, controller-slow, proxy-saturated, a local-hit from the "
        "proxy's own view, ...) is not. The header does not tell a fresh answer from one the "
        "addon reused (it reuses an answer for the same prefix under a second old while its "
        "event loop is a budget behind, as `reason=cache-hit`): `/lookup/req` under \"Where "
        "the time goes\" says how many requests really asked the controller.",
        "",
        "## Results",
        "",
        f"| configuration | p50 @1 (ms) | added p50 vs bare @1 (ms) | p99 @1 (ms) | req/s @{c} "
        f"| vs bare @{c} | mitmdump CPU ms/request @{c} | routed by controller @{c} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        x = s[row.name]
        lines.append(
            f"| {row.name} | {x.p50:.2f} | {x.added_p50:+.2f} | {x.p99:.2f} | {x.rps:,.0f} | "
            f"{x.ratio:.2f}x | {_f(x.cpu_ms)} | {_f(x.share, '{:.1%}')} |")
    lines += [
        "",
        "## What the addon decided (pooled over rounds)",
        "",
        "`reason` or `reason/why` from `x-kvcache-route`, share of the successful requests.",
        "",
        f"| configuration | routed by controller @1 | decisions @1 | decisions @{c} |",
        "|---|---|---|---|",
    ]

    def parts(labels: Counter[str]) -> str:
        total = max(sum(labels.values()), 1)
        return ", ".join(f"{k} {v / total:.1%}" for k, v in labels.most_common()) or "—"

    for row in ROWS:
        if row.proxy in (None, "bare"):
            continue
        x = s[row.name]
        lines.append(f"| {row.name} | {_f(x.share_1, '{:.1%}')} | {parts(x.labels_1)} | "
                     f"{parts(x.labels)} |")
    lines += [
        "",
        "## Where the time goes",
        "",
        "`route ms`: the addon's own time in its request hook (the header's `route_ms`, "
        "median). Per request, from the stand-ins' counters: upstream TCP connections opened "
        "(a client connection's requests routed to another endpoint need a connection to it; "
        "near 0 means they are reused), `/tokenize` calls (request path and background), "
        "controller `/lookup` and `/pin` calls. CPU ms per request: "
        "mitmdump at 1 client, the stand-ins and the load generator (this process).",
        "",
        f"| configuration | route ms @1 | route ms @{c} | mitmdump CPU ms/req @1 | "
        f"upstream conns/req @{c} | /tokenize/req | /lookup/req | /pin/req | stand-ins CPU "
        f"ms/req | load gen CPU ms/req | requests @1 / @{c} | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        x = s[row.name]
        p = x.per_req
        lines.append(
            f"| {row.name} | {_f(x.route_ms_1)} | {_f(x.route_ms_16)} | {_f(x.cpu_ms_1)} | "
            f"{p['upstream conns']:.2f} | {p['/tokenize']:.2f} | {p['/lookup']:.2f} | "
            f"{p['/pin']:.3f} | {x.standin_cpu_ms:.2f} | {x.gen_cpu_ms:.2f} | "
            f"{x.n1:,} / {x.n16:,} | {x.errors} |")
    lines += [
        "",
        f"## Stand-ins measured directly ({c} clients)",
        "",
        f"Each must do at least {STANDIN_MARGIN:g}x the calls per second the fastest "
        "configuration it serves makes to it (completions: every proxied configuration of that "
        "prompt size; `/tokenize` and `/lookup`: the addon-on configurations of that size, "
        "req/s times that path's calls per request), or no report is written. These are lower "
        "bounds: the load generator shares the machine.",
        "",
        "| stand-in | req/s | needed | ok |",
        "|---|---|---|---|",
    ]
    for chk in meta["standins"]:
        lines.append(f"| {chk.what} | {chk.measured} | {chk.target} | "
                     f"{'yes' if chk.ok else '**no**'} |")
    lines += [
        "",
        "## Per round",
        "",
        f"Added p50 @1 (ms) and req/s vs bare @{c}, round by round (the medians above come from "
        "these).",
        "",
        "| configuration | added p50 @1 | vs bare @" + str(c) + " |",
        "|---|---|---|",
    ]
    for row in ROWS:
        x = s[row.name]
        lines.append(f"| {row.name} | {' '.join(f'{v:+.2f}' for v in x.added_rounds)} | "
                     f"{' '.join(f'{v:.2f}' for v in x.ratio_rounds)} |")
    noise = meta["noise"]
    lines += [
        "",
        "CPU used by processes outside the benchmark during the measured windows, as a share of "
        "the whole machine, per round (median / max over the round's cells): "
        + ", ".join(f"{med:.0%} / {mx:.0%}" for med, mx in noise) + ".",
        "",
        f"**Wall time: {meta['wall_s'] / 60:.1f} min.**",
        "",
        "## Goals",
        "",
        "| goal | measured | target | result |",
        "|---|---|---|---|",
    ]
    for chk in goals(s, results, c):
        lines.append(f"| {chk.what} | {chk.measured} | {chk.target} | "
                     f"{'PASS' if chk.ok else '**FAIL**'} |")
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="measured seconds per cell (default 2)")
    ap.add_argument("--warmup", type=float, default=0.5,
                    help="unmeasured seconds before each cell (default 0.5)")
    ap.add_argument("--clients", type=int, default=16, help="the high concurrency (default 16)")
    ap.add_argument("--slow-ms", type=float, default=50.0,
                    help="the slow controller's delay before each /lookup answer (default 50)")
    ap.add_argument("--quick", action="store_true",
                    help="a few seconds in all (1 round, short cells); never refuses")
    ap.add_argument("--out", type=Path, default=Path("docs"),
                    help=f"directory for {REPORT} (default docs)")
    # Internal: run a stand-in (started by the benchmark itself).
    ap.add_argument("--serve", choices=("upstream", "controller"), help=argparse.SUPPRESS)
    ap.add_argument("--ports", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ids", default=",".join(ENDPOINT_IDS), help=argparse.SUPPRESS)
    ap.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.ports, args.delay_ms, args.ids.split(",")))
        return 0

    from bench.report import publish

    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 0.4, 0.15
    cmd = "python -m bench.proxy" + (" " + shlex.join(argv) if argv else "")
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        script, digest = snapshot_addon(tmp)
        env = start(stack, tmp, args.slow_ms, script)
        log(f"started: upstream {env.upstream_ports}, controller {env.controller_port}, "
            f"slow controller {env.slow_port}, mitmdump {env.proxy_ports}")
        results, probes = asyncio.run(
            _bench(env, args.rounds, args.seconds, args.warmup, args.clients, log))
    wall = time.perf_counter() - t0
    s = summarize(results, args.clients)
    checks = standin_checks(s, probes)
    meta = {
        "clients": args.clients, "rounds": args.rounds, "seconds": args.seconds,
        "warmup": args.warmup, "slow_ms": args.slow_ms, "machine": _machine(),
        "load0": load0, "load1": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git": f"{_git()}; run from a copy of addon/ taken at the start (sources hash "
               f"`{digest}`)", "wall_s": wall, "standins": checks,
    }
    noise = []
    for r in range(args.rounds):
        vals = [ms[r].others for ms in results.values()]
        noise.append((statistics.median(vals), max(vals)))
    meta["noise"] = noise
    failed = [c for c in checks if not c.ok]
    if failed and not args.quick:
        print("refusing to write the report: the stand-ins are not fast enough to measure the "
              f"proxy (each must do {STANDIN_MARGIN:g}x its req/s):", file=sys.stderr)
        for c in failed:
            print(f"  {c.what}: {c.measured}, needed {c.target}", file=sys.stderr)
        return 2
    publish(build(cmd, s, results, probes, meta), args.out, REPORT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
