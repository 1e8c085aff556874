"""``python -m bench.soak``: a soak of the real proxy (mitmdump + the addon) under faults.

    .venv/bin/python -m bench.soak                        # 20,000 requests, 64 clients
    .venv/bin/python -m bench.soak --controller-outage    # + controller down from 40% to 70%
    .venv/bin/python -m bench.soak --quick                # 1,500 requests, 32 clients (the CI test)

Three simulated engines (``sim.engine_server``, each its own process, answering with the
SHA-256 of the body they received) behind a real ``mitmdump`` with the addon, and an LMCache
controller that flaps (``bench.fault_controller``: ok, 500s, 3 s hangs, garbage bodies, a
dozen wrong JSON shapes, instance ids that are hosts, killed), on a schedule that is a
function of the fraction of requests issued (reproducible). Closed-loop clients (raw asyncio
HTTP/1.1, one process) send multi-turn chats and completions over shared prefixes of more
than 256 tokens; 3% hang up ~50 ms after sending; ~1% are hostile shapes (100,000 ``[``,
lone surrogates escaped and raw, broken JSON, non-JSON content types, empty bodies, 2 MB
prompts, gzip bodies and a gzip bomb, GETs, odd headers, chunked bodies, ...). One engine
is SIGKILLed at 30% of the requests and restarted on the same port at 50%. After the
requests, a quiet phase measures how long small requests wait while a hostile one (gzip
bomb, 20 MB prompt, ...) is in flight.

Prints (and writes to ``--out``) the figures and PASS/FAIL for each criterion, all computed
from the run: 0 unanswered, 0 bodies altered, RSS at 100% within 1.2x of RSS at 10%, the
route header on every answered response naming a configured endpoint, no false mark-down,
fewer than 150 502s for the killed engine, no traceback, no request delayed > 50 ms by a
hostile one, no connection to a host named by the controller, and with
``--controller-outage`` cache hits back within ``recovery_timeout`` + 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import html
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil

from sim.cluster import run_module, wait_registered
from sim.proxy import ADDON, Proxy, mitmdump, route_info, write_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim-model"
MARK_DOWN = re.compile(r"\[kvcache\] endpoint (\S+) (refused a connection|ejected|marked down)")
CONTROLLER_CYCLE = ("ok", "error", "ok", "hang", "ok", "garbage", "ok", "shapes", "ok", "hosts",
                    "ok", "killed")
HOSTILE_KINDS = (
    "brackets-100k", "surrogate-escaped", "surrogate-raw", "broken-json", "text-plain",
    "form-urlencoded", "empty-body", "prompt-2MB", "gzip-body", "gzip-bomb", "get-models",
    "get-health", "odd-headers", "chunked-body", "wrong-types", "token-ids-50k",
    "unknown-path", "query-junk",
)
# The quiet phase's hostile requests: cheap for the engines (the long prompts are one long
# word: the engines' tokenizer costs nothing), so what delays the probes is the proxy.
STALL_KINDS = ("gzip-bomb", "prompt-20MB", "prompt-2MB-1word", "brackets-100k")
MAX_502_KILLED = 150
MAX_STALL_MS = 50.0
RSS_RATIO = 1.2


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 20_000
    clients: int = 64
    seed: int = 0
    time_limit: float = 1800.0  # seconds for the request phase, whichever comes first
    time_scale: float = 0.02
    hangup_rate: float = 0.03
    hangup_after: float = 0.05
    hostile_rate: float = 0.01
    segments: int = 48  # controller mode changes over the run
    kill_engine: str = "vllm-instance-2"
    kill_at: float = 0.30
    restart_at: float = 0.50
    controller_outage: bool = False  # controller killed from 40% to 70%
    recovery_timeout: float = 10.0  # the addon's circuit_breaker.recovery_timeout, seconds
    stall_rounds: int = 2
    request_timeout: float = 60.0
    addon: Path = ADDON
    addon_label: str = ""  # how the report names the addon (default: its path)


QUICK = dict(requests=1500, clients=32, hostile_rate=0.02, segments=24,
             recovery_timeout=2.0, stall_rounds=1)


# -- the workload --------------------------------------------------------------------------

_WORDS = ("policy clause tenant invoice ledger shipment contract region account audit "
          "server cluster vector index shard replica quorum lease token budget window "
          "latency record column schema cursor backlog deploy rollout canary signal").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(f"{rng.choice(_WORDS)}{rng.randrange(100)}" for _ in range(words))


@dataclass
class Req:
    method: str
    path: str
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunked: bool = False
    kind: str = "chat"

    def raw(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"host: " + host.encode()]
        lines += [k + b": " + v for k, v in self.headers]
        if self.chunked:
            lines.append(b"transfer-encoding: chunked")
            step = max(1, len(self.body) // 3)
            parts = [self.body[i:i + step] for i in range(0, len(self.body), step)]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            if self.body or self.method == "POST":
                lines.append(b"content-length: %d" % len(self.body))
            payload = self.body
        return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def _json_req(path: str, body: Any, kind: str, ctype: bytes = b"application/json") -> Req:
    return Req("POST", path, json.dumps(body).encode(), [(b"content-type", ctype)], kind=kind)


class Workload:
    """Shared prefixes (system prompts and documents of 400-700 words, i.e. more tokens than
    the controller's 256-token chunk), chats per client, and the hostile shapes."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.systems = [_text(rng, rng.randint(400, 700)) for _ in range(6)]
        self.docs = [_text(rng, rng.randint(400, 700)) for _ in range(6)]
        self.seed = seed
        self._big: dict[str, bytes] = {}
        self._turn = 0

    def normal(self, rng: random.Random, chat: Chat) -> Req:
        x = rng.random()
        stream = rng.random() < 0.1
        max_tokens = rng.randint(2, 8)
        if x < 0.55:
            body = chat.next_body(rng, self, stream, max_tokens)
            return _json_req("/v1/chat/completions", body, "chat")
        if x < 0.85:
            doc = rng.randrange(len(self.docs))
            prompt = f"{self.docs[doc]}\nQuestion {rng.randrange(10_000)}: what about item " \
                     f"{rng.randrange(1000)}?"
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
            return _json_req("/v1/completions", body, "completion")
        body = {"model": MODEL, "prompt": f"hello {rng.randrange(10**6)}", "max_tokens": 2}
        return _json_req("/v1/completions", body, "short")

    def big(self, name: str) -> bytes:
        """The large hostile bodies, built once."""
        if name not in self._big:
            if name == "prompt-2MB":
                rng = random.Random(self.seed + 7)
                words = " ".join(_text(rng, 1000) for _ in range(300))  # ~2 MB of words
                self._big[name] = json.dumps(
                    {"model": MODEL, "prompt": words[:2_000_000], "max_tokens": 2}).encode()
            elif name in ("prompt-20MB", "prompt-2MB-1word"):
                # One long word: costs the engines' tokenizer nothing, so a delay is the proxy's.
                n = 20_000_000 if name == "prompt-20MB" else 2_000_000
                self._big[name] = b'{"model": "%s", "prompt": "%s", "max_tokens": 2}' % (
                    MODEL.encode(), b"a" * n)
            elif name == "gzip-bomb":
                inner = b'{"model": "%s", "prompt": "%s", "max_tokens": 2}' % (
                    MODEL.encode(), b"a" * 80_000_000)
                self._big[name] = gzip.compress(inner, 9)  # ~80 KB
        return self._big[name]

    def hostile(self, kind: str) -> Req:
        self._turn += 1
        t = self._turn
        js = b"application/json"
        if kind == "brackets-100k":
            return Req("POST", "/v1/completions", b"[" * 100_000, [(b"content-type", js)])
        if kind == "surrogate-escaped":
            body = b'{"model":"demo","prompt":"abc \\ud800"}'
            if t % 2:
                body = b'{"model":"%s","messages":[{"role":"user","content":"x \\udfff"}]}' % (
                    MODEL.encode())
                return Req("POST", "/v1/chat/completions", body, [(b"content-type", js)])
            return Req("POST", "/v1/completions", body, [(b"content-type", js)])
        if kind == "surrogate-raw":
            body = b'{"model":"demo","prompt":"abc \xed\xa0\x80"}'
            return Req("POST", "/v1/completions", body, [(b"content-type", js)])
        if kind == "broken-json":
            body = (b'{"model": "sim-model", "prompt": "abc', b'{"model": "sim-model",}',
                    b"\xef\xbb\xbf{\"model\": 1", b"{" * 3)[t % 4]
            return Req("POST", "/v1/chat/completions", body, [(b"content-type", js)])
        if kind == "text-plain":
            body = json.dumps({"model": MODEL, "prompt": self.docs[0], "max_tokens": 2})
            return Req("POST", "/v1/completions", body.encode(),
                       [(b"content-type", b"text/plain; charset=utf-8")])
        if kind == "form-urlencoded":
            return Req("POST", "/v1/completions", b"model=sim-model&prompt=hello%20there",
                       [(b"content-type", b"application/x-www-form-urlencoded")])
        if kind == "empty-body":
            return Req("POST", ("/v1/chat/completions", "/v1/completions")[t % 2], b"",
                       [(b"content-type", js)])
        if kind in ("prompt-2MB", "prompt-20MB", "prompt-2MB-1word"):
            return Req("POST", "/v1/completions", self.big(kind), [(b"content-type", js)])
        if kind == "gzip-body":
            inner = json.dumps({"model": MODEL, "prompt": self.docs[1], "max_tokens": 2})
            return Req("POST", "/v1/completions", gzip.compress(inner.encode()),
                       [(b"content-type", js), (b"content-encoding", b"gzip")])
        if kind == "gzip-bomb":
            return Req("POST", "/v1/completions", self.big(kind),
                       [(b"content-type", js), (b"content-encoding", b"gzip")])
        if kind == "get-models":
            return Req("GET", "/v1/models")
        if kind == "get-health":
            return Req("GET", "/health")
        if kind == "odd-headers":
            body = json.dumps({"model": MODEL, "prompt": "odd headers", "max_tokens": 2})
            headers = [(b"content-type", js), (b"x-kvcache-route", b"vllm-instance-9; reason=x"),
                       (b"x-odd-latin1", b"caf\xe9 \xff"), (b"x-odd-long", b"v" * 4000),
                       (b"x-forwarded-host", b"evil:1"), (b"connection", b"keep-alive, x-odd"),
                       (b"x-odd-empty", b""), (b"content-type", js)]
            headers += [(b"x-odd-%d" % i, b"%d" % i) for i in range(60)]
            return Req("POST", "/v1/completions", body.encode(), headers)
        if kind == "chunked-body":
            body = json.dumps({"model": MODEL, "prompt": self.docs[2], "max_tokens": 2})
            return Req("POST", "/v1/completions", body.encode(), [(b"content-type", js)],
                       chunked=True)
        if kind == "wrong-types":
            bodies: list[Any] = [
                {"model": ["x"], "prompt": 5}, {"model": MODEL, "messages": "hi"},
                {"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]},
                {"model": MODEL, "prompt": [[1, [2]]]}, {"model": MODEL, "prompt": [-1, -2]},
                {"model": MODEL, "messages": [None, 3]}, {"model": None, "prompt": None},
                {"model": MODEL, "prompt": "x", "max_tokens": -1},
            ]
            return _json_req("/v1/completions", bodies[t % len(bodies)], kind)
        if kind == "token-ids-50k":
            return _json_req("/v1/completions",
                             {"model": MODEL, "prompt": list(range(1000, 51_000)),
                              "max_tokens": 2}, kind)
        if kind == "unknown-path":
            return _json_req("/v1/embeddings", {"model": MODEL, "input": self.docs[3]}, kind)
        if kind == "query-junk":
            return _json_req("/v1/completions?x=%00%ff&y=%E9&z=..%2F..%2Fetc&&=&a[]=1",
                             {"model": MODEL, "prompt": "query junk", "max_tokens": 2}, kind)
        raise ValueError(kind)


class Chat:
    """One client's multi-turn conversation over a shared system prompt."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.turns = 0

    def next_body(self, rng: random.Random, w: Workload, stream: bool,
                  max_tokens: int) -> dict[str, Any]:
        if not self.messages or self.turns <= 0:
            self.messages = [{"role": "system", "content": rng.choice(w.systems)}]
            self.turns = rng.randint(3, 6)
        self.turns -= 1
        self.messages.append({"role": "user", "content": f"Question {rng.randrange(10**6)}?"})
        return {"model": MODEL, "messages": list(self.messages), "max_tokens": max_tokens,
                "stream": stream}

    def answered(self, text: str) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.append({"role": "assistant", "content": text})


# -- a raw HTTP/1.1 client -----------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.uses = 0

    async def ensure(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 22)
            self.uses = 0

    def close(self, abort: bool = False) -> None:
        if self.writer is not None:
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
        self.reader = self.writer = None

    async def send(self, req: Req) -> None:
        await self.ensure()
        assert self.writer is not None
        self.uses += 1
        self.writer.write(req.raw(f"{self.host}:{self.port}"))
        await self.writer.drain()

    async def read(self) -> Resp:
        assert self.reader is not None
        r = self.reader
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                k, sep, v = line.partition(":")
                if sep:
                    headers[k.strip().lower()] = v.strip()
            if not 100 <= status < 200:
                break
        if status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while await r.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                parts.append(await r.readexactly(size))
                await r.readexactly(2)
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await r.readexactly(int(headers["content-length"]))
        else:
            body = await r.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Resp(status, headers, body)


# -- records -------------------------------------------------------------------------------


@dataclass(slots=True)
class Rec:
    i: int
    kind: str
    client: int
    t0: float
    t1: float = 0.0
    outcome: str = ""  # answered | abandoned | unanswered
    status: int = 0
    route: str | None = None
    sent_sha: str = ""
    seen_sha: str | None = None
    own: bool = False  # a response made by mitmproxy itself (no engine saw the request)
    note: str = ""  # mitmproxy's error text, or the client's error
    reused: bool = False  # sent on a kept-alive connection

    @property
    def hostile(self) -> bool:
        return self.kind not in ("chat", "completion", "short", "probe")


async def exchange(conn: Conn, req: Req, rec: Rec, timeout: float,
                   hangup_after: float | None = None,
                   rng: random.Random | None = None) -> Resp | None:
    """Send `req` and read the answer into `rec`; with `hangup_after`, close the socket that
    long after sending instead (half the time with a reset)."""
    rec.sent_sha = hashlib.sha256(req.body).hexdigest()
    rec.reused = conn.writer is not None
    resp = None
    try:
        async with asyncio.timeout(timeout):
            await conn.send(req)
            if hangup_after is not None:
                await asyncio.sleep(hangup_after)
                conn.close(abort=bool(rng and rng.random() < 0.5))
                rec.t1 = time.monotonic()
                rec.outcome = "abandoned"
                return None
            resp = await conn.read()
    except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ValueError, IndexError) as e:
        conn.close(abort=True)
        rec.t1 = time.monotonic()
        rec.outcome = "unanswered"
        rec.note = f"{type(e).__name__}: {e}"[:200]
        return None
    rec.t1 = time.monotonic()
    rec.outcome = "answered"
    rec.status = resp.status
    rec.route = resp.headers.get("x-kvcache-route")
    rec.seen_sha = resp.headers.get("x-body-sha256")
    if resp.headers.get("server", "").startswith("mitmproxy") and rec.seen_sha is None:
        rec.own = True
        text = re.sub(r"<[^>]+>", " ", resp.body.decode("utf-8", "replace"))
        rec.note = " ".join(html.unescape(text).split())[:300]
    return resp


# -- the run -------------------------------------------------------------------------------


@dataclass
class Events:
    t_start: float = 0.0
    t_end: float = 0.0
    t_kill: float | None = None
    t_restart_begin: float | None = None
    t_restarted: float | None = None
    t_outage_end: float | None = None
    t_recovery_hit: float | None = None  # the recovery probe's first cache hit
    modes: list[tuple[float, str]] = field(default_factory=list)
    rss: dict[str, int] = field(default_factory=dict)
    rss_peak: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the request phase
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end


@dataclass
class StallResult:
    baseline_ms: list[float]
    windows: list[dict[str, Any]]


@dataclass
class SoakResult:
    cfg: SoakConfig
    endpoints: dict[str, str]
    records: list[Rec]
    events: Events
    log: list[tuple[float, str]]
    front: dict[str, Any]
    stall: StallResult
    wall_s: float
    startup_s: float


class _Engines:
    """Three engine processes, one of which can be SIGKILLed and restarted on its port."""

    def __init__(self, stack: contextlib.ExitStack, controller: str, time_scale: float) -> None:
        self.stack, self.controller, self.time_scale = stack, controller, time_scale
        self.urls: dict[str, str] = {}

    def args(self, iid: str) -> list[str]:
        return ["--instance-id", iid, "--model", MODEL, "--time-scale", str(self.time_scale),
                "--controller", self.controller, "--echo-body-sha256"]

    def start(self, iid: str, port: int = 0) -> str:
        url = self.stack.enter_context(
            run_module("sim.engine_server", self.args(iid), "127.0.0.1", port,
                       ready_path="/health"))
        self.urls[iid] = url
        return url

    def kill(self, iid: str) -> None:
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = child.cmdline()
                if "sim.engine_server" in cmd and iid in cmd:
                    os.kill(child.pid, signal.SIGKILL)
                    child.wait(5)

    def restart(self, iid: str) -> None:
        port = int(self.urls[iid].rsplit(":", 1)[1])
        self.start(iid, port)


def _addon_from_rev(rev: str, into: Path) -> Path:
    """The addon as committed at `rev` (git archive), so a run is not affected by edits."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "addon"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=data, check=True)
    return into / "addon" / "kvcache.py"


def _cpu_by_process(mitmdump_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process and the processes it started."""
    out: dict[str, float] = {}
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if proc.pid == me.pid:
                label = "soak clients"
            elif proc.pid == mitmdump_pid:
                label = "mitmdump"
            elif "sim.engine_server" in cmd:
                label = cmd[cmd.index("--instance-id") + 1]
            elif "bench.fault_controller" in cmd:
                label = "controller"
            else:
                continue
            t = proc.cpu_times()
            out[label] = out.get(label, 0.0) + t.user + t.system
    return out


def _short(rev: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                          capture_output=True, text=True).stdout.strip()


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def run_soak(cfg: SoakConfig, workdir: Path | None = None) -> SoakResult:
    """Run the soak; `workdir` keeps the config, the addon's copy and mitmdump.log (a
    temporary directory by default)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            return run_soak(cfg, Path(tmp))
    t_begin = time.monotonic()
    with contextlib.ExitStack() as stack:
        control = stack.enter_context(
            run_module("bench.fault_controller", [], ready_path="/sim/state"))
        front = httpx.get(f"{control}/sim/soak/state", timeout=5).json()["front"]
        engines = _Engines(stack, control, cfg.time_scale)
        ids = [f"vllm-instance-{i}" for i in (1, 2, 3)]
        for iid in ids:
            engines.start(iid)
        wait_registered(control, ids)
        conf = write_config(
            workdir / "soak.yaml", dict(engines.urls), front,
            circuit_breaker={"recovery_timeout": f"{cfg.recovery_timeout:g}s"})
        workload = Workload(cfg.seed)
        for name in ("prompt-2MB", "gzip-bomb", "prompt-20MB", "prompt-2MB-1word"):
            workload.big(name)
        # A copy of the addon's package: mitmproxy reloads a script that changes on disk, and
        # the run must not pick up edits made while it runs.
        snapshot = workdir / "addon-snapshot"
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(cfg.addon.parent, snapshot / cfg.addon.parent.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        script = snapshot / cfg.addon.parent.name / cfg.addon.name
        proxy = stack.enter_context(
            mitmdump(conf, workdir, "--set", "flow_detail=0", addon=script))
        startup = time.monotonic() - t_begin
        endpoints = dict(engines.urls)
        records, events, stall = asyncio.run(_drive(cfg, proxy, control, engines, workload,
                                                    endpoints))
        front_state = httpx.get(f"{control}/sim/soak/state", timeout=5).json()
        stack.close()  # mitmdump first (its whole log is read), then engines, controller
        log = list(zip(proxy.times, proxy.lines, strict=False))
        (workdir / "mitmdump.log").write_text("".join(
            f"{t - events.t_start:9.3f} {line}\n" for t, line in log))
    wall = time.monotonic() - t_begin
    return SoakResult(cfg, endpoints, records, events, log, front_state, stall, wall, startup)


async def _drive(cfg: SoakConfig, proxy: Proxy, control: str, engines: _Engines,
                 workload: Workload, endpoints: dict[str, str],
                 ) -> tuple[list[Rec], Events, StallResult]:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    plan_rng = random.Random(cfg.seed)
    plan: list[tuple[bool, str | None]] = []
    kinds = list(HOSTILE_KINDS)
    random.Random(cfg.seed + 1).shuffle(kinds)
    n_hostile = 0
    for _ in range(cfg.requests):
        hang = plan_rng.random() < cfg.hangup_rate
        hostile = plan_rng.random() < cfg.hostile_rate
        if hostile:
            plan.append((False, kinds[n_hostile % len(kinds)]))
            n_hostile += 1
        else:
            plan.append((hang, None))
    records: list[Rec] = []
    ev = Events()
    issued = 0
    done = 0
    deadline = time.monotonic() + cfg.time_limit
    pid = proxy.proc.pid

    async def client(cid: int) -> None:
        nonlocal issued, done
        conn = Conn(host, int(port))
        chat = Chat()
        while issued < cfg.requests and time.monotonic() < deadline:
            i = issued
            issued += 1
            rng = random.Random(cfg.seed * 1_000_003 + i)
            hang, hostile = plan[i]
            req = workload.hostile(hostile) if hostile else workload.normal(rng, chat)
            kind = hostile or req.kind
            rec = Rec(i, kind, cid, time.monotonic())
            records.append(rec)
            if hostile:
                # Hostile requests go on their own connection (a broken one stays broken).
                own = Conn(host, int(port))
                await exchange(own, req, rec, cfg.request_timeout)
                own.close()
            else:
                resp = await exchange(conn, req, rec, cfg.request_timeout,
                                      cfg.hangup_after if hang else None, rng)
                if kind == "chat":
                    text = "(no answer)"
                    if resp is not None and resp.status == 200 and b'"content"' in resp.body:
                        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                            text = json.loads(resp.body)["choices"][0]["message"]["content"]
                    chat.answered(text)
            done += 1

    async def mode(m: str) -> None:
        async with httpx.AsyncClient(timeout=10) as c:
            await c.post(f"{control}/sim/soak/mode", json={"mode": m})
        ev.modes.append((time.monotonic(), m))

    async def monitor(stop: asyncio.Event) -> None:
        current = ""
        restart: asyncio.Task[None] | None = None
        recovery: asyncio.Task[None] | None = None
        marks = {"10%": 0.10, "50%": 0.50}
        while not stop.is_set():
            f = issued / cfg.requests
            want = controller_mode(f, cfg.segments, cfg.controller_outage)
            if want != current:
                await mode(want)
                if cfg.controller_outage and current == "killed" and f >= 0.70:
                    # Listening again (the mode call returned): the controller is back.
                    ev.t_outage_end = time.monotonic()
                    recovery = asyncio.create_task(recovery_probe())
                current = want
            if ev.t_kill is None and f >= cfg.kill_at:
                ev.t_kill = time.monotonic()  # before the signal: refusals start at once
                engines.kill(cfg.kill_engine)
            if ev.t_kill is not None and restart is None and f >= cfg.restart_at:
                ev.t_restart_begin = time.monotonic()

                async def do_restart() -> None:
                    await asyncio.to_thread(engines.restart, cfg.kill_engine)
                    ev.t_restarted = time.monotonic()
                restart = asyncio.create_task(do_restart())
            for name, at in list(marks.items()):
                if done / cfg.requests >= at:
                    ev.rss[name] = _rss(pid)
                    del marks[name]
            ev.rss_peak = max(ev.rss_peak, _rss(pid))
            await asyncio.sleep(0.02)
        if restart is not None:
            await restart
        if recovery is not None:
            await recovery

    async def recovery_probe() -> None:
        """After the outage, the same shared-prefix prompt every 100 ms until one is a
        cache hit (or recovery_timeout + 10 s): the time to the first hit does not then
        depend on how many requests the run has left."""
        conn = Conn(host, int(port))
        body = {"model": MODEL, "prompt": workload.docs[0] + "\nRecovered?", "max_tokens": 2}
        end = time.monotonic() + cfg.recovery_timeout + 10
        while time.monotonic() < end:
            rec = Rec(-1, "recovery", -1, time.monotonic())
            await exchange(conn, _json_req("/v1/completions", body, "recovery"), rec, 30)
            if rec.route and route_info(rec.route).get("reason") == "cache-hit":
                ev.t_recovery_hit = rec.t1
                return
            await asyncio.sleep(0.1)

    cpu0 = _cpu_by_process(pid)
    load0 = os.getloadavg()[0]
    ev.t_start = time.monotonic()
    stop = asyncio.Event()
    mon = asyncio.create_task(monitor(stop))
    await asyncio.gather(*(client(c) for c in range(cfg.clients)))
    ev.t_end = time.monotonic()
    cpu1 = _cpu_by_process(pid)
    ev.cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
    ev.load = (load0, os.getloadavg()[0])
    ev.rss["100%"] = _rss(pid)
    stop.set()
    await mon
    if ev.t_restarted is None and ev.t_kill is not None:
        await asyncio.to_thread(engines.restart, cfg.kill_engine)
        ev.t_restarted = time.monotonic()
    await mode("ok")
    stall = await _stall_phase(host, int(port), workload, cfg, endpoints)
    ev.rss["after stall phase"] = _rss(pid)
    return records, ev, stall


def controller_mode(f: float, segments: int, outage: bool) -> str:
    """The controller's mode at fraction `f` of the requests issued."""
    if outage and 0.40 <= f < 0.70:
        return "killed"
    if outage and 0.70 <= f < 0.80:
        return "ok"
    return CONTROLLER_CYCLE[int(f * segments) % len(CONTROLLER_CYCLE)]


async def _stall_phase(host: str, port: int, workload: Workload, cfg: SoakConfig,
                       endpoints: dict[str, str]) -> StallResult:
    """Small requests in a loop on a quiet proxy; hostile requests one at a time between
    quiet gaps. A probe that overlaps a hostile request is compared with the probes that
    overlap none. Probes straight to each engine (GET /health) say when an engine, not the
    proxy, was slow: a proxied probe sent to an engine that was slow at the time is left
    out of the proxy's figure (and counted)."""
    Span = tuple[float, float, str]
    probes: list[Span] = []
    direct: list[Span] = []
    stop = asyncio.Event()
    body = {"model": MODEL, "prompt": "ping", "max_tokens": 1}

    async def probe(h: str, p: int, req: Req, out: list[Span], eid: str = "") -> None:
        conn = Conn(h, p)
        while not stop.is_set():
            rec = Rec(-1, "probe", -1, time.monotonic())
            await exchange(conn, req, rec, 30)
            if rec.outcome == "answered":
                out.append((rec.t0, rec.t1, eid or route_info(rec.route or "?")["endpoint"]))
            await asyncio.sleep(0.005)

    ping = _json_req("/v1/completions", body, "probe")
    tasks = [asyncio.create_task(probe(host, port, ping, probes)) for _ in range(2)]
    for eid, url in endpoints.items():
        h, p = url.removeprefix("http://").rsplit(":", 1)
        tasks.append(asyncio.create_task(probe(h, int(p), Req("GET", "/health"), direct, eid)))
    await asyncio.sleep(2.0)
    windows: list[dict[str, Any]] = []
    for _ in range(cfg.stall_rounds):
        for kind in STALL_KINDS:
            req = workload.hostile(kind)
            rec = Rec(-1, kind, -1, time.monotonic())
            conn = Conn(host, port)
            await exchange(conn, req, rec, 120)
            conn.close()
            windows.append({"kind": kind, "t0": rec.t0, "t1": rec.t1 or time.monotonic(),
                            "status": rec.status, "outcome": rec.outcome})
            await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    margin = 0.3

    def quiet(a: float, b: float) -> bool:
        return not any(a < w["t1"] + margin and b > w["t0"] - margin for w in windows)

    direct_base = [(b - a) * 1000 for a, b, _ in direct if quiet(a, b)]
    slow_engine_ms = max(20.0, 3 * _pct(direct_base, 0.99))

    def engine_slow(eid: str, a: float, b: float) -> bool:
        return any(e == eid and x < b and y > a and (y - x) * 1000 > slow_engine_ms
                   for x, y, e in direct)

    warm = min((a for a, _, _ in probes), default=0.0) + 0.5
    baseline = [(b - a) * 1000 for a, b, e in probes
                if a > warm and quiet(a, b) and not engine_slow(e, a, b)]

    for w in windows:
        over = [(a, b, e) for a, b, e in probes if a < w["t1"] and b > w["t0"]]
        mine = [(b - a) * 1000 for a, b, e in over if not engine_slow(e, a, b)]
        w["probes"] = len(over)
        w["max_ms"] = max(((b - a) * 1000 for a, b, _ in over), default=0.0)
        w["proxy_probes"] = len(mine)
        w["proxy_max_ms"] = max(mine, default=0.0)
        w["engine_max_ms"] = max(((b - a) * 1000 for a, b, _ in direct
                                  if a < w["t1"] and b > w["t0"]), default=0.0)
        w["duration_ms"] = (w["t1"] - w["t0"]) * 1000
    return StallResult(baseline, windows)


# -- figures and criteria ------------------------------------------------------------------


@dataclass
class Criterion:
    name: str
    ok: bool
    figure: str


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _port_of(url: str) -> str:
    return url.rsplit(":", 1)[1]


def figures(res: SoakResult) -> dict[str, Any]:
    cfg, ev, recs = res.cfg, res.events, res.records
    ids = set(res.endpoints)
    answered = [r for r in recs if r.outcome == "answered"]
    out: dict[str, Any] = {}
    out["issued"] = len(recs)
    out["answered"] = len(answered)
    out["abandoned"] = sum(r.outcome == "abandoned" for r in recs)
    unanswered = [r for r in recs if r.outcome == "unanswered"]
    out["unanswered"] = len(unanswered)
    out["unanswered_detail"] = Counter(
        f"{r.kind}: {r.note.split(':')[0]}{' (kept-alive conn)' if r.reused else ''}"
        for r in unanswered)
    out["by_status"] = dict(sorted(Counter(r.status for r in answered).items()))
    out["hostile_by_kind"] = {
        k: dict(Counter(r.status if r.outcome == "answered" else r.outcome
                        for r in recs if r.kind == k))
        for k in HOSTILE_KINDS if any(r.kind == k for r in recs)}
    seen = [r for r in answered if r.seen_sha is not None]
    altered = [r for r in seen if r.seen_sha != r.sent_sha]
    out["engine_answered"] = len(seen)
    out["altered"] = len(altered)
    out["altered_kinds"] = dict(Counter(r.kind for r in altered))
    own = [r for r in answered if r.own]
    out["own_responses"] = dict(Counter(r.status for r in own))
    out["own_with_route"] = sum(r.route is not None for r in own)
    out["answered_without_engine_nor_own"] = sum(
        1 for r in answered if r.seen_sha is None and not r.own)

    def valid(r: Rec) -> bool:
        return r.route is not None and route_info(r.route)["endpoint"] in ids

    not_own = [r for r in answered if not r.own]
    bad_route = [r for r in not_own if not valid(r)]
    out["route_missing"] = dict(Counter(r.kind for r in bad_route if r.route is None))
    out["route_unknown"] = dict(Counter(route_info(r.route)["endpoint"] for r in bad_route
                                        if r.route is not None))
    out["route_bad"] = len(bad_route)
    out["route_bad_success"] = sum(1 for r in bad_route if r.status < 400)
    infos = [route_info(r.route) for r in answered if r.route is not None]
    out["reasons"] = dict(Counter(
        f"{i.get('reason', '')}" + (f" ({i['why']})" if i.get("why") else "")
        for i in infos).most_common())
    out["per_endpoint"] = dict(sorted(Counter(i["endpoint"] for i in infos).items()))
    # The same, by the controller's mode when the request was sent.
    modes = ev.modes
    by_mode: dict[str, Counter[str]] = {}
    for r in answered:
        if r.route is None or not modes or r.hostile:
            continue
        k = 0
        while k + 1 < len(modes) and modes[k + 1][0] <= r.t0:
            k += 1
        info = route_info(r.route)
        why = info.get("reason", "") + (f" ({info['why']})" if info.get("why") else "")
        by_mode.setdefault(modes[k][1], Counter())[why] += 1
    out["reasons_by_mode"] = {m: dict(c.most_common(4)) for m, c in by_mode.items()}
    # 502s: by the route header, else by the port in mitmproxy's error text.
    killed = cfg.kill_engine
    killed_port = _port_of(res.endpoints[killed])

    def target(r: Rec) -> str:
        if r.route is not None:
            return route_info(r.route)["endpoint"]
        for eid, url in res.endpoints.items():
            if f":{_port_of(url)}" in r.note or f", {_port_of(url)})" in r.note:
                return eid
        return "?"

    e502 = [r for r in answered if r.status == 502]
    out["502_by_target"] = dict(Counter(target(r) for r in e502))
    # mitmproxy's text names no address when the upstream closed the connection mid-request
    # ("server closed connection"): in flight at the kill (within 1 s of it) they are the
    # killed engine's; the others are not (an engine closing an idle kept-alive connection
    # as mitmproxy reuses it: uvicorn's keep-alive timeout is 5 s).
    t_kill = ev.t_kill or 0.0

    def at_kill(r: Rec) -> bool:
        return ev.t_kill is not None and abs(r.t0 - t_kill) <= 1.0

    k502 = [r for r in e502 if target(r) == killed or (target(r) == "?" and at_kill(r))]
    out["502_unattributed_at"] = [round(r.t0 - t_kill, 2) for r in e502 if target(r) == "?"]
    out["502_closed_not_kill"] = sum(1 for r in e502 if target(r) == "?" and not at_kill(r))
    out["502_killed"] = len(k502)
    out["502_killed_after_1s"] = sum(1 for r in k502 if r.t0 > t_kill + 1.0)
    first_fail = min((r.t1 for r in k502), default=None)
    out["502_killed_after_first_1s"] = (
        sum(1 for r in k502 if r.t0 > first_fail + 1.0) if first_fail is not None else 0)
    out["502_killed_first_s"] = (first_fail - t_kill) if first_fail is not None else None
    out["502_killed_last_s"] = max((r.t0 - t_kill for r in k502), default=0.0)
    out["502_notes"] = dict(Counter(re.sub(r"\d+", "N", r.note)[:120] for r in e502
                                    ).most_common(4))
    out["killed_port"] = killed_port
    # Mark-downs from the log.
    grace = 1.0
    marks: list[tuple[float, str, str, bool]] = []
    for t, line in res.log:
        m = MARK_DOWN.search(line)
        if m:
            legit = (m.group(1) == killed and ev.t_kill is not None and t >= ev.t_kill
                     and (ev.t_restarted is None or t <= ev.t_restarted + grace))
            marks.append((t, m.group(1), line.strip(), legit))
    out["markdowns"] = len(marks)
    hangups = sorted(r.t1 for r in recs if r.outcome == "abandoned")

    def nearest_hangup_ms(t: float) -> float | None:
        before = [h for h in hangups if h <= t + 0.005]
        return round((t - before[-1]) * 1000, 1) if before else None

    def connect_error_before(t: float, eid: str) -> str:
        """mitmproxy's own line on a failed upstream connect just before `t`: one a client
        hang-up caused, else one naming `eid`'s port (while an engine is dead, refusals to
        it are logged all the time and say nothing about another endpoint)."""
        near = [line for u, line in res.log
                if t - 0.05 <= u <= t and "error establishing server connection" in line]
        port = _port_of(res.endpoints.get(eid, ":?"))
        mine = ([x for x in near if "client disconnected" in x]
                or [x for x in near if f", {port})" in x])
        return mine[-1].split("] ", 1)[-1] if mine else ""

    out["false_markdowns"] = [(round(t - ev.t_start, 2), e, line, nearest_hangup_ms(t),
                               connect_error_before(t, e))
                              for t, e, line, ok in marks if not ok]
    out["false_markdown_causes"] = dict(Counter(
        re.sub(r"^\[[\d.:]+\]\s*", "", c) or "(no mitmproxy connect error just before)"
        for *_, c in out["false_markdowns"]))
    out["tracebacks"] = [line for _, line in res.log
                         if "Traceback" in line or "Addon error" in line]
    out["error_lines"] = Counter(
        re.sub(r"\d+", "N", line.strip())[:140] for _, line in res.log
        if "Error" in line or "error:" in line.lower()).most_common(8)
    out["rss"] = dict(ev.rss)
    out["rss_peak"] = ev.rss_peak
    dur = ev.t_end - ev.t_start
    out["duration_s"] = dur
    out["throughput"] = len(answered) / dur if dur > 0 else 0.0
    normal = [r for r in answered if r.kind in ("chat", "completion", "short")]
    lat = [(r.t1 - r.t0) * 1000 for r in normal]
    out["latency_ms"] = {"p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "max": max(lat or [0])}
    # Normal requests in flight together with a big hostile one, during the soak itself.
    big = [r for r in recs if r.kind in ("gzip-bomb", "prompt-2MB") and r.t1]
    over = [(r.t1 - r.t0) * 1000 for r in normal
            if any(r.t0 < b.t1 and r.t1 > b.t0 for b in big)]
    out["soak_overlap_ms"] = {"n": len(over), "p50": _pct(over, 0.5), "max": max(over or [0])}
    st = res.stall
    base = st.baseline_ms
    out["stall_baseline_ms"] = {"n": len(base), "p50": _pct(base, 0.5),
                                "p99": _pct(base, 0.99), "max": max(base or [0])}
    b50 = _pct(base, 0.5)
    out["stall_windows"] = [
        dict(w, delay_ms=max(w["proxy_max_ms"] - b50, 0.0) if w["proxy_probes"] else 0.0)
        for w in st.windows]
    out["stall_worst_ms"] = max((w["delay_ms"] for w in out["stall_windows"]), default=0.0)
    out["trap_connections"] = res.front.get("trap_connections", 0)
    out["front_counts"] = res.front.get("counts", {})
    if cfg.controller_outage and ev.t_outage_end is not None:
        hits = [r.t1 for r in answered if r.t1 >= ev.t_outage_end and r.route
                and route_info(r.route).get("reason") == "cache-hit"]
        hits += [ev.t_recovery_hit] if ev.t_recovery_hit is not None else []
        out["recovery_s"] = (min(hits) - ev.t_outage_end) if hits else None
    out["kill_at_s"] = (ev.t_kill - ev.t_start) if ev.t_kill else None
    out["restart_s"] = ((ev.t_restarted - ev.t_start) if ev.t_restarted else None)
    return out


def criteria(res: SoakResult, fig: dict[str, Any] | None = None) -> list[Criterion]:
    fig = fig or figures(res)
    rss = fig["rss"]
    r10, r100 = rss.get("10%", 0), rss.get("100%", 0)
    out = [
        Criterion("0 unanswered", fig["unanswered"] == 0,
                  f"{fig['unanswered']} unanswered of {fig['issued']} "
                  f"({fig['abandoned']} abandoned by the client)"),
        Criterion("0 bodies altered", fig["altered"] == 0,
                  f"{fig['altered']} of {fig['engine_answered']} bodies seen by an engine "
                  f"differ {fig['altered_kinds'] or ''}"),
        Criterion(f"RSS at 100% <= {RSS_RATIO}x RSS at 10%",
                  bool(r10) and r100 <= RSS_RATIO * r10,
                  f"{r10 / 2**20:.0f} MB -> {r100 / 2**20:.0f} MB "
                  f"({r100 / r10 if r10 else 0:.2f}x)"),
        Criterion("route header on every answered response (mitmproxy's own errors apart), "
                  "naming a configured endpoint", fig["route_bad"] == 0,
                  f"{fig['route_bad']} without a valid one (missing by kind: "
                  f"{fig['route_missing']}; unknown ids: {fig['route_unknown']})"),
        Criterion("no false mark-down", not fig["false_markdowns"],
                  f"{len(fig['false_markdowns'])} of {fig['markdowns']} mark-down lines name "
                  "an endpoint that was up"),
        Criterion(f"< {MAX_502_KILLED} 502s for the killed engine",
                  fig["502_killed"] < MAX_502_KILLED,
                  f"{fig['502_killed']} ({fig['502_killed_after_1s']} sent > 1 s after the "
                  f"kill, {fig['502_killed_after_first_1s']} > 1 s after the first of them; "
                  f"last {fig['502_killed_last_s']:.1f} s after the kill)"),
        Criterion("0 tracebacks in mitmdump's output", not fig["tracebacks"],
                  f"{len(fig['tracebacks'])} lines with Traceback / Addon error"),
        Criterion(f"no request delayed > {MAX_STALL_MS:.0f} ms by a hostile one",
                  fig["stall_worst_ms"] <= MAX_STALL_MS,
                  f"worst {fig['stall_worst_ms']:.0f} ms over the quiet baseline "
                  f"(p50 {fig['stall_baseline_ms']['p50']:.1f} ms)"),
        Criterion("no connection to a host the controller named", fig["trap_connections"] == 0,
                  f"{fig['trap_connections']} connections to the trap"),
    ]
    if res.cfg.controller_outage:
        limit = res.cfg.recovery_timeout + 1.0
        rec = fig.get("recovery_s")
        out.append(Criterion(
            f"cache hits back within recovery_timeout + 1 s ({limit:.0f} s)",
            rec is not None and rec <= limit,
            "no cache hit after the outage" if rec is None else f"{rec:.1f} s"))
    return out


def render(res: SoakResult, command: str) -> list[str]:
    fig = figures(res)
    crit = criteria(res, fig)
    cfg = res.cfg
    mb = 2**20
    lines = [f"    $ {command}", "", "# Soak of the proxy under faults", ""]
    lines.append(
        f"{fig['issued']} requests from {cfg.clients} clients in {fig['duration_s']:.1f} s "
        f"(wall {res.wall_s:.0f} s with start-up {res.startup_s:.0f} s and the quiet phase); "
        f"seed {cfg.seed}, time scale {cfg.time_scale}, addon `{cfg.addon_label or cfg.addon}`"
        f"; {os.cpu_count()} CPUs, load average {res.events.load[0]:.1f} at the start and "
        f"{res.events.load[1]:.1f} at the end of the requests; "
        f"{cfg.kill_engine} SIGKILLed at {cfg.kill_at:.0%} "
        f"({fig['kill_at_s'] or 0:.1f} s) and restarted at {cfg.restart_at:.0%} "
        f"(up at {fig['restart_s'] or 0:.1f} s); controller "
        + ("down from 40% to 70%, otherwise " if cfg.controller_outage else "")
        + f"cycling {'/'.join(dict.fromkeys(CONTROLLER_CYCLE))} in {cfg.segments} segments.")
    lines.append("Endpoints: " + ", ".join(f"{k} {v}" for k, v in res.endpoints.items())
                 + ".")
    lines += ["", "| criterion | result | figure |", "|---|---|---|"]
    lines += [f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.figure} |" for c in crit]
    lines += ["", "## Figures", ""]
    lines.append(f"- answered {fig['answered']}, unanswered {fig['unanswered']}, abandoned "
                 f"by the client (hang-ups) {fig['abandoned']}")
    if fig["unanswered_detail"]:
        lines.append(f"- unanswered, by kind and error: {dict(fig['unanswered_detail'])}")
    lines.append(f"- answered by status: {fig['by_status']}")
    lines.append(f"- responses made by mitmproxy itself (no engine saw them): "
                 f"{fig['own_responses']}; with the route header: {fig['own_with_route']}")
    lines.append(f"- 502s by target (route header, else the port in mitmproxy's text; ? = "
                 f"no port): {fig['502_by_target']}; counted for the killed engine "
                 f"{cfg.kill_engine} (port {fig['killed_port']}, with the ?s sent within 1 s "
                 f"of the kill): {fig['502_killed']}, of which {fig['502_killed_after_1s']} "
                 f"sent more than 1 s after the kill; the ?s were sent at "
                 f"{fig['502_unattributed_at'][:30]} s from the kill, "
                 f"{fig['502_closed_not_kill']} of them not near it")
    if fig["502_notes"]:
        lines.append(f"- 502 texts: {fig['502_notes']}")
    lines.append(f"- bodies compared (engine's SHA-256): {fig['engine_answered']}, altered "
                 f"{fig['altered']}; answers from neither an engine nor mitmproxy (the addon "
                 f"itself): {fig['answered_without_engine_nor_own']}")
    rss = fig["rss"]
    lines.append("- mitmdump RSS: " + ", ".join(f"{k} {v / mb:.0f} MB" for k, v in rss.items())
                 + f"; peak {fig['rss_peak'] / mb:.0f} MB")
    lines.append(f"- throughput {fig['throughput']:.0f} answered/s; normal requests' latency "
                 f"p50 {fig['latency_ms']['p50']:.0f} ms, p99 {fig['latency_ms']['p99']:.0f} "
                 f"ms, max {fig['latency_ms']['max']:.0f} ms")
    lines.append(f"- requests per endpoint (route header): {fig['per_endpoint']}")
    dur = fig["duration_s"]
    lines.append("- CPU in the request phase (cores): " + ", ".join(
        f"{k} {v / dur:.2f}" for k, v in sorted(res.events.cpu.items())) + " (the killed "
        "engine's first life is not counted)")
    lines.append(f"- route reasons (why): {fig['reasons']}")
    lines.append("- route reasons by the controller's mode when sent (top 4 each, normal "
                 "requests):")
    for m, c in fig["reasons_by_mode"].items():
        lines.append(f"  - {m}: {c}")
    lines.append(f"- mark-down lines: {fig['markdowns']}; false: {len(fig['false_markdowns'])}")
    if fig["false_markdowns"]:
        lines.append(f"  - mitmproxy's line just before each: {fig['false_markdown_causes']}")
    for t, eid, line, hang, cause in fig["false_markdowns"][:8]:
        lines.append(f"  - at {t:.2f} s, {eid} (up; the last client hang-up {hang} ms before "
                     f"the line was read; mitmproxy: `{cause}`): `{line}`")
    lines.append(f"- traceback lines: {len(fig['tracebacks'])}")
    for line in list(dict.fromkeys(fig["tracebacks"]))[:5]:
        lines.append(f"  - `{line.strip()[:160]}`")
    if fig["error_lines"]:
        lines.append("- most frequent error lines in mitmdump's output:")
        for text, n in fig["error_lines"]:
            lines.append(f"  - {n} x `{text}`")
    lines.append(f"- hostile requests by kind (status or outcome): {fig['hostile_by_kind']}")
    so = fig["soak_overlap_ms"]
    lines.append(f"- during the soak, normal requests in flight with a gzip bomb or 2 MB "
                 f"prompt: {so['n']}, p50 {so['p50']:.0f} ms, max {so['max']:.0f} ms "
                 "(loaded; the quiet phase below isolates the effect)")
    b = fig["stall_baseline_ms"]
    lines.append(f"- quiet phase: probe latency without a hostile request in flight: n {b['n']}"
                 f", p50 {b['p50']:.1f} ms, p99 {b['p99']:.1f} ms, max {b['max']:.1f} ms")
    for w in fig["stall_windows"]:
        lines.append(f"  - {w['kind']}: answered {w['status'] or w['outcome']} in "
                     f"{w['duration_ms']:.0f} ms; {w['probes']} probes in flight with it, "
                     f"slowest {w['max_ms']:.0f} ms; {w['proxy_probes']} of them sent to an "
                     f"engine that was not slow itself, slowest {w['proxy_max_ms']:.0f} ms "
                     f"(+{w['delay_ms']:.0f} ms: the proxy's delay); slowest direct engine "
                     f"probe {w['engine_max_ms']:.0f} ms")
    lines.append(f"- controller front: {fig['front_counts']}; trap connections "
                 f"{fig['trap_connections']}")
    if cfg.controller_outage:
        rec = fig.get("recovery_s")
        lines.append("- controller back at 70%: first cache-hit after "
                     + ("never" if rec is None else f"{rec:.1f} s")
                     + f" (recovery_timeout {cfg.recovery_timeout:g} s)")
    failed = [c.name for c in crit if not c.ok]
    lines += ["", f"**{len(crit) - len(failed)}/{len(crit)} criteria pass**"
              + (f"; failing: {'; '.join(failed)}" if failed else "")]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=None, help="requests (default 20000)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds for the requests, whichever of the two ends first")
    p.add_argument("--quick", action="store_true",
                   help="1,500 requests, 32 clients, recovery_timeout 2s (the CI test's size)")
    p.add_argument("--controller-outage", action="store_true",
                   help="controller down from 40%% to 70%% of the requests, then back")
    p.add_argument("--addon", type=Path, default=None,
                   help="addon script to load (default: this checkout's addon/kvcache.py)")
    p.add_argument("--addon-rev", default=None,
                   help="load the addon as committed at this git revision (e.g. HEAD)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "soak" / "report.md")
    a = p.parse_args(argv)
    cfg = SoakConfig(**QUICK) if a.quick else SoakConfig()
    cfg = replace(cfg, seed=a.seed, time_limit=a.time_limit,
                  controller_outage=a.controller_outage)
    if a.requests is not None:
        cfg = replace(cfg, requests=a.requests)
    if a.clients is not None:
        cfg = replace(cfg, clients=a.clients)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        if a.addon_rev:
            cfg = replace(cfg, addon=_addon_from_rev(a.addon_rev, Path(tmp)),
                          addon_label=f"addon/ at {a.addon_rev} ({_short(a.addon_rev)})")
        elif a.addon:
            cfg = replace(cfg, addon=a.addon.resolve())
        res = run_soak(cfg)
    command = shlex.join([".venv/bin/python", "-m", "bench.soak", *argv])
    lines = render(res, command)
    text = "\n".join(lines)
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text + "\n")
    log = a.out.with_suffix(".mitmdump.log")
    log.write_text("".join(f"{t - res.events.t_start:9.3f} {line}\n" for t, line in res.log))
    print(f"wrote {a.out} and {log}", file=sys.stderr)
    return 0 if all(c.ok for c in criteria(res)) else 1


if __name__ == "__main__":
    sys.exit(main())
