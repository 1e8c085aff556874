"""Routing policies: ours (imported from ``addon.policy``) and the field's, re-implemented from
their published behaviour (``/work/shared/facts/peers.md`` and the projects' sources).

Each policy sees what its real counterpart sees:

- the proxy's in-flight count per engine (``sim.inflight``), which every router keeps;
- the LMCache controller's lookup (``sim.controller``) for routers that ask a KV index
  (ours, production-stack kvaware, llm-d precise, Dynamo, the seed);
- engine metrics (vLLM's ``num_requests_waiting`` / ``running``, KV usage) for llm-d and
  ours, read as of the last scrape (``SimConfig.scrape_interval_s``, the same for both);
- its own history only, for the approximate routers (SGLang, prefixaware);
- everything, exactly, for the oracle.

Ties that the real router breaks at random are broken with the run's seeded RNG.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import os
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Container, Sequence
from hashlib import blake2b
from typing import Any

from addon import policy as addon_policy
from addon.lmcache import LookupResult
from addon.prefix_index import release
from addon.request import LLMRequest
from addon.resilience import CircuitBreaker, RateLimitedLog
from addon.router import Router
from bench.des import SimEngine, SimRequest, Simulation
from bench.prompts import TREE_BLOCK
from sim.chunks import CHUNK_SIZE

# The addon's request path looks up only prompts of at least one LMCache chunk: a shorter one
# never matches (addon/router.py, CHUNK_TOKENS).
LOOKUP_MIN_TOKENS = CHUNK_SIZE


class BasePolicy:
    name = "base"
    # Only the oracle needs engines to track the blocks of queued prompts.
    needs_pending = False

    def route(self, req: SimRequest, sim: Simulation) -> str:
        raise NotImplementedError

    def on_first_token(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        pass

    def on_finish(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        pass


def _stable_hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


def leading_run(hashes: Sequence[int], present: Container[int]) -> int:
    """How many leading ``hashes`` are in ``present``, for a ``present`` that is closed
    under prefixes (it holds a chained hash only with every hash before it), as a router's
    own history is while nothing is trimmed from it: a binary search, not a walk."""
    lo, hi = 0, len(hashes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if hashes[mid - 1] in present:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _walk(hashes: Sequence[int], present: Container[int]) -> int:
    n = 0
    for h in hashes:
        if h not in present:
            break
        n += 1
    return n


def _argmin_random(
    ids: Sequence[str], key: Callable[[str], Any], sim: Simulation
) -> str:
    """The id with the smallest key; ties at random (seeded)."""
    best = min(key(e) for e in ids)
    tied = [e for e in ids if key(e) == best]
    return tied[0] if len(tied) == 1 else sim.rng.choice(tied)


# --- baselines ----------------------------------------------------------------------------


class RandomPolicy(BasePolicy):
    name = "random"

    def route(self, req: SimRequest, sim: Simulation) -> str:
        return sim.rng.choice(sim.engine_ids)


class RoundRobin(BasePolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._n = 0

    def route(self, req: SimRequest, sim: Simulation) -> str:
        eid = sim.engine_ids[self._n % len(sim.engine_ids)]
        self._n += 1
        return eid


class LeastLoaded(BasePolicy):
    """Fewest in-flight requests (the proxy's count); ties rotate like the addon's balancer."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._n = 0

    def route(self, req: SimRequest, sim: Simulation) -> str:
        ids = sim.engine_ids
        start = self._n % len(ids)
        self._n += 1
        rotated = ids[start:] + ids[:start]
        return min(rotated, key=lambda e: sim.inflight[e])


class ConsistentHashRing:
    """Consistent hashing with virtual nodes (production-stack ``session``, SMG
    ``consistent_hashing``): a key keeps its engine as long as the engine set is the same."""

    def __init__(self, ids: Sequence[str], vnodes: int = 160) -> None:
        points = sorted((_stable_hash(f"{eid}#{v}"), eid) for eid in ids for v in range(vnodes))
        self._keys = [p[0] for p in points]
        self._ids = [p[1] for p in points]

    def get(self, key: str) -> str:
        i = bisect.bisect(self._keys, _stable_hash(key)) % len(self._keys)
        return self._ids[i]


def _session_key(req: SimRequest) -> str:
    return req.session if req.session is not None else f"request-{req.idx}"


class SessionAffinity(BasePolicy):
    name = "session"

    def __init__(self) -> None:
        self._ring: ConsistentHashRing | None = None

    def route(self, req: SimRequest, sim: Simulation) -> str:
        if self._ring is None:
            self._ring = ConsistentHashRing(sim.engine_ids)
        return self._ring.get(_session_key(req))


# --- vLLM production-stack --------------------------------------------------------------


class ProductionStackKvAware(BasePolicy):
    """``kvaware``: ask the (embedded) LMCache controller; if the first holder it lists has
    matched >= prompt_len - threshold, go there; else the session's engine (consistent hash)
    if the request has a session, else the engine with the lowest recent QPS.

    The real router reads only a completions ``prompt`` (chat requests go straight to the
    fallback); here every workload is given to it as a prompt, which can only help it.
    """

    name = "ps-kvaware"

    def __init__(self, threshold: int = 2000, qps_window_s: float = 60.0) -> None:
        self.threshold = threshold
        self.qps_window_s = qps_window_s
        self._ring: ConsistentHashRing | None = None
        self._recent: dict[str, deque[float]] = {}

    def _qps(self, eid: str, now: float) -> int:
        q = self._recent.setdefault(eid, deque())
        while q and q[0] < now - self.qps_window_s:
            q.popleft()
        return len(q)

    def route(self, req: SimRequest, sim: Simulation) -> str:
        if self._ring is None:
            self._ring = ConsistentHashRing(sim.engine_ids)
        n = len(req.prompt)
        matches = sim.controller.lookup_chunks(req.prompt.chunks, sim.now)
        eid: str | None = None
        if matches:
            first, matched = next(iter(matches.items()))
            if matched >= max(n - self.threshold, 0):
                eid = first
                sim.reason = "kv-hit"
        if eid is None:
            if req.session is not None:
                eid = self._ring.get(req.session)
                sim.reason = "session"
            else:
                eid = min(sim.engine_ids, key=lambda e: self._qps(e, sim.now))
                sim.reason = "lowest-qps"
        self._recent.setdefault(eid, deque()).append(sim.now)
        return eid


class ProductionStackPrefixAware(BasePolicy):
    """``prefixaware``: a trie of 128-character chunks per endpoint (128-token chunks here),
    filled with every routed request and never evicted; random among the endpoints with the
    longest match (all endpoints when nothing matches)."""

    name = "ps-prefixaware"

    def __init__(self) -> None:
        self._seen: dict[str, set[int]] = {}

    def route(self, req: SimRequest, sim: Simulation) -> str:
        chunks = req.prompt.pa_chunks
        depth = {
            eid: leading_run(chunks, self._seen.setdefault(eid, set()))
            for eid in sim.engine_ids
        }
        longest = max(depth.values())
        tied = [e for e in sim.engine_ids if depth[e] == longest]
        eid = sim.rng.choice(tied)
        self._seen[eid].update(chunks)
        sim.reason = "prefix" if longest else "random"
        return eid


# --- SGLang router / SMG ------------------------------------------------------------------


class SGLangCacheAware(BasePolicy):
    """SGLang router ``cache_aware`` with its approximate tree (one per worker, built from its
    own routing decisions, never from the engines' real caches).

    If ``max_load - min_load > balance_abs`` and ``max_load > balance_rel * min_load``: the
    least-loaded worker. Else if the best worker's prefix match rate > ``cache_threshold``:
    that worker. Else the worker with the smallest tree (the v0.4 source; peers.md's summary
    says least-loaded: the smallest tree is the router's proxy for the most free cache).
    The chosen worker's tree gets the request's tokens in every branch. Load = the router's
    in-flight count. The tree is kept in 16-token nodes (a match rate within 16 tokens of
    the character-level tree's: the first round of a chat, a 1000-token system prompt in a
    3200-token prompt, must land above 0.3 as it does in SGLang) and LRU-trimmed at
    ``max_tree_tokens``,
    which SGLang sets far above any engine's cache (2^24+ characters), so the tree remembers
    prefixes the engine has long evicted.
    """

    def __init__(
        self,
        cache_threshold: float,
        balance_abs: int,
        balance_rel: float,
        max_tree_tokens: int = 1 << 24,
    ) -> None:
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.max_tree_tokens = max_tree_tokens
        self.name = f"sglang-{cache_threshold:g}/{balance_abs}/{balance_rel:g}"
        self._trees: dict[str, OrderedDict[int, None]] = {}
        self._trimmed = False  # once trimmed, a tree may hold a node without its parent

    def route(self, req: SimRequest, sim: Simulation) -> str:
        ids = sim.engine_ids
        trees = self._trees
        for eid in ids:
            trees.setdefault(eid, OrderedDict())
        loads = sim.inflight
        max_load = max(loads[e] for e in ids)
        min_load = min(loads[e] for e in ids)
        blocks = req.prompt.tree_blocks
        if max_load - min_load > self.balance_abs and max_load > self.balance_rel * min_load:
            eid = min(ids, key=lambda e: loads[e])
            sim.reason = "imbalanced"
        else:
            best_n, eid = -1, ids[0]
            match = _walk if self._trimmed else leading_run
            for e in ids:
                n = match(blocks, trees[e])
                # Ties between equally matching workers go to the less loaded one.
                if n > best_n or (n == best_n and loads[e] < loads[eid]):
                    best_n, eid = n, e
            n_tokens = len(req.prompt)
            rate = best_n * TREE_BLOCK / n_tokens if n_tokens else 0.0
            if rate > self.cache_threshold:
                sim.reason = "cache"
            else:
                eid = min(ids, key=lambda e: len(trees[e]))
                sim.reason = "smallest-tree"
        tree = trees[eid]
        # Deepest nodes first, so the prefix ends up most recently used and trimming takes
        # leaves first, as SGLang's eviction does.
        for b in reversed(blocks):
            if b in tree:
                tree.move_to_end(b)
            else:
                tree[b] = None
        max_blocks = self.max_tree_tokens // TREE_BLOCK
        while len(tree) > max_blocks:
            tree.popitem(last=False)
            self._trimmed = True
        return eid


# --- llm-d --------------------------------------------------------------------------------


class LlmD(BasePolicy):
    """llm-d endpoint picker with its benchmark's scorer weights (prefix 3, kv-utilization 2,
    queue 2); best total wins, ties at random.

    - prefix = matched blocks / prompt blocks, "precise" mode: from the real KV index (here
      the controller view, 256-token blocks);
    - kv-utilization = 1 - KV usage (vLLM's metric: blocks of running requests / capacity);
    - queue = (maxQ - q) / (maxQ - minQ) over the engines' waiting queues, 1 if all equal.
    Engine metrics are those of the last scrape (``Simulation.reading``).
    """

    name = "llm-d"

    def __init__(self, w_prefix: float = 3, w_kv: float = 2, w_queue: float = 2) -> None:
        self.w_prefix, self.w_kv, self.w_queue = w_prefix, w_kv, w_queue

    def route(self, req: SimRequest, sim: Simulation) -> str:
        ids = sim.engine_ids
        total = len(req.prompt.chunks)
        matches = sim.controller.lookup_chunks(req.prompt.chunks, sim.now) if total else {}
        readings = {e: sim.reading(e) for e in ids}
        queues = {e: readings[e].waiting for e in ids}
        qmax, qmin = max(queues.values()), min(queues.values())
        scores: dict[str, float] = {}
        for e in ids:
            prefix = matches.get(e, 0) / CHUNK_SIZE / total if total else 0.0
            kv = 1.0 - readings[e].kv_usage
            queue = 1.0 if qmax == qmin else (qmax - queues[e]) / (qmax - qmin)
            scores[e] = self.w_prefix * prefix + self.w_kv * kv + self.w_queue * queue
        return _argmin_random(ids, lambda e: -scores[e], sim)


# --- NVIDIA Dynamo ------------------------------------------------------------------------


class DynamoKv(BasePolicy):
    """Dynamo KV router: cost = prefill_load_scale * max(active_prefill_blocks + prompt_blocks
    - overlap_blocks, 0) + decode_blocks, lowest wins (temperature 0; ties at random).

    Overlap from the KV index (the controller view, GPU tier: credit 1.0). The router's own
    bookkeeping, as Dynamo's ActiveSequences: a request's uncached blocks count as active
    prefill until its first token; decode_blocks is the number of distinct blocks of the
    worker's active requests with this one added (a shared prefix counts once, as it sits in
    the KV cache once); the growth of the answers' blocks is left out.
    """

    name = "dynamo"

    def __init__(self, prefill_load_scale: float = 1.0) -> None:
        self.scale = prefill_load_scale
        self._prefill: dict[str, int] = {}
        self._active: dict[str, Counter[int]] = {}
        self._req_prefill: dict[int, int] = {}

    def route(self, req: SimRequest, sim: Simulation) -> str:
        ids = sim.engine_ids
        bs = req.prompt.block_size
        blocks = req.prompt.blocks
        prompt_blocks = math.ceil(len(req.prompt) / bs)
        matches = sim.controller.lookup_chunks(req.prompt.chunks, sim.now)
        overlap = {e: matches.get(e, 0) // bs for e in ids}
        costs: dict[str, float] = {}
        for e in ids:
            active = self._active.setdefault(e, Counter())
            shared = 0
            for b in blocks:  # chained hashes: only a leading run can already be there
                if b not in active:
                    break
                shared += 1
            decode = len(active) + prompt_blocks - shared
            prefill = max(self._prefill.get(e, 0) + prompt_blocks - overlap[e], 0)
            costs[e] = self.scale * prefill + decode
        eid = _argmin_random(ids, costs.__getitem__, sim)
        new_prefill = max(prompt_blocks - overlap[eid], 0)
        self._req_prefill[req.idx] = new_prefill
        self._prefill[eid] = self._prefill.get(eid, 0) + new_prefill
        self._active[eid].update(blocks)
        return eid

    def on_first_token(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        self._prefill[eid] -= self._req_prefill.pop(req.idx)

    def on_finish(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        release(self._active[eid], req.prompt.blocks)


# --- the seed -----------------------------------------------------------------------------


class SeedDesign(BasePolicy):
    """The seed (Pixiu kvcache filter) as designed, i.e. with its token cache on and its
    lookup parsing fixed: only a prompt whose tokens are already in its token cache (an exact
    repeat of an earlier prompt) is routed, to the holder with the most matched tokens (ties
    at random); everything else goes to the gateway's load balancing (round robin)."""

    name = "seed"

    def __init__(self) -> None:
        self._token_cache: set[int] = set()
        self._rr = 0

    def route(self, req: SimRequest, sim: Simulation) -> str:
        key = hash(req.prompt.tokens)  # ints and tuples hash the same in every process
        if key in self._token_cache:
            matches = sim.controller.lookup_chunks(req.prompt.chunks, sim.now)
            if matches:
                best = max(matches.values())
                tied = [e for e in sim.engine_ids if matches.get(e) == best]
                sim.reason = "exact-repeat"
                return sim.rng.choice(tied)
        # The background task tokenizes the prompt, so a later repeat finds it.
        self._token_cache.add(key)
        eid = sim.engine_ids[self._rr % len(sim.engine_ids)]
        self._rr += 1
        return eid


# --- the oracle ---------------------------------------------------------------------------


class Oracle(BasePolicy):
    """Knows every engine's exact cache and queues and picks the smallest estimated TTFT.

    The estimate replays the engine's FIFO slot and prefill queues forward (exact for the
    requests already there, since later arrivals never overtake them); a request's cached
    prefix there is what the engine holds now, extended by prompts queued ahead of it (they
    will be inserted before it starts). Greedy: it does not plan for later requests.
    """

    name = "oracle"
    needs_pending = True

    def __init__(self) -> None:
        self._est_prefill: dict[int, float] = {}
        self._est_decode: dict[int, float] = {}

    def _cached(self, eng: SimEngine, req: SimRequest) -> int:
        blocks = req.prompt.blocks
        m = eng.model.cache.match_hashes(blocks) // req.prompt.block_size
        pending = eng.pending_blocks
        if pending:
            while m < len(blocks) and blocks[m] in pending:
                m += 1
        return eng.model._usable_hit(len(req.prompt), m * req.prompt.block_size)

    def _ttft(self, eng: SimEngine, prefill_s: float, now: float) -> float:
        cost = eng.cost
        releases = sorted(eng.release_at.values())
        pf = eng.prefill_end if eng.prefilling is not None else now
        pf = max(pf, now)
        slots_free = cost.max_batch - eng.slots_used
        # Requests holding a slot and waiting for the prefill unit.
        for i in eng.prefill_queue:
            start = max(pf, now) if cost.serial_prefill else now
            pf = start + self._est_prefill[i]
            bisect.insort(releases, pf + self._est_decode[i])
        for i in eng.waiting:
            slot_at = releases.pop(0)
            start = max(slot_at, pf) if cost.serial_prefill else slot_at
            end = start + self._est_prefill[i]
            pf = end if cost.serial_prefill else pf
            bisect.insort(releases, end + self._est_decode[i])
        slot_at = now if (slots_free > 0 and not eng.waiting) else releases[0]
        start = max(slot_at, pf) if cost.serial_prefill else slot_at
        return start + prefill_s - now

    def route(self, req: SimRequest, sim: Simulation) -> str:
        best: tuple[float, int, int] | None = None
        chosen, chosen_prefill = sim.engine_ids[0], 0.0
        for i, eid in enumerate(sim.engine_ids):
            eng = sim.engines[eid]
            prefill_s = eng.cost.prefill_seconds(len(req.prompt) - self._cached(eng, req))
            rank = (self._ttft(eng, prefill_s, sim.now), sim.inflight[eid], i)
            if best is None or rank < best:
                best, chosen, chosen_prefill = rank, eid, prefill_s
        self._est_prefill[req.idx] = chosen_prefill
        self._est_decode[req.idx] = sim.cost.decode_seconds(req.output_tokens)
        return chosen

    def on_bypass(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        """A request that did not pass through the router: the oracle knows it anyway."""
        eng = sim.engines[eid]
        self._est_prefill[req.idx] = eng.cost.prefill_seconds(
            len(req.prompt) - self._cached(eng, req))
        self._est_decode[req.idx] = sim.cost.decode_seconds(req.output_tokens)

    def on_finish(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        self._est_prefill.pop(req.idx, None)
        self._est_decode.pop(req.idx, None)


# --- ours ---------------------------------------------------------------------------------


def params_with(**overrides: Any) -> addon_policy.PolicyParams | None:
    """``PolicyParams`` with these fields changed, or None if the addon has no such field
    (its API may still move; a variant that cannot be expressed is skipped, not faked)."""
    names = {f.name for f in dataclasses.fields(addon_policy.PolicyParams)}
    if not set(overrides) <= names:
        return None
    return dataclasses.replace(addon_policy.PolicyParams(), **overrides)


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}


def _event_loop() -> asyncio.AbstractEventLoop:
    """One loop per process for every run's router (a loop per run would leak its fds)."""
    pid = os.getpid()
    loop = _LOOPS.get(pid)
    if loop is None or loop.is_closed():
        loop = _LOOPS[pid] = asyncio.new_event_loop()
    return loop


class _SimController:
    """The addon's ``Lookup`` over the simulated controller view. The router hashes the
    tokens with its own hash; the controller is asked about the same prompt by its own
    chunk hashes (held by the adapter), as the real controller hashes the tokens it is sent.
    A down controller refuses the connection, as a stopped one does."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.prompt_chunks: Sequence[int] = ()

    async def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        if self.sim.controller.down:
            raise ConnectionRefusedError("controller down")
        return LookupResult(self.sim.controller.lookup_chunks(self.prompt_chunks, self.sim.now))


class _SimKVEvents:
    """The addon's ``Lookup`` over vLLM KV cache events (``cache_view: kv_events``): each
    engine's own prefix cache as it is now, block by block (no controller, no lag, no
    256-token chunks), as the KV-events index holds it from the engines' BlockStored and
    BlockRemoved events."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.prompt_blocks: Sequence[int] = ()

    async def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        out = {}
        for eid, eng in self.sim.engines.items():
            n = eng.model.cache.match_hashes(self.prompt_blocks)
            if n:
                out[eid] = n
        return LookupResult(out)


class Ours(BasePolicy):
    """The addon's routing: an ``addon.router.Router`` (the object the request hook calls,
    with its ``PrefixIndex`` and ``addon.policy.choose``), fed what the hooks feed it.

    - route: ``Router.route`` on an ``LLMRequest`` carrying the prompt's token ids (the
      client-sent-ids path: no tokenizer), then ``Router.started`` as ``kvcache._apply`` does;
    - first token: ``Router.first_byte``, which the addon calls on the first body byte of an
      SSE response (vLLM writes it after the prefill); ``stream_share`` is the share of
      clients that stream (0: none; the addon sees nothing of the others until the end);
    - engine metrics: ``Router.engine_report`` with each scrape (``engine_metrics=True``, as
      the addon's scraper does every ``engine_metrics_interval``): the queue gauges and,
      unless ``engine_counters=False``, the first-token and finished-request counters;
    - finish: ``Router.finished``, as the response/error hooks do.

    The lookup is the simulated controller, down or stale per the run's config; the
    router's clocks (breakers, health) are the simulation's. With no ``params`` the addon's
    defaults are what is measured.
    """

    def __init__(
        self,
        name: str = "ours",
        params: addon_policy.PolicyParams | None = None,
        stream_share: float = 1.0,
        engine_metrics: bool = True,
        view: str = "controller",
        engine_counters: bool = True,
    ) -> None:
        if view not in ("controller", "kv_events"):
            raise ValueError(f"unknown cache view {view!r}")
        self.view = view
        self.name = name
        self.params = params if params is not None else addon_policy.PolicyParams()
        self.stream_share = stream_share
        self.engine_metrics = engine_metrics
        self.engine_counters = engine_counters
        self.router: Router | None = None
        self._controller: _SimController | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _make(self, sim: Simulation) -> Router:
        def clock() -> float:
            return sim.now

        self._controller = _SimController(sim)
        self._kv = _SimKVEvents(sim) if self.view == "kv_events" else None
        breaker = CircuitBreaker(5, 10.0, 2, clock, "controller")
        return Router(
            # The routing budget is wall-clock time (addon/looplag.py), which the virtual-time
            # simulation must not depend on: a route that a busy machine or a GC pause made
            # take 50 ms would fall back and change the numbers from run to run. The lookup
            # itself is instantaneous here, so no budget is ever needed.
            budget=3600.0, state=addon_policy.EndpointState(sim.engine_ids, 10.0, clock),
            balancer=addon_policy.LoadBalancer("least_inflight"), token_cache=None,
            lmcache=self._kv or self._controller, tokenizer=None,
            controller_breaker=breaker,
            tokenizer_breaker=CircuitBreaker(5, 10.0, 2, clock, "tokenizer"),
            failure_log=RateLimitedLog(), policy=self.params, clock=clock,
        )

    def route(self, req: SimRequest, sim: Simulation) -> str:
        if self.router is None:
            self.router = self._make(sim)
            self._loop = _event_loop()
        assert self._controller is not None and self._loop is not None
        self._controller.prompt_chunks = req.prompt.chunks
        if self._kv is not None:
            self._kv.prompt_blocks = req.prompt.blocks
        # Clients ask for the answer's length (max_tokens): the simulated one is exactly it.
        llm = LLMRequest("/v1/completions", "m", "", f"r{req.idx}", "completion",
                         token_ids=req.prompt.tokens, max_tokens=req.output_tokens)
        d = self._loop.run_until_complete(self.router.route(llm))
        self.router.started(req.idx, d, streamed=self.streams(req), max_tokens=llm.max_tokens)
        sim.reason = d.reason
        return d.endpoint_id

    def streams(self, req: SimRequest) -> bool:
        # Spread evenly over the requests (every other one at 0.5), not drawn at random.
        s = self.stream_share
        return s >= 1 or int((req.idx + 1) * s) > int(req.idx * s)

    def on_first_token(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        if self.router is not None and self.streams(req):
            self.router.first_byte(req.idx)

    def on_scrape(self, sim: Simulation) -> None:
        if self.router is None or not self.engine_metrics:
            return
        seq = self.router.index.seq  # every request routed so far has reached its engine
        for eid in sim.engine_ids:
            r = sim.readings[eid]
            if self.engine_counters:
                self.router.engine_report(eid, r.waiting, r.running, seq, r.first_tokens,
                                          r.finished)
            else:
                self.router.engine_report(eid, r.waiting, r.running, seq)

    def on_finish(self, req: SimRequest, eid: str, sim: Simulation) -> None:
        if self.router is not None:
            self.router.finished(req.idx, eid)


# --- registry -----------------------------------------------------------------------------

PolicyFactory = Callable[[], BasePolicy]

PEERS: dict[str, PolicyFactory] = {
    "random": RandomPolicy,
    "round-robin": RoundRobin,
    "least-loaded": LeastLoaded,
    "session": SessionAffinity,
    "ps-kvaware": ProductionStackKvAware,
    "ps-prefixaware": ProductionStackPrefixAware,
    "sglang-0.3/64/1.5": lambda: SGLangCacheAware(0.3, 64, 1.5),
    "sglang-0.5/32/1.1": lambda: SGLangCacheAware(0.5, 32, 1.1),
    "llm-d": LlmD,
    "dynamo": DynamoKv,
    "seed": SeedDesign,
}
REFERENCE: dict[str, PolicyFactory] = {"oracle": Oracle}


def policy_factories() -> dict[str, PolicyFactory]:
    """Every policy by name: ours (addon defaults), the addon's other modes the installed
    ``PolicyParams`` can express, the bench-local candidate, the peers and the oracle."""
    out: dict[str, PolicyFactory] = {"ours": Ours}
    out["ours[no-stream]"] = lambda: Ours("ours[no-stream]", stream_share=0.0)
    out["ours[half-stream]"] = lambda: Ours("ours[half-stream]", stream_share=0.5)
    out["ours[kv-events]"] = lambda: Ours("ours[kv-events]", view="kv_events")
    out["ours[no-stream,no-metrics]"] = lambda: Ours(
        "ours[no-stream,no-metrics]", stream_share=0.0, engine_metrics=False)
    # Engine metrics without vLLM's first-token and finished counters (the queue gauges
    # only): what the prefill estimate of non-streamed requests owes to the counters.
    out["ours[no-stream,gauges-only]"] = lambda: Ours(
        "ours[no-stream,gauges-only]", stream_share=0.0, engine_counters=False)
    # The addon before the prefix index: load in requests, controller matches only.
    old = params_with(load_unit="requests", track_inflight=False, recent_tokens=0)
    if old is not None:
        out["ours[request-load]"] = lambda: Ours("ours[request-load]", old)
    lm = params_with(kind="longest_match", track_inflight=False)
    if lm is not None:
        out["ours[longest-match]"] = lambda: Ours("ours[longest-match]", lm)
    out.update(PEERS)
    out.update(REFERENCE)
    return out
