"""vLLM's KV cache events, as the engine simulator publishes them (what addon/kv_events.py
reads from a real vLLM server).

The wire format is vLLM 0.32's (``vllm/distributed/kv_events.py``, documented in
addon/kv_events.py): a ZMQ PUB socket sending multipart ``[topic, seq (8 bytes, big-endian,
0, 1, 2, ... per publisher), payload]``, the payload msgpack of ``KVEventBatch``
``[ts, events, data_parallel_rank]``, each event a map tagged ``"type"`` first, fields in
vLLM's declaration order, optional fields left out when unset (msgspec's
``omit_defaults``). tests/sim/test_sim_kv_events.py checks ``encode_batch`` against the
bytes vLLM's own encoder produced (the ones tests/unit/test_kv_events.py keeps).

Block hashes are the engine model's chained 64-bit block hashes (``sim.chunks``): ints, like
vLLM's default ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, consistent within one publisher,
which is all a subscriber may rely on (it keys blocks by their tokens).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgpack

from sim.engine_model import RequestPlan

DEFAULT_TOPIC = "kv-events"
MEDIUM = "GPU"  # vLLM labels its engine's own KV cache "GPU" (also on a CPU build)

_STORED_OPTIONAL = ("extra_keys", "group_idx", "kv_cache_spec_kind",
                    "kv_cache_spec_sliding_window", "locality", "ownership", "session_id")
_REMOVED_OPTIONAL = ("group_idx", "locality", "ownership")


def block_stored(block_hashes: Sequence[Any], parent_block_hash: Any,
                 token_ids: Sequence[int], block_size: int, medium: str | None = MEDIUM,
                 lora_id: int | None = None, lora_name: str | None = None,
                 **optional: Any) -> dict[str, Any]:
    """A ``BlockStored`` as msgspec encodes it: the tag, the always-present fields in
    declaration order, then the optional ones that are set."""
    ev: dict[str, Any] = {
        "type": "BlockStored", "block_hashes": list(block_hashes),
        "parent_block_hash": parent_block_hash, "token_ids": list(token_ids),
        "block_size": block_size, "lora_id": lora_id, "medium": medium,
        "lora_name": lora_name,
    }
    _add_optional(ev, optional, _STORED_OPTIONAL)
    return ev


def block_removed(block_hashes: Sequence[Any], medium: str | None = MEDIUM,
                  **optional: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": list(block_hashes),
                          "medium": medium}
    _add_optional(ev, optional, _REMOVED_OPTIONAL)
    return ev


def all_blocks_cleared() -> dict[str, Any]:
    return {"type": "AllBlocksCleared"}


def _add_optional(ev: dict[str, Any], optional: dict[str, Any], names: tuple[str, ...]) -> None:
    unknown = set(optional) - set(names)
    if unknown:
        raise TypeError(f"unknown {ev['type']} fields: {sorted(unknown)}")
    ev.update((k, optional[k]) for k in names if optional.get(k) is not None)


def encode_batch(events: Sequence[dict[str, Any]], ts: float | None = None,
                 data_parallel_rank: int | None = 0) -> bytes:
    """``KVEventBatch`` (msgspec ``array_like``): ``[ts (float64), events, dp rank]``."""
    return msgpack.packb([time.time() if ts is None else float(ts), list(events),
                          data_parallel_rank], use_bin_type=True)


def plan_events(plan: RequestPlan, tokens: Sequence[int], block_size: int,
                medium: str | None = MEDIUM) -> list[dict[str, Any]]:
    """What vLLM publishes for one request's prefill: ``BlockRemoved`` for the blocks its
    allocation evicted, then one ``BlockStored`` per run of consecutive blocks it stored,
    chained to the block before the run (``parent_block_hash``; None for a prompt's first
    block). Blocks that were cached already publish nothing, as in vLLM."""
    events: list[dict[str, Any]] = []
    if plan.evicted_blocks:
        events.append(block_removed(plan.evicted_blocks, medium))
    hashes = plan.block_hashes
    stored = plan.stored_blocks
    i = 0
    while i < len(stored):
        start = j = stored[i]
        while i + 1 < len(stored) and stored[i + 1] == j + 1:
            i += 1
            j += 1
        events.append(block_stored(
            hashes[start:j + 1], hashes[start - 1] if start else None,
            tokens[start * block_size:(j + 1) * block_size], block_size, medium))
        i += 1
    return events


class KVEventsPublisher:
    """A ZMQ PUB socket bound on ``tcp://host:port`` (port 0: a free one; ``url`` says which)
    sending batches numbered from 0, as vLLM's ``ZmqEventPublisher`` does. Not thread-safe:
    one thread publishes (the engine's event loop)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, topic: str = DEFAULT_TOPIC,
                 data_parallel_rank: int | None = 0, hwm: int = 100_000) -> None:
        import zmq  # here: only an engine asked to publish needs it

        self._zmq = zmq
        self.topic = topic
        self.data_parallel_rank = data_parallel_rank
        self.seq = 0  # the next batch's sequence number
        self.events = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.SNDHWM, hwm)
            self._sock.bind(f"tcp://{host}:{port or '*'}")
            self.url: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise

    def publish(self, events: Sequence[dict[str, Any]]) -> int | None:
        """Send one batch (none when ``events`` is empty); returns its sequence number."""
        if not events or self._sock.closed:
            return None
        seq = self.seq
        payload = encode_batch(events, data_parallel_rank=self.data_parallel_rank)
        # PUB never blocks: past the high-water mark a slow subscriber loses messages (it
        # sees the gap in the sequence numbers).
        self._sock.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload],
                                  flags=self._zmq.NOBLOCK)
        self.seq += 1
        self.events += len(events)
        return seq

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)
        if not self._ctx.closed:
            self._ctx.term()

    def state(self) -> dict[str, Any]:
        return {"endpoint": self.url, "topic": self.topic, "batches": self.seq,
                "events": self.events}
