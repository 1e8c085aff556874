"""Discrete-event simulation of a router in front of a cluster of engines, in virtual time.

No sleeps and no clock: time only moves from one event to the next (a heap ordered by time,
then by insertion), and every random choice comes from a seeded ``random.Random``, so the same
inputs give the same numbers on any machine.

Engines are ``sim.engine_model.EngineModel`` instances (prefix cache with block LRU + cost
model) driven by the contract in that module's docstring:

1. A routed request waits FIFO for one of ``CostModel.max_batch`` slots.
2. With ``CostModel.serial_prefill`` it then waits FIFO for the engine's single prefill unit.
3. Prefill starts: the prompt is looked up and inserted in the engine's cache (the model does
   both in ``begin``; with a serial prefill unit nobody else can look at this engine's cache
   before the prefill ends, so inserting at the start or at the end is the same).
   TTFT = arrival -> end of prefill = queueing + ``prefill_s`` of the uncached tokens.
   At the end of prefill the admitted/evicted 256-token chunks are reported to the
   controller, as an LMCache worker stores a prompt's KV once it has been computed.
4. ``n_out - 1`` decode steps of ``decode_step_s`` (which may grow with the batch, per the
   cost model), then the slot is released and the router sees the request finish.

Only the prompt enters the cache, not the generated answer: LMCache does not store decode KV
by default (``save_decode_cache: false``), so a chat round finds the previous round's prompt
cached but recomputes the previous answer.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from addon.prefix_index import release
from bench.prompts import Prompt
from sim.chunks import CHUNK_SIZE, chunk_hashes
from sim.engine_model import DEFAULT_CAPACITY_TOKENS, CostModel, EngineModel, RequestPlan

# Event kinds; the int order never matters (ties are broken by insertion order).
_ARRIVE, _PREFILL_DONE, _FINISH, _SCRAPE = 0, 1, 2, 3


@dataclass(frozen=True, eq=False)
class SimRequest:
    idx: int
    prompt: Prompt
    output_tokens: int
    session: str | None = None
    # Issued only after request ``after`` has finished: a chat round's prompt contains the
    # previous round's answer, so it cannot be sent before that answer exists.
    after: int | None = None


@dataclass
class SimConfig:
    n_engines: int = 4
    # The engine model's own default (half of an H100's KV room for an 8B model).
    capacity_tokens: int = DEFAULT_CAPACITY_TOKENS
    # vLLM's default block is 16 tokens; 128 (also a vLLM block size) makes the engine's
    # cache bookkeeping, most of the run time, 8x cheaper and moves a cache hit by < 128
    # tokens. ``--block-size 16`` gives the same tables within a few percent, 4-5x slower.
    block_size: int = 128
    max_batch: int = 32
    staleness_s: float = 0.0
    controller_down: bool = False
    # Engine metrics (vLLM's num_requests_waiting / running) are read every this many
    # seconds, by every policy that reads them (llm-d, ours): between reads they see the last
    # one. 0 reads them live at routing time.
    scrape_interval_s: float = 0.05
    # Share of the requests sent straight to the engines (another gateway, a batch job):
    # spread at random, invisible to the policy except through engine metrics; the metrics
    # are over the policy's own requests.
    bypass_share: float = 0.0

    def engine_ids(self) -> list[str]:
        return [f"e{i}" for i in range(self.n_engines)]

    def cost_model(self) -> CostModel:
        # Only the batch size is the benchmark's own; every service time is the engine
        # model's default, so a change there shows up here.
        return CostModel(max_batch=self.max_batch)


@dataclass(slots=True)
class RequestRecord:
    idx: int
    engine: str = ""
    arrival: float = -1.0
    prefill_start: float = -1.0
    first_token: float = -1.0
    end: float = -1.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reason: str = ""

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival


def begin_prompt(
    model: EngineModel, prompt: Prompt, output_tokens: int, running: int = 1
) -> RequestPlan:
    """``model.begin(prompt.tokens, output_tokens, running)`` with the prompt's hashes computed
    once per workload instead of once per call (``tests/bench`` and ``bench.run`` still check
    the two agree)."""
    if prompt.block_size != model.cache.block_size:
        raise ValueError("prompt hashed for another block size than the engine's")
    return model.begin_hashed(
        len(prompt.tokens), prompt.blocks, prompt.chunks, output_tokens, running)


class ControllerView:
    """What an LMCache controller knows: per instance, the 256-token chunk hashes its worker
    reported as admitted and not yet as evicted.

    ``lookup`` answers like ``/lookup``: every instance holding a prefix of the prompt, with
    the matched length (a multiple of 256, stopping at that instance's first missing chunk).
    Reports become visible ``staleness_s`` after they are made; ``down`` answers nothing.
    """

    def __init__(
        self, engine_ids: Sequence[str], staleness_s: float = 0.0, down: bool = False
    ) -> None:
        self.engine_ids = list(engine_ids)
        self.staleness_s = staleness_s
        self.down = down
        self.held: dict[str, set[int]] = {e: set() for e in self.engine_ids}
        self._pending: deque[tuple[float, str, list[int], list[int]]] = deque()

    def report(self, now: float, eid: str, admitted: list[int], evicted: list[int]) -> None:
        if self.staleness_s <= 0:
            self._apply(eid, admitted, evicted)
        else:
            # Reports are made in time order and the delay is constant, so a FIFO is ordered.
            self._pending.append((now + self.staleness_s, eid, admitted, evicted))

    def _apply(self, eid: str, admitted: Iterable[int], evicted: Iterable[int]) -> None:
        held = self.held[eid]
        # The engine evicts before it admits within one insert; apply in the same order.
        held.difference_update(evicted)
        held.update(admitted)

    def _catch_up(self, now: float) -> None:
        pending = self._pending
        while pending and pending[0][0] <= now:
            _, eid, admitted, evicted = pending.popleft()
            self._apply(eid, admitted, evicted)

    def lookup_chunks(self, chunks: Sequence[int], now: float) -> dict[str, int]:
        if self.down:
            return {}
        self._catch_up(now)
        out: dict[str, int] = {}
        for eid in self.engine_ids:
            held = self.held[eid]
            n = 0
            for c in chunks:
                if c not in held:
                    break
                n += 1
            if n:
                out[eid] = n * CHUNK_SIZE
        return out

    def lookup(self, tokens: Sequence[int], now: float) -> dict[str, int]:
        return self.lookup_chunks(chunk_hashes(tokens), now)


class SimEngine:
    """Queues and slots of one engine around its ``EngineModel``."""

    def __init__(self, eid: str, model: EngineModel, track_pending: bool = False) -> None:
        self.eid = eid
        self.model = model
        self.cost = model.cost
        self.slots_used = 0
        self.waiting: deque[int] = deque()  # routed here, waiting for a slot
        self.prefill_queue: deque[int] = deque()  # holding a slot, waiting for the prefill unit
        self.prefilling: int | None = None
        self.prefill_end = 0.0
        self.release_at: dict[int, float] = {}  # prefill started -> when its slot frees
        # KV of requests holding a slot and past prefill start: what vLLM reports as KV
        # cache usage (cached-but-free blocks count as free there).
        self.running_kv_tokens = 0
        self.first_tokens = 0  # cumulative, as vLLM's counters
        self.finished = 0
        # Block hashes of prompts routed here whose prefill has not started: they will be in
        # the cache before a request routed now starts, which only the oracle uses.
        self.pending_blocks: Counter[int] | None = Counter() if track_pending else None

    @property
    def num_waiting(self) -> int:
        """vLLM's ``num_requests_waiting``: requests not yet scheduled. vLLM schedules a
        request when its prefill starts (chunked prefill runs it over several steps from
        then on), so those holding a slot but still queued for the prefill unit wait too."""
        return len(self.waiting) + len(self.prefill_queue)

    @property
    def num_running(self) -> int:
        """vLLM's ``num_requests_running``: prefilling or decoding."""
        return self.slots_used - len(self.prefill_queue)

    def kv_usage(self) -> float:
        cap = self.model.cache.capacity_tokens
        return min(1.0, self.running_kv_tokens / cap) if cap else 1.0


class Policy(Protocol):
    name: str
    needs_pending: bool

    def route(self, req: SimRequest, sim: Simulation) -> str: ...

    def on_first_token(self, req: SimRequest, eid: str, sim: Simulation) -> None: ...

    def on_finish(self, req: SimRequest, eid: str, sim: Simulation) -> None: ...


@dataclass(frozen=True)
class EngineReading:
    """One scrape of an engine's metrics."""

    waiting: int
    running: int
    kv_usage: float
    # vLLM's cumulative counters: requests that produced a first token (the count of
    # time_to_first_token_seconds) and requests that ended (request_success_total).
    first_tokens: int = 0
    finished: int = 0


class Simulation:
    """One run: a workload's requests at given issue times, one policy, one cluster."""

    def __init__(
        self,
        requests: Sequence[SimRequest],
        times: Sequence[float],
        policy: Policy,
        cfg: SimConfig,
        seed: int = 0,
    ) -> None:
        if len(requests) != len(times):
            raise ValueError("one issue time per request")
        self.requests = list(requests)
        self.times = list(times)
        self.policy = policy
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.now = 0.0
        self.engine_ids = cfg.engine_ids()
        cost = cfg.cost_model()
        self.cost = cost
        self.engines: dict[str, SimEngine] = {
            eid: SimEngine(
                eid,
                EngineModel(eid, cfg.capacity_tokens, cost, cfg.block_size),
                track_pending=policy.needs_pending,
            )
            for eid in self.engine_ids
        }
        self.controller = ControllerView(self.engine_ids, cfg.staleness_s, cfg.controller_down)
        # The proxy's own count: routed to an engine and not finished yet.
        self.inflight: dict[str, int] = {eid: 0 for eid in self.engine_ids}
        self.records = [RequestRecord(r.idx) for r in self.requests]
        self._plans: dict[int, RequestPlan] = {}
        self._done = [False] * len(self.requests)
        self._deferred: dict[int, int] = {}  # finished-first request -> the one waiting on it
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self.reason: str = ""  # a policy may set why it picked an engine (kept per request)
        # The last scrape of each engine's metrics (see SimConfig.scrape_interval_s).
        self.readings: dict[str, EngineReading] = {}
        # Requests that bypass the policy: their own seeded draw, so the policy's random
        # choices and the arrivals are those of the run without bypass.
        brng = random.Random(seed * 7919 + 17)
        self.bypass = [brng.random() < cfg.bypass_share for _ in self.requests]
        self._brng = brng

    def reading(self, eid: str) -> EngineReading:
        """An engine's metrics as a policy reading them sees them: the last scrape, or the
        live values when scraping is off."""
        if self.cfg.scrape_interval_s <= 0 or eid not in self.readings:
            e = self.engines[eid]
            return EngineReading(e.num_waiting, e.num_running, e.kv_usage(), e.first_tokens,
                                 e.finished)
        return self.readings[eid]

    def _push(self, t: float, kind: int, idx: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, idx))

    def run(self) -> list[RequestRecord]:
        for r, t in zip(self.requests, self.times, strict=True):
            self._push(t, _ARRIVE, r.idx)
        if self.cfg.scrape_interval_s > 0:
            self._push(0.0, _SCRAPE, -1)
        heap = self._heap
        while heap:
            t, _, kind, idx = heapq.heappop(heap)
            self.now = t
            if kind == _ARRIVE:
                self._arrive(idx)
            elif kind == _PREFILL_DONE:
                self._prefill_done(idx)
            elif kind == _FINISH:
                self._finish(idx)
            else:
                self._scrape()
        if not all(self._done):
            raise RuntimeError("simulation ended with unfinished requests")
        return self.records

    # --- events -------------------------------------------------------------------------

    def _scrape(self) -> None:
        for eid, e in self.engines.items():
            self.readings[eid] = EngineReading(e.num_waiting, e.num_running, e.kv_usage(),
                                               e.first_tokens, e.finished)
        on_scrape = getattr(self.policy, "on_scrape", None)
        if on_scrape is not None:
            on_scrape(self)
        if self._heap:  # the run goes on: scrape again
            self._push(self.now + self.cfg.scrape_interval_s, _SCRAPE, -1)

    def _arrive(self, idx: int) -> None:
        req = self.requests[idx]
        if req.after is not None and not self._done[req.after]:
            self._deferred[req.after] = idx
            return
        rec = self.records[idx]
        rec.arrival = self.now
        rec.prompt_tokens = len(req.prompt)
        rec.output_tokens = req.output_tokens
        self.reason = ""
        if self.bypass[idx]:
            eid = self._brng.choice(self.engine_ids)
            self.reason = "bypass"
            seen = getattr(self.policy, "on_bypass", None)  # only the oracle sees them
            if seen is not None:
                seen(req, eid, self)
        else:
            eid = self.policy.route(req, self)
        if eid not in self.engines:
            raise ValueError(f"policy {self.policy.name} picked unknown engine {eid!r}")
        rec.engine = eid
        rec.reason = self.reason
        if not self.bypass[idx]:
            self.inflight[eid] += 1
        eng = self.engines[eid]
        if eng.pending_blocks is not None:
            eng.pending_blocks.update(req.prompt.blocks)
        if eng.slots_used < self.cost.max_batch:
            eng.slots_used += 1
            self._got_slot(eng, idx)
        else:
            eng.waiting.append(idx)

    def _got_slot(self, eng: SimEngine, idx: int) -> None:
        if self.cost.serial_prefill:
            eng.prefill_queue.append(idx)
            if eng.prefilling is None:
                self._begin(eng, eng.prefill_queue.popleft())
        else:
            self._begin(eng, idx)

    def _begin(self, eng: SimEngine, idx: int) -> None:
        req = self.requests[idx]
        plan = begin_prompt(eng.model, req.prompt, req.output_tokens, eng.slots_used)
        self._plans[idx] = plan
        rec = self.records[idx]
        rec.prefill_start = self.now
        rec.cached_tokens = plan.cached_tokens
        end = self.now + plan.prefill_s
        if self.cost.serial_prefill:
            eng.prefilling = idx
            eng.prefill_end = end
        eng.release_at[idx] = end + plan.decode_s
        eng.running_kv_tokens += plan.prompt_tokens + plan.output_tokens
        if eng.pending_blocks is not None:
            release(eng.pending_blocks, req.prompt.blocks)
        self._push(end, _PREFILL_DONE, idx)

    def _prefill_done(self, idx: int) -> None:
        rec = self.records[idx]
        eng = self.engines[rec.engine]
        plan = self._plans[idx]
        rec.first_token = self.now
        eng.first_tokens += 1
        self.controller.report(self.now, eng.eid, plan.admitted_chunks, plan.evicted_chunks)
        if not self.bypass[idx]:
            self.policy.on_first_token(self.requests[idx], eng.eid, self)
        if self.cost.serial_prefill:
            eng.prefilling = None
            if eng.prefill_queue:
                self._begin(eng, eng.prefill_queue.popleft())
        self._push(self.now + plan.decode_s, _FINISH, idx)

    def _finish(self, idx: int) -> None:
        rec = self.records[idx]
        eng = self.engines[rec.engine]
        plan = self._plans.pop(idx)
        rec.end = self.now
        self._done[idx] = True
        eng.slots_used -= 1
        eng.finished += 1
        eng.running_kv_tokens -= plan.prompt_tokens + plan.output_tokens
        del eng.release_at[idx]
        if not self.bypass[idx]:
            self.inflight[eng.eid] -= 1
            self.policy.on_finish(self.requests[idx], eng.eid, self)
        elif hasattr(self.policy, "on_bypass"):
            self.policy.on_finish(self.requests[idx], eng.eid, self)
        if eng.waiting:
            eng.slots_used += 1
            self._got_slot(eng, eng.waiting.popleft())
        nxt = self._deferred.pop(idx, None)
        if nxt is not None:
            self._push(self.now, _ARRIVE, nxt)


# --- metrics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Metrics:
    requests: int
    hit_ratio: float  # engine-side cached prompt tokens / prompt tokens
    ttft_p50: float
    ttft_p95: float
    ttft_p99: float
    ttft_mean: float
    throughput_rps: float  # finished requests / (last finish - first arrival)
    output_tok_s: float
    busiest_share: float  # share of requests served by the busiest engine
    per_engine: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)


def summarize(records: Sequence[RequestRecord], engine_ids: Sequence[str]) -> Metrics:
    ttfts = [r.ttft for r in records]
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    span = max(r.end for r in records) - min(r.arrival for r in records)
    per: Counter[str] = Counter({e: 0 for e in engine_ids})
    per.update(r.engine for r in records)
    reasons = Counter(r.reason for r in records if r.reason)
    n = len(records)
    return Metrics(
        requests=n,
        hit_ratio=cached / prompt if prompt else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        ttft_p99=percentile(ttfts, 99),
        ttft_mean=sum(ttfts) / n,
        throughput_rps=n / span if span > 0 else float("nan"),
        output_tok_s=sum(r.output_tokens for r in records) / span if span > 0 else float("nan"),
        busiest_share=max(per.values()) / n,
        per_engine=dict(sorted(per.items())),
        reasons=dict(sorted(reasons.items())),
    )


def run_once(
    requests: Sequence[SimRequest],
    times: Sequence[float],
    policy: Policy,
    cfg: SimConfig,
    seed: int = 0,
) -> tuple[Metrics, list[RequestRecord]]:
    sim = Simulation(requests, times, policy, cfg, seed)
    records = sim.run()
    own = [r for r, b in zip(records, sim.bypass, strict=True) if not b]
    return summarize(own, sim.engine_ids), records


def check_engine_path(block_size: int = 64, n: int = 40, seed: int = 3) -> None:
    """Raise if ``begin_prompt`` and ``EngineModel.begin`` disagree on any plan or counter
    (shared prefixes, empty and sub-block prompts, evictions included)."""
    from bench.prompts import PromptFactory, random_tokens

    rng = random.Random(seed)
    factory = PromptFactory(block_size)
    cost = CostModel()
    ref = EngineModel("ref", 4096, cost, block_size)
    fast = EngineModel("fast", 4096, cost, block_size)
    shared = random_tokens(rng, 1500)
    for i in range(n):
        tokens = shared[: rng.randint(0, 1500)] + random_tokens(rng, rng.randint(0, 900))
        out, running = rng.randint(0, 20), rng.randint(1, 8)
        want = ref.begin(tokens, out, running)
        got = begin_prompt(fast, factory.make(tokens), out, running)
        if got != want:
            raise AssertionError(f"begin_prompt differs from EngineModel.begin at request {i}")
    for attr in ("prefix_cache_queries", "prefix_cache_hits", "requests",
                 "prompt_tokens_total", "generation_tokens_total"):
        if getattr(ref, attr) != getattr(fast, attr):
            raise AssertionError(f"begin_prompt counts {attr} differently")
