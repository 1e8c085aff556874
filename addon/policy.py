"""Which endpoint serves a request (pure: plain values in, plain values out).

The request hook calls `choose` and the routing benchmark imports the very same function.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from addon.health import Health, OutlierSettings


@dataclass(frozen=True)
class Choice:
    endpoint_id: str
    # "cache-hit"; "cache-spill" (a non-holder: the holders are busier than the prefix is
    # worth) or "hot-spread" (a non-holder: the prefix is hot and needs another holder); or
    # the balancer's name when the cache gave no answer.
    reason: str
    matched_tokens: int = 0
    # Per candidate, as the cost rule saw it: (endpoint, matched tokens, load, cost in
    # prompt tokens of work before this request's first token); empty when no endpoint held
    # anything (the balancer chose). For whoever inspects the decision (mitmweb's view).
    costs: tuple[tuple[str, int, int, float], ...] = ()


def best_holder(
    matches: Mapping[str, int],
    candidates: Sequence[str],
    inflight: Mapping[str, int],
) -> tuple[str, int] | None:
    """The candidate holding the most matched tokens; ties go to the less loaded one.

    Instance ids that are not candidates (unknown or unhealthy endpoints) are ignored, so the
    target is always a configured endpoint whatever the controller says; zero is no match.
    """
    order = {eid: i for i, eid in enumerate(candidates)}
    best: tuple[int, int, int, str] | None = None
    for eid, matched in matches.items():
        if eid not in order or matched <= 0:
            continue
        rank = (-matched, inflight.get(eid, 0), order[eid], eid)
        if best is None or rank < best:
            best = rank
    return None if best is None else (best[3], -best[0])


class LoadBalancer:
    """Fallback when the cache gives no answer: least in-flight or round robin."""

    def __init__(self, kind: str) -> None:
        if kind not in ("least_inflight", "round_robin"):
            raise ValueError(f"unknown load_balancing {kind!r}")
        self.kind = kind
        self._rr = itertools.count()

    def pick(self, candidates: Sequence[str], inflight: Mapping[str, int]) -> str:
        if not candidates:
            raise ValueError("no candidate endpoints")
        n = next(self._rr)
        if self.kind == "round_robin":
            return candidates[n % len(candidates)]
        # Least in-flight; the rotating start spreads ties instead of piling onto the first.
        start = n % len(candidates)
        rotated = list(candidates[start:]) + list(candidates[:start])
        return min(rotated, key=lambda e: inflight.get(e, 0))


@dataclass(frozen=True)
class PolicyParams:
    """Knobs of the routing policy (each has a config key; see README)."""

    # "cost": least (uncached prompt tokens + load_weight_tokens * in-flight requests);
    # "longest_match": the most matched tokens whatever the load (the seed's rule).
    kind: str = "cost"
    # How many prompt tokens of prefill one request in flight on an endpoint is worth: the
    # exchange rate between cache affinity and queueing (only with load_unit="requests").
    load_weight_tokens: int = 256
    # "tokens": an endpoint's load is the proxy's estimate of its queued work in prompt tokens
    # (addon/prefix_index.py), compared 1:1 with the uncached tokens; "requests":
    # load_weight_tokens x its in-flight requests. Defaults below chosen with the routing
    # benchmark (docs/routing-benchmark.md).
    load_unit: str = "tokens"
    # Share of a routed request's uncached tokens counted as load until its prefill is seen
    # to be over: a new request queues behind part of it on average, not all of it.
    prefill_share: float = 0.7
    # Load per unfinished request, in tokens: its decode slot (and it spreads ties), for a
    # request whose answer may be `request_output_tokens` long (its max_tokens). An answer of
    # at most N tokens holds its slot for N decode steps: a request asking for fewer counts
    # proportionally less, one asking for more up to MAX_OUTPUT_WEIGHT times as much, and
    # one that does not say counts once. 0: every request counts once.
    request_tokens: int = 160
    request_output_tokens: int = 160
    # Merge the prefixes of requests in flight into the controller's matches: the controller
    # learns a prefix only once its prefill is over.
    track_inflight: bool = True
    # Per endpoint, tokens of recently finished prompts remembered and merged with every
    # controller answer (a down, empty or lagging controller knows less); 0 turns that
    # memory off, and with it following a chat's previous turn to where it was served.
    recent_tokens: int = 100_000
    # A hot prefix needs more than one holder: its share of the recent requests (the
    # requests containing it, counts decayed with this half-life, in seconds) times the
    # number of endpoints, less `hot_headroom`, rounded up (0.5: rounded to the nearest), is
    # how many endpoints should hold it. While fewer do, a non-holder is costed as if it held
    # `hot_copy_credit` of the prefix: the copy it would make serves later requests, so it is
    # worth part of its prefill now. It then takes a copy once the holders' queues exceed
    # that much of the prefix, not only once they exceed all of it. 0 turns this off.
    hot_half_life: float = 10.0
    hot_headroom: float = 0.5
    hot_copy_credit: float = 0.5
    # Under congestion an uncached token costs more than its own prefill: with no endpoint
    # free to prefill now, the work a cache hit would have saved delays the requests queued
    # behind it too. Uncached tokens weigh 1 + (the least queued prefill of any endpoint) /
    # this many tokens; 0 weighs them 1 whatever the load. Only queued prefill counts, not
    # the per-request term: requests that are decoding do not hold up a prefill.
    congestion_tokens: int = 3000
    # A request leaves the endpoint that holds most of its prompt only once more prefill is
    # queued there than spill_margin x the tokens it holds (then the cost above decides).
    # 0: only light load (nothing queued) keeps it there; more keeps requests with their
    # prefix longer, favouring the engines' hit ratio over TTFT at moderate load.
    spill_margin: float = 0.0
    # ... or than this many tokens, whichever is more. A queue that short delays the request
    # by a few blocks' prefill (768 tokens: ~25 ms on the calibration's H100), and leaving
    # copies the prefix to a second endpoint: the copy is computed twice, and later requests
    # carrying the prefix then split between two holders (a chat's next turns follow the one
    # it went to). The cost rule alone moves the third request of a cold start: the first
    # one's prompt is still prefilling on its server. On the real-vLLM comparison that left
    # 1.2 points of hit ratio to routers that never move (docs/real-peers.md); in the
    # simulation any floor up to 1024 tokens wins the same cells (docs/routing-seeds.md).
    # At most twice the tokens a move would recompute counts (see `choose`).
    spill_floor_tokens: int = 768
    # A match the cache view reports on a lower tier than the engine's GPU (KV events'
    # medium CPU, the MP coordinator's tiers) still has to be loaded: each of its tokens
    # costs this share of recomputing it. Default: the calibration's 31-37 us per token of
    # prefill (Llama-3.1-8B on an H100) against loading 128 KiB of KV per token over PCIe
    # at about 50 GB/s (2.6 us).
    lower_tier_cost: float = 0.08


# The most one request's max_tokens can weigh against `request_output_tokens`: clients that
# ask for tens of thousands "to be safe" rarely get that many.
MAX_OUTPUT_WEIGHT = 4.0


def request_weight(max_tokens: int | None, params: PolicyParams) -> float:
    """How many requests' worth of per-request load one request with this max_tokens is."""
    ref = params.request_output_tokens
    if max_tokens is None or ref <= 0:
        return 1.0
    return min(max(max_tokens, 1) / ref, MAX_OUTPUT_WEIGHT)


def choose(
    matches: Mapping[str, int],
    candidates: Sequence[str],
    inflight: Mapping[str, int],
    balancer: LoadBalancer,
    prompt_tokens: int = 0,
    params: PolicyParams | None = None,
    load_tokens: Mapping[str, int] | None = None,
    replicas: int = 1,
    prefill_tokens: Mapping[str, int] | None = None,
    lower_tier: Collection[str] = (),
) -> Choice:
    """The endpoint for one request.

    `matches`: instance id -> tokens of the prompt's prefix it holds (LMCache lookup, maybe
    merged with the proxy's own view); `inflight`: the proxy's own count of unfinished
    requests per endpoint; `load_tokens`: the proxy's estimate of each endpoint's queued work
    in prompt tokens, used instead of `inflight` (for the cost, the tie-breaks and the
    balancer) when given and `params.load_unit` is "tokens"; `replicas`: how many endpoints
    should hold the matched prefix (more than one for a hot prefix, see `PolicyParams`);
    `prefill_tokens`: the queued prefill alone per endpoint, for the congestion weight
    (`load` when not given); `lower_tier`: the endpoints whose match must be loaded from a
    tier below the GPU (each matched token costs `params.lower_tier_cost` of a recompute).
    """
    p = params or PolicyParams()
    by_tokens = load_tokens is not None and p.load_unit == "tokens"
    load = load_tokens if by_tokens and load_tokens is not None else inflight
    holder = best_holder(matches, candidates, load)
    if holder is None:
        return Choice(balancer.pick(candidates, load), balancer.kind)
    if p.kind == "longest_match":
        return Choice(holder[0], "cache-hit", holder[1])
    # Estimated work before this request's first token on each endpoint, in prompt tokens:
    # what it must prefill there, plus what the requests already there cost it. A holder
    # that is far busier than the rest loses its request, which spreads a hot prefix instead
    # of piling every request onto its first holder.
    prompt = max(prompt_tokens, holder[1])
    top = min(holder[1], prompt)
    weight = 1 if by_tokens else p.load_weight_tokens
    spread = replicas > 1 and sum(
        1 for e in candidates if matches.get(e, 0) >= holder[1]) < replicas
    congestion = 1.0
    if p.congestion_tokens:
        queued = prefill_tokens if prefill_tokens is not None else load
        congestion += weight * min(queued.get(e, 0) for e in candidates) / p.congestion_tokens
    best: tuple[float, int, int, int] | None = None
    most: tuple[int, float, int] | None = None  # (-matched, cost, index): the best holder
    table: list[tuple[str, int, int, float]] = []
    for i, eid in enumerate(candidates):
        matched = min(max(matches.get(eid, 0), 0), prompt)
        credited = max(matched, int(p.hot_copy_credit * top)) if spread else matched
        if eid in lower_tier:
            credited = int(credited * (1.0 - p.lower_tier_cost))
        busy = load.get(eid, 0)
        cost = congestion * (prompt - credited) + weight * busy
        table.append((eid, matched, busy, cost))
        rank = (cost, -matched, busy, i)
        if best is None or rank < best:
            best = rank
        if matched > 0 and (most is None or (-matched, cost, i) < most):
            most = (-matched, cost, i)
    assert best is not None and most is not None
    winner, matched = candidates[best[3]], -best[1]
    held, holder_id = -most[0], candidates[most[2]]
    queued = prefill_tokens if prefill_tokens is not None else load
    # The floor is capped at twice the tokens the move would recompute: waiting for a queue
    # is then never worse than the recompute it avoids by more than that recompute, however
    # little is held or however much the other endpoint holds too.
    floor = min(p.spill_floor_tokens, 2 * (held - matched))
    if matched < held and weight * queued.get(holder_id, 0) <= max(p.spill_margin * held, floor):
        # Going anywhere but the best holder recomputes part of the prefix. With no prefill
        # queued there (light load: the requests there are only decoding, which hardly
        # delays a new request's start, whatever the per-request term says), that never
        # pays: the request stays with the endpoint that holds most of its prompt.
        # `spill_floor_tokens` widens "no prefill queued" to a queue that short, and
        # `spill_margin` to that share of the held tokens.
        return Choice(holder_id, "cache-hit", held, tuple(table))
    if matched > 0:
        return Choice(winner, "cache-hit", matched, tuple(table))
    return Choice(winner, "hot-spread" if spread else "cache-spill", 0, tuple(table))


class EndpointState:
    """In-flight requests per endpoint, and which endpoints may take requests (their
    passive health, `addon/health.py`). Touched only from the event loop."""

    def __init__(
        self,
        ids: Sequence[str],
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        outlier: OutlierSettings | None = None,
    ) -> None:
        self.ids = list(ids)
        self.inflight: dict[str, int] = {eid: 0 for eid in ids}
        self.routed: dict[str, int] = {eid: 0 for eid in ids}
        settings = outlier or OutlierSettings(base_ejection=cooldown)
        self.health = Health(ids, settings, clock)

    def healthy(self) -> list[str]:
        return self.health.candidates()

    def mark_down(self, eid: str) -> None:
        """The endpoint refused a connection."""
        self.health.failure(eid, "connect-refused")

    def start(self, eid: str) -> None:
        self.inflight[eid] = self.inflight.get(eid, 0) + 1
        self.routed[eid] = self.routed.get(eid, 0) + 1
        self.health.started(eid)

    def finish(self, eid: str) -> None:
        if self.inflight.get(eid, 0) > 0:
            self.inflight[eid] -= 1
