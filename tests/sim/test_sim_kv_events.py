"""The engine simulator's vLLM KV cache events (sim/kv_events.py, ``--kv-events``): the wire
format vLLM uses, read back with the addon's own decoder and block index."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import zmq

from addon.kv_events import Cleared, KVBlockIndex, Removed, Stored, decode_batch
from sim.cluster import kv_events_url, start_cluster, start_engine
from sim.engine_model import EngineModel
from sim.engine_server import EngineConfig
from sim.kv_events import (
    KVEventsPublisher,
    all_blocks_cleared,
    block_removed,
    block_stored,
    encode_batch,
    plan_events,
)
from tests.unit.test_kv_events import H1, H2, VLLM_BATCH_HEX

MODEL = "sim-model"
BS = 16
EID = "vllm-kv"


def toks(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


# -- the encoding -------------------------------------------------------------------------


def test_encoder_matches_vllm_bytes() -> None:
    # The batch tests/unit/test_kv_events.py had vLLM 0.32's own msgspec encoder encode.
    batch = [
        block_stored([H1, H2], None, [1, 2, 3, 4], 2, "GPU", group_idx=0),
        block_stored([7], H2, [5, 6], 2, "CPU", extra_keys=[None], session_id="s1"),
        block_removed([H1], "GPU", group_idx=0),
        all_blocks_cleared(),
    ]
    assert encode_batch(batch, ts=1.5, data_parallel_rank=0) == bytes.fromhex(VLLM_BATCH_HEX)


def test_unknown_optional_field_is_refused() -> None:
    with pytest.raises(TypeError):
        block_stored([1], None, [1], 1, colour="red")


# -- what a request publishes (the pure model) ------------------------------------------


def apply(index: KVBlockIndex, events: list[dict[str, Any]]) -> None:
    index.apply(EID, decode_batch(encode_batch(events)))


def test_plan_events_chain_and_skip_cached_blocks() -> None:
    m = EngineModel(EID, capacity_tokens=100 * BS, block_size=BS)
    a = toks(5 * BS + 3)  # 5 full blocks and a partial one (never stored)
    ev = plan_events(m.begin(a, 1), a, BS)
    assert len(ev) == 1 and ev[0]["type"] == "BlockStored"
    first = m.cache.block_hashes(a)
    assert ev[0]["block_hashes"] == first and ev[0]["parent_block_hash"] is None
    assert ev[0]["token_ids"] == a[:5 * BS] and ev[0]["block_size"] == BS
    assert ev[0]["medium"] == "GPU" and ev[0]["lora_id"] is None
    # The same prompt again: everything cached, nothing to publish.
    assert plan_events(m.begin(a, 1), a, BS) == []
    # A longer prompt: only its new blocks, chained to the last cached one.
    b = a[:5 * BS] + toks(2 * BS, 9000)
    ev = plan_events(m.begin(b, 1), b, BS)
    assert [e["type"] for e in ev] == ["BlockStored"]
    assert ev[0]["parent_block_hash"] == first[-1]
    assert ev[0]["token_ids"] == b[5 * BS:]
    idx = KVBlockIndex()
    apply(idx, plan_events(EngineModel(EID, 100 * BS, block_size=BS).begin(a, 1), a, BS))
    assert idx.match(a + [1, 2]) == {EID: (5 * BS, "GPU")}


def test_eviction_publishes_block_removed_first() -> None:
    m = EngineModel(EID, capacity_tokens=4 * BS, block_size=BS)
    a, b = toks(3 * BS), toks(3 * BS, 5000)
    plan_events(m.begin(a, 1), a, BS)
    ev = plan_events(m.begin(b, 1), b, BS)
    assert [e["type"] for e in ev] == ["BlockRemoved", "BlockStored"]
    # vLLM frees a request's blocks tail first: a's last two blocks go.
    assert ev[0]["block_hashes"] == m.cache.block_hashes(a)[:0:-1][:2]


def test_index_fed_by_events_agrees_with_the_engine() -> None:
    """Whatever the engine model does (shared prefixes, eviction mid-chain, re-admission of
    a chain's head, prompts longer than the cache), the addon's index built from its events
    claims exactly the prefix the engine would find cached."""
    rng = random.Random(3)
    m = EngineModel(EID, capacity_tokens=40 * BS, block_size=BS)
    idx = KVBlockIndex()
    heads = [toks(rng.randrange(0, 6 * BS), 100_000 * i) for i in range(4)]
    seen: list[list[int]] = []
    for _ in range(400):
        p = rng.choice(heads) + [rng.randrange(50_000) for _ in range(rng.randrange(1, 12 * BS))]
        if seen and rng.random() < 0.4:
            q = rng.choice(seen)
            p = q[:rng.randrange(len(q) + 1)] + p[:rng.randrange(3 * BS)] or q
        if rng.random() < 0.02:
            p = toks(60 * BS, 7_000_000)  # longer than the cache
        if rng.random() < 0.01:
            m.clear()
            apply(idx, [all_blocks_cleared()])
        apply(idx, plan_events(m.begin(p, 1), p, BS))
        seen.append(p)
        for q in rng.sample(seen, min(len(seen), 8)):
            assert idx.match(q).get(EID, (0, ""))[0] == m.cache.match(q), len(q)
    assert idx.stats.orphans == 0 and idx.stats.malformed == 0
    assert idx.stats.removed_blocks > 0


# -- the server over ZMQ --------------------------------------------------------------------


class Sub:
    """A SUB socket on an engine's publisher, decoding each batch."""

    def __init__(self, url: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(url)
        time.sleep(0.3)  # PUB drops what it sends before the subscription arrived

    def next(self, timeout: float = 5.0) -> tuple[str, int, list[Any]]:
        assert self.sock.poll(int(timeout * 1000)), "no KV events batch"
        topic, seq, payload = self.sock.recv_multipart()
        assert len(seq) == 8
        return topic.decode(), int.from_bytes(seq, "big"), decode_batch(payload)

    def quiet(self, wait: float = 0.2) -> bool:
        return not self.sock.poll(int(wait * 1000))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def kv_engine() -> Iterator[tuple[str, str]]:
    cfg = EngineConfig(instance_id=EID, model=MODEL, time_scale=0.02, kv_events_port=0,
                       capacity_tokens=64 * BS, block_size=BS)
    with start_engine(cfg) as url:
        endpoint = kv_events_url(url)
        assert endpoint is not None and endpoint.startswith("tcp://127.0.0.1:")
        yield url, endpoint


def complete(url: str, prompt: list[int]) -> None:
    r = httpx.post(f"{url}/v1/completions",
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 2}, timeout=10)
    assert r.status_code == 200, r.text


def test_server_publishes_stored_removed_cleared(kv_engine: tuple[str, str]) -> None:
    url, endpoint = kv_engine
    sub = Sub(endpoint)
    try:
        idx = KVBlockIndex()
        a = toks(10 * BS + 5)
        complete(url, a)
        topic, seq, events = sub.next()
        assert (topic, seq) == ("kv-events", 0)
        assert [type(e) for e in events] == [Stored]
        idx.fresh(EID)
        idx.apply(EID, events)
        assert idx.match(a) == {EID: (10 * BS, "GPU")}
        assert idx.complete(EID)
        # A repeat is all cached: no batch (vLLM publishes only changes).
        complete(url, a)
        assert sub.quiet()
        # 60 new blocks in a 64-block cache: 6 of a's go (its tail first).
        b = toks(60 * BS, 20_000)
        complete(url, b)
        _, seq, events = sub.next()
        assert seq == 1 and [type(e) for e in events] == [Removed, Stored]
        assert len(events[0].block_hashes) == 6
        idx.apply(EID, events)
        assert idx.match(a) == {EID: (4 * BS, "GPU")}
        assert idx.match(b) == {EID: (60 * BS, "GPU")}
        # vLLM's reset route: AllBlocksCleared, and the engine's cache is empty.
        r = httpx.post(f"{url}/reset_prefix_cache")
        assert r.status_code == 200 and r.content == b""
        _, seq, events = sub.next()
        assert seq == 2 and events == [Cleared()]
        idx.apply(EID, events)
        assert idx.match(a) == idx.match(b) == {}
        state = httpx.get(f"{url}/sim/state").json()
        assert state["cached_blocks"] == 0
        assert state["kv_events"] == {"endpoint": endpoint, "topic": "kv-events",
                                      "batches": 3, "events": 4}
        # /sim/clear publishes the same.
        httpx.post(f"{url}/sim/clear").raise_for_status()
        _, seq, events = sub.next()
        assert seq == 3 and events == [Cleared()]
    finally:
        sub.close()


def test_no_publisher_by_default(engine: str) -> None:
    assert kv_events_url(engine) is None


def test_cluster_in_processes_publishes() -> None:
    # The CLI flag (--kv-events 0): each engine process binds its own free port.
    with start_cluster(2, time_scale=0.02, kv_events=True, mode="process") as c:
        assert set(c.kv_events_urls) == set(c.engine_urls)
        assert len(set(c.kv_events_urls.values())) == 2
        sub = Sub(c.kv_events_urls["vllm-instance-2"])
        try:
            p = toks(3 * BS)
            complete(c.engine_urls["vllm-instance-2"], p)
            _, seq, events = sub.next()
            assert seq == 0 and isinstance(events[0], Stored)
            assert events[0].token_ids == p and events[0].block_size == BS
        finally:
            sub.close()


def test_publisher_port_and_sequence() -> None:
    pub = KVEventsPublisher(port=0, topic="t")
    try:
        assert pub.publish([]) is None  # nothing to say: no batch, no number used
        assert pub.publish([all_blocks_cleared()]) == 0
        assert pub.publish([all_blocks_cleared()]) == 1
        assert pub.state()["batches"] == 2
        with pytest.raises(zmq.ZMQError):
            KVEventsPublisher(port=int(pub.url.rsplit(":", 1)[1]))  # taken
    finally:
        pub.close()
        pub.close()  # idempotent
