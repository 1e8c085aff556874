"""The proxy's own view of which endpoint holds (or is about to hold) which prompt prefix, and
how much work each endpoint has queued, in tokens (pure: plain values in, plain values out).

The LMCache controller learns a prefix only after the engine has prefilled it (and its worker
reported it), so a burst of requests sharing a new prefix would look uncached everywhere and
be spread over every engine, computing the prefix once per engine. The proxy knows where it
sent each prompt the moment it routes it: merging that into the controller's answer keeps
the burst together.

What the proxy can observe of a request, and so all this index is fed:

- route time: the endpoint, the prompt's chunk hashes and how many of its tokens were not
  cached there (`add`);
- the first byte of a streamed (SSE) response body: vLLM writes nothing to the body before
  the first token, so prefill is over (`prefill_done`). A non-streamed response says nothing
  until it ends, and SSE headers arrive before prefill ends, so neither is used;
- the end of the response, or an error (`remove`);
- the engine's own queue, scraped from its `/metrics` every so often (`engine_report`): a
  request no longer among the engine's waiting ones has started its prefill, streamed or
  not, and what the engine runs or queues beyond the proxy's own requests is traffic that
  bypassed this proxy.

The chunk hash here is the proxy's own (blake2b over the token ids); it is only compared with
itself, never with the controller's.
"""

from __future__ import annotations

import math
import struct
import sys
import time
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import TypeVar

_K = TypeVar("_K", bound=Hashable)

# LMCache's chunk: the controller never matches less, so neither does the proxy's own view.
CHUNK_TOKENS = 256
# A request whose end is never seen (a hook that did not fire) must not pin memory forever:
# past this many tracked requests the oldest is dropped.
MAX_TRACKED_REQUESTS = 16384


_LITTLE = sys.byteorder == "little"


def chunk_hashes(tokens: Sequence[int]) -> tuple[int, ...]:
    """Chained 64-bit hashes of the full 256-token chunks of `tokens`: hash i covers the
    whole prefix up to the end of chunk i, so equal hashes mean equal prefixes."""
    n_full = len(tokens) // CHUNK_TOKENS
    if n_full == 0:
        return ()
    head = tokens[: n_full * CHUNK_TOKENS]
    # 32-bit ids (every tokenizer's) halve the bytes to hash; struct packs a whole prompt in
    # one C call, several times faster than array() over a tuple. An id beyond 32 bits
    # changes the packing, so such a prompt shares no hashes with others: a missed
    # affinity, never a wrong match.
    pieces: list[bytes | memoryview] = []
    if isinstance(head, array) and head.itemsize == 4 and _LITTLE:
        # The token cache's 4-byte array: its bytes are the "<i" packing already.
        buf = memoryview(head).cast("B")
        step = CHUNK_TOKENS * 4
        pieces = [buf[i * step : (i + 1) * step] for i in range(n_full)]
    for fmt, size in (("i", 4), ("q", 8)):
        if pieces:
            break
        try:
            buf = memoryview(struct.pack(f"<{len(head)}{fmt}", *head))
        except struct.error:
            continue
        step = CHUNK_TOKENS * size
        pieces = [buf[i * step : (i + 1) * step] for i in range(n_full)]
    if not pieces:
        pieces = [",".join(str(t) for t in head[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS])
                  .encode() for i in range(n_full)]
    out: list[int] = []
    prev = bytes(8)
    for piece in pieces:
        h = blake2b(prev, digest_size=8)
        h.update(piece)
        prev = h.digest()
        out.append(int.from_bytes(prev, "little"))
    return tuple(out)


def release(counts: Counter[_K], keys: Iterable[_K]) -> None:
    """Take one of each key off a refcount, dropping the keys that reach zero (unlike
    `Counter.subtract`, which keeps them, or `-=`, which rebuilds the whole counter)."""
    for k in keys:
        left = counts[k] - 1
        if left > 0:
            counts[k] = left
        else:
            del counts[k]


def leading_match(hashes: Sequence[int], *present: Mapping[int, object]) -> int:
    """How many leading `hashes` are in any of `present`."""
    n = 0
    for h in hashes:
        if not any(h in p for p in present):
            break
        n += 1
    return n


@dataclass
class _Tracked:
    endpoint: str
    hashes: tuple[int, ...]
    pending: int  # uncached prompt tokens still counted as prefill work
    seq: int = 0  # send order over all endpoints (engine reports say which they saw)
    # The proxy will see its prefill end itself (a streamed response's first byte): engine
    # reports, which tell only that a prefill started, leave it alone.
    watched: bool = False
    sent: float = 0.0  # when it was routed, on the index's clock
    started: bool = False  # its prefill is known to have started
    prefill_end: float = 0.0  # estimated end of a prefill a report saw start (0: none)
    weight: float = 1.0  # requests' worth of per-request load (policy.request_weight)


@dataclass
class _EngineView:
    """The last report of an engine's own queue, and what followed from it."""

    at: float  # when it was reported
    # Waiting and running requests beyond the proxy's own (other gateways, batch jobs,
    # other proxy replicas).
    waiting: int = 0
    running: int = 0
    queue: bool = False  # it had requests waiting: its start rate can be learned
    # Uncached tokens per second whose prefill the engine starts while it has a queue,
    # learned from reports (0: not known yet); the proxy's started-tokens count at `at`.
    rate: float = 0.0
    starts: int = 0
    # first tokens - finished requests, cumulative counters, when the engine last had
    # nothing running: what the difference counts beyond the requests decoding (requests
    # that finished without a first token: aborted, failed). 0 until such a report.
    decode_offset: int = 0


class PrefixIndex:
    """Per endpoint: a refcount of the chunk hashes of the requests routed there and not
    finished, their queued prefill, and (optionally) an LRU of recently finished prompts'
    chunks for when the controller cannot answer.

    Load estimate per endpoint, in prompt tokens: `prefill_share` x the uncached tokens of its
    requests whose prefill is not known to be over + `request_tokens` per unfinished request.
    """

    def __init__(
        self,
        endpoint_ids: Iterable[str] = (),
        *,
        prefill_share: float = 0.5,
        request_tokens: int = 64,
        recent_tokens: int = 0,
        max_tracked: int = MAX_TRACKED_REQUESTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if prefill_share < 0 or request_tokens < 0 or recent_tokens < 0 or max_tracked < 1:
            raise ValueError("prefix index knobs must not be negative")
        self.prefill_share = prefill_share
        self.request_tokens = request_tokens
        self.recent_chunks = recent_tokens // CHUNK_TOKENS
        self.max_tracked = max_tracked
        self._ids: list[str] = list(endpoint_ids)
        self._requests: OrderedDict[Hashable, _Tracked] = OrderedDict()
        self._chunks: dict[str, Counter[int]] = {}
        self._recent: dict[str, OrderedDict[int, None]] = {}
        self._pending: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._weight: dict[str, float] = {}  # per endpoint, the sum of its requests' weights
        # Per endpoint, its requests whose prefill is still counted, oldest first.
        self._unprefilled: dict[str, OrderedDict[Hashable, None]] = {}
        self._views: dict[str, _EngineView] = {}
        # Per endpoint: uncached tokens of requests known to have started, ever; and the
        # request a report saw start whose prefill is still estimated to run (at most one).
        self._starts: dict[str, int] = {}
        self._prefilling: dict[str, OrderedDict[Hashable, None]] = {}
        self.clock = clock
        self.seq = 0  # requests added so far: an engine report names the last one it saw
        # Mean uncached tokens per routed request (exponentially weighted): the size guessed
        # for a request the engine queues but the proxy did not send.
        self.mean_uncached = 0.0
        self.dropped = 0  # requests forgotten at the max_tracked bound

    def __len__(self) -> int:
        return len(self._requests)

    # -- events --------------------------------------------------------------------------

    def add(
        self, rid: Hashable, endpoint: str, hashes: Sequence[int], uncached_tokens: int,
        watched: bool = False, weight: float = 1.0,
    ) -> None:
        """A request was routed to `endpoint`; `weight`: how many requests' worth of the
        per-request load it carries (`policy.request_weight`)."""
        if rid in self._requests:
            self.remove(rid)
        while len(self._requests) >= self.max_tracked:
            oldest = next(iter(self._requests))
            self.remove(oldest, remember=False)
            self.dropped += 1
        if endpoint not in self._ids:
            self._ids.append(endpoint)
        self.seq += 1
        t = _Tracked(endpoint, tuple(hashes), max(uncached_tokens, 0), self.seq, watched,
                     self.clock() if self._views else 0.0, weight=weight)
        self._requests[rid] = t
        self._chunks.setdefault(endpoint, Counter()).update(t.hashes)
        self._pending[endpoint] = self._pending.get(endpoint, 0) + t.pending
        self._count[endpoint] = self._count.get(endpoint, 0) + 1
        self._weight[endpoint] = self._weight.get(endpoint, 0.0) + weight
        if t.pending:
            self._unprefilled.setdefault(endpoint, OrderedDict())[rid] = None
        self.mean_uncached += 0.05 * (t.pending - self.mean_uncached)

    def prefill_done(self, rid: Hashable) -> None:
        """The endpoint has prefilled it: the first byte of a streamed answer arrived, or an
        engine report (with the estimated prefill time) says so."""
        t = self._requests.get(rid)
        if t is None:
            return
        self._unprefilled.get(t.endpoint, {}).pop(rid, None)
        self._end_estimate(rid, t)

    def _end_estimate(self, rid: Hashable, t: _Tracked) -> None:
        """Its prefill no longer counts as load. An estimated end (`_expire`) stops here:
        the request stays among the unprefilled ones that engine reports walk, so that if
        the engine's counters show it still prefilling it is not taken for foreign traffic."""
        if not t.pending:
            return
        self._started_now(t)
        self._pending[t.endpoint] -= t.pending
        t.pending = 0
        if t.prefill_end:
            self._prefilling[t.endpoint].pop(rid, None)

    def _started_now(self, t: _Tracked) -> None:
        if not t.started:
            t.started = True
            self._starts[t.endpoint] = self._starts.get(t.endpoint, 0) + t.pending

    def remove(self, rid: Hashable, remember: bool = True) -> str | None:
        """The request ended (answered or failed); its endpoint, if it was tracked."""
        t = self._requests.pop(rid, None)
        if t is None:
            return None
        e = t.endpoint
        release(self._chunks[e], t.hashes)
        self._pending[e] -= t.pending
        self._count[e] -= 1
        # Back to exactly 0 with the last request: no float residue left as phantom load.
        self._weight[e] = self._weight[e] - t.weight if self._count[e] else 0.0
        self._unprefilled.get(e, {}).pop(rid, None)
        if t.pending:
            self._started_now(t)
            if t.prefill_end:
                self._prefilling[e].pop(rid, None)
        if remember and self.recent_chunks and t.hashes:
            recent = self._recent.setdefault(e, OrderedDict())
            # Deepest first, so the prefix ends up most recent and trimming takes the tails
            # (a tail without its prefix would never match).
            for h in reversed(t.hashes):
                recent[h] = None
                recent.move_to_end(h)
            while len(recent) > self.recent_chunks:
                recent.popitem(last=False)
        return e

    def engine_report(
        self, endpoint: str, waiting: int, running: int, seq: int,
        first_tokens: int | None = None, finished: int | None = None,
    ) -> None:
        """The engine said it had `waiting` requests not yet started and `running` started
        ones, when the proxy had sent its requests up to number `seq`; `first_tokens` and
        `finished`, when given, are its cumulative counts of requests that produced a first
        token and of requests that ended (vLLM's `time_to_first_token_seconds_count` and
        `request_success_total`).

        The engine starts requests in arrival order, so of the proxy's requests it had
        received and not finished, at most the `waiting` newest can still be waiting: the
        older ones have started their prefill, which tells the proxy what a non-streamed
        response cannot. With the counters, first tokens less finished requests are the
        requests decoding, so `waiting + running - decoding` is how many prefills are not
        over: of the proxy's requests at most that many newest are still prefilling or
        waiting, and the older ones are past their prefill. Without them: prefills run one
        after another in arrival order (vLLM gives its per-step token budget to the oldest
        first), so of the started ones only the newest can still be prefilling: it counts
        for what is left of it at the rate the engine was seen to start uncached tokens
        while it had a queue (until a rate is known, and once the engine is idle, as over).
        Waiting or running requests beyond the proxy's own are foreign traffic, counted as
        load until the next report. Requests sent after `seq` are not in the report and keep
        their own estimate.
        """
        now = self.clock()
        seen: list[Hashable] = []
        for rid in self._unprefilled.get(endpoint, ()):
            if self._requests[rid].seq > seq:
                break
            seen.append(rid)
        prev = self._views.get(endpoint)
        # Those whose estimated prefill end has passed have started: only the others can
        # be among the waiting (the newest).
        live = sum(1 for rid in seen if self._requests[rid].pending)
        waiting_mine = min(max(waiting, 0), live)
        started = seen[: len(seen) - waiting_mine]
        offset = prev.decode_offset if prev is not None else 0
        # Of the started requests, the oldest `over` are past their prefill.
        over: int | None = None
        foreign_queue = max(waiting - live, 0)
        counted = first_tokens is not None and finished is not None
        if first_tokens is not None and finished is not None:
            if running <= 0:
                # Nothing runs, so nothing decodes: whatever the counters' difference is
                # now, it is not requests decoding (aborts before a first token, errors).
                offset = first_tokens - finished
            decoding = min(max(first_tokens - finished - offset, 0), max(running, 0))
            unfinished = max(waiting, 0) + max(running, 0) - decoding
            over = len(seen) - min(unfinished, len(seen))
            # Prefills the engine has beyond the proxy's own: foreign ones prefilling delay
            # the next request as much as foreign ones waiting.
            foreign_queue = max(unfinished - len(seen), 0)
        newly = [rid for rid in started if not self._requests[rid].started]
        for rid in newly:
            self._started_now(self._requests[rid])
        starts = self._starts.get(endpoint, 0)
        rate = prev.rate if prev is not None else 0.0
        if prev is not None and prev.queue and waiting > 0 and now > prev.at:
            # A queue at both reports: the engine was busy all along (with foreign traffic
            # too this reads low, which only makes the estimate more careful).
            sample = (starts - prev.starts) / (now - prev.at)
            rate = sample if rate <= 0 else rate + 0.3 * (sample - rate)
        if over is None:
            # Without the counters, only the newest started request can still prefill.
            over = len(started) - 1 if started and running > 0 and rate > 0 else len(started)
        for i, rid in enumerate(started):
            t = self._requests[rid]
            if t.watched:
                continue  # its first byte will tell
            if i < over or (rate <= 0 and not counted):
                self.prefill_done(rid)
                continue
            if rate <= 0:
                continue  # known to prefill still: whole, until a report says it is over
            if not t.prefill_end:  # started since the previous report, or since it was sent
                # Still prefilling: it counts for what is left of it at the learned rate.
                begin = max(t.sent, prev.at if prev is not None else t.sent)
                t.prefill_end = begin + t.pending / rate
                self._prefilling.setdefault(endpoint, OrderedDict())[rid] = None
        self._expire(endpoint, now)
        # The proxy's requests the engine counts as running: those sent before the report
        # and not still queued (finished ones are gone from both sides, give or take a
        # request finishing between the scrape and now).
        newer = 0  # the proxy's requests sent after the report (the newest, so a short walk)
        for t in reversed(self._requests.values()):
            if t.seq <= seq:
                break
            newer += t.endpoint == endpoint
        mine_running = self._count.get(endpoint, 0) - newer - waiting_mine
        self._views[endpoint] = _EngineView(
            at=now, waiting=foreign_queue,
            running=max(running - mine_running, 0), queue=waiting > 0, rate=rate,
            starts=starts, decode_offset=offset)

    def _expire(self, endpoint: str, now: float) -> None:
        """End the estimated prefills that are over by now."""
        timed = self._prefilling.get(endpoint)
        while timed:
            rid = next(iter(timed))
            t = self._requests[rid]
            if t.prefill_end > now:
                break
            self._end_estimate(rid, t)

    def forget_recent(self, endpoint: str) -> None:
        """The endpoint's cache is gone (its server restarted): what finished there no
        longer counts as held."""
        self._recent.pop(endpoint, None)

    def engine_lost(self, endpoint: str) -> None:
        """No current report for `endpoint`: forget its foreign traffic (the proxy's own
        view alone is in charge again)."""
        self._views.pop(endpoint, None)

    # -- views ---------------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[Hashable, str, tuple[int, ...], int, bool, float]]:
        """(rid, endpoint, chunk hashes, uncached tokens still counted, watched, weight) of
        every tracked request, oldest first (what another proxy replica needs to mirror it)."""
        for rid, t in self._requests.items():
            yield rid, t.endpoint, t.hashes, t.pending, t.watched, t.weight

    def local_matches(
        self, hashes: Sequence[int], inflight: bool = True, recent: bool = False
    ) -> dict[str, int]:
        """Endpoint -> tokens of the prompt's prefix that requests in flight there carry
        (`inflight`) or recently finished ones carried (`recent`); no entry for none."""
        out: dict[str, int] = {}
        if not hashes:
            return out
        for e in self._ids:
            maps: list[Mapping[int, object]] = []
            if inflight and e in self._chunks:
                maps.append(self._chunks[e])
            if recent and e in self._recent:
                maps.append(self._recent[e])
            if not maps:
                continue
            n = leading_match(hashes, *maps)
            if n:
                out[e] = n * CHUNK_TOKENS
        return out

    def load(self) -> dict[str, int]:
        """Endpoint -> estimated queued work in prompt tokens."""
        if not self._views:
            return {
                e: int(self.prefill_share * self._pending.get(e, 0))
                + int(self.request_tokens * self._weight.get(e, 0.0))
                for e in self._ids
            }
        prefill = self.prefill_load()
        out: dict[str, int] = {}
        for e in self._ids:
            v = self._views.get(e)
            n = self._weight.get(e, 0.0) + (v.waiting + v.running if v else 0)
            out[e] = prefill[e] + int(self.request_tokens * n)
        return out

    def prefill_load(self) -> dict[str, int]:
        """Endpoint -> estimated queued prefill in prompt tokens (no per-request term)."""
        if not self._views:
            return {e: int(self.prefill_share * self._pending.get(e, 0)) for e in self._ids}
        now = self.clock()
        out: dict[str, int] = {}
        for e in self._ids:
            v = self._views.get(e)
            if v is None:
                out[e] = int(self.prefill_share * self._pending.get(e, 0))
                continue
            self._expire(e, now)
            pending = self._pending.get(e, 0)
            for rid in self._prefilling.get(e, ()):
                # A prefill under way counts for what is left of it.
                t = self._requests[rid]
                pending -= t.pending - min(t.pending, int((t.prefill_end - now) * v.rate))
            out[e] = int(self.prefill_share * (pending + v.waiting * self.mean_uncached))
        return out

    def foreign(self, endpoint: str) -> tuple[int, int]:
        """(waiting, running) requests the engine last reported beyond the proxy's own."""
        v = self._views.get(endpoint)
        return (v.waiting, v.running) if v else (0, 0)

    def start_rate(self, endpoint: str) -> float:
        """Uncached tokens per second the engine was seen to start (0: not known)."""
        v = self._views.get(endpoint)
        return v.rate if v else 0.0

    def tracks(self, rid: Hashable) -> bool:
        return rid in self._requests

    def inflight(self, endpoint: str) -> int:
        return self._count.get(endpoint, 0)

    def pending_tokens(self, endpoint: str) -> int:
        return self._pending.get(endpoint, 0)


class PrefixHeat:
    """How much of the recent traffic each prefix carries: per prefix, the requests whose
    prompt *contains* it (every 256-token prefix of each prompt is counted), and all
    requests, each count decayed exponentially with `half_life` seconds so that a prefix
    that was hot a while ago fades. Counting containment rather than each request's
    deepest match makes an agent's system prompt hot when its sessions are: a new session
    matches only the system prompt, but every call of every session carries it. The
    `max_prefixes` most recently seen prefixes are kept (the rest count as cold).

    Hand-written: the decayed counter is a few lines of arithmetic, and the bound is an
    OrderedDict rather than cachetools' LRUCache because every chunk of every prompt passes
    through it on the request path, where LRUCache's bookkeeping in Python costs several
    times OrderedDict's in C (`python -m bench.route_cost` times the routing step).
    """

    def __init__(self, half_life: float, max_prefixes: int = 65536) -> None:
        if half_life <= 0 or max_prefixes < 1:
            raise ValueError("half_life and max_prefixes must be positive")
        self._decay = math.log(2) / half_life
        self._max = max_prefixes
        self._counts: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._total = (0.0, 0.0)

    def _bump(self, count: tuple[float, float], now: float) -> tuple[float, float]:
        n, then = count
        return n * math.exp(-self._decay * max(now - then, 0.0)) + 1.0, now

    def record(self, prefixes: Sequence[Hashable], depth: int, now: float) -> tuple[float, float]:
        """Count one request at `now` whose prompt has the chained chunk hashes `prefixes`;
        for its first `depth` chunks (the prefix it matched; 0: none), the decayed count of
        the requests that contained that prefix and its share of all recent requests, this
        one included."""
        self._total = self._bump(self._total, now)
        counts = self._counts
        out = (0.0, 0.0)
        for i, prefix in enumerate(prefixes):
            old = counts.get(prefix)
            if old is None:
                count = counts[prefix] = (1.0, now)
                if len(counts) > self._max:
                    counts.popitem(last=False)
            else:
                count = counts[prefix] = self._bump(old, now)
                counts.move_to_end(prefix)
            if i == depth - 1:
                out = count[0], min(count[0] / self._total[0], 1.0)
        return out


def merge_matches(*answers: Mapping[str, int]) -> dict[str, int]:
    """The longest match per endpoint over several views."""
    out: dict[str, int] = {}
    for a in answers:
        for e, n in a.items():
            if n > out.get(e, 0):
                out[e] = n
    return out
