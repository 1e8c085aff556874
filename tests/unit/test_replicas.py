"""Replicas mirroring each other's routing state (addon/replicas.py), wired directly: each
replica's `send` is delivered to the others by the test, as Redis pub/sub would."""

from __future__ import annotations

import msgpack

from addon.lmcache import LookupResult
from addon.replicas import Event, ReplicaSync
from addon.router import Router
from tests.unit.test_router import FakeLookup, ids_req, make

DOC = tuple(range(2600))  # 10 whole chunks


class Mesh:
    """Replicas whose batches are held until `flush` (a carrier with staleness), encoded and
    decoded with msgpack as the Redis link does."""

    def __init__(self, n: int, answer: LookupResult | BaseException | None = None) -> None:
        self.t = 0.0
        self.routers: list[Router] = []
        self.syncs: list[ReplicaSync] = []
        self.queue: list[bytes] = []
        self.seq = [0] * n
        for i in range(n):
            r = make(FakeLookup(answer if answer is not None else LookupResult({})))
            self.routers.append(r)
            self.syncs.append(ReplicaSync(r, f"r{i}", self._sender(i), peer_timeout=3.0,
                                          clock=lambda: self.t))

    def _sender(self, i: int):  # type: ignore[no-untyped-def]
        def send(events: list[Event]) -> None:
            self.queue.append(msgpack.packb((f"r{i}", self.seq[i], events)))
            self.seq[i] += 1
        return send

    def flush(self, lose: set[int] | None = None) -> None:
        while self.queue:
            batch, self.queue = self.queue, []
            for k, payload in enumerate(batch):
                if lose and k in lose:
                    continue
                sender, seq, events = msgpack.unpackb(payload)
                for s in self.syncs:
                    s.receive(sender, seq, events)
            lose = None


async def test_a_request_routed_by_one_replica_steers_the_others() -> None:
    m = Mesh(2)
    a, b = m.routers
    first = await a.route(ids_req(DOC))
    a.started("f1", first, streamed=True)
    # Before the event arrives, replica b knows nothing of it.
    before = await b.route(ids_req(DOC + (1,) * 300, "t2"))
    assert before.reason != "local-hit"
    m.flush()
    d = await b.route(ids_req(DOC + (1,) * 300, "t3"))
    assert (d.endpoint_id, d.reason, d.matched_tokens) == (first.endpoint_id, "local-hit", 2560)
    # The peer's queued prefill is load on that endpoint in b's estimate too.
    assert b.index.pending_tokens(first.endpoint_id) == 2600
    a.first_byte("f1")
    m.flush()
    assert b.index.pending_tokens(first.endpoint_id) == 0
    assert b.index.inflight(first.endpoint_id) == 1
    a.finished("f1", first.endpoint_id)
    m.flush()
    assert b.index.inflight(first.endpoint_id) == 0
    # Finished on a: b remembers where it was served, as a does.
    d = await b.route(ids_req(DOC, "t4"))
    assert (d.endpoint_id, d.reason) == (first.endpoint_id, "local-hit")


async def test_a_dead_replica_expires_with_its_load() -> None:
    m = Mesh(2)
    a, b = m.routers
    d = await a.route(ids_req(DOC))
    a.started("f1", d)
    m.flush()
    assert len(b.index) == 1 and m.syncs[1].remote_inflight() == 1
    m.t = 2.0
    assert m.syncs[1].expire() == []  # heard from 2 s ago: alive
    m.t = 3.5
    assert m.syncs[1].expire() == ["r0"]
    assert len(b.index) == 0 and m.syncs[1].stats.peers_expired == 1
    assert b.index.pending_tokens(d.endpoint_id) == 0


async def test_a_lost_batch_is_repaired_by_a_snapshot() -> None:
    m = Mesh(2)
    a, b = m.routers
    d1 = await a.route(ids_req(DOC, "k1"))
    a.started("f1", d1)
    m.flush()
    d2 = await a.route(ids_req(DOC, "k2"))
    a.started("f2", d2)
    d3 = await a.route(ids_req(DOC, "k3"))
    a.started("f3", d3)
    # f2's batch never reaches b: b sees the gap at f3's, drops r0's entries, asks r0 for
    # a snapshot, and r0 answers with all three.
    m.flush(lose={0})
    assert m.syncs[1].stats.gaps == 1
    assert len(b.index) == 3 and m.syncs[1].stats.snapshots_applied == 1
    assert sorted(r[2] for r, *_ in b.index.entries()) == ["f1", "f2", "f3"]


async def test_link_loss_drops_peers_and_a_rejoin_restores_both_sides() -> None:
    m = Mesh(2)
    a, b = m.routers
    d = await a.route(ids_req(DOC))
    a.started("f1", d)
    m.flush()
    db = await b.route(ids_req(DOC[:1000], "kb"))
    b.started("g1", db)
    m.flush()
    assert len(a.index) == 2 and len(b.index) == 2
    m.syncs[1].link_lost()  # b's Redis link went down
    assert len(b.index) == 1 and m.syncs[1].peers == {}
    m.syncs[1].joined()  # and came back: b republishes its state and asks for a's
    m.flush()
    assert len(b.index) == 2 and len(a.index) == 2
    assert a.index.inflight(db.endpoint_id) >= 1


async def test_three_replicas_sum_their_load() -> None:
    m = Mesh(3)
    for i, r in enumerate(m.routers):
        d = await r.route(ids_req(tuple(range(i * 10_000, i * 10_000 + 600)), f"k{i}"))
        r.started(f"f{i}", d)
    m.flush()
    for r in m.routers:
        assert len(r.index) == 3
        assert sum(r.index.inflight(e) for e in ("e1", "e2")) == 3


async def test_a_requests_weight_is_mirrored_and_an_older_replicas_counts_once() -> None:
    m = Mesh(2)
    a, b = m.routers
    d = await a.route(ids_req(DOC, "k"))
    a.started("short", d, max_tokens=16)  # an 8th of routing_request_output_tokens (128)
    m.flush()
    assert b.index.load() == a.index.load()
    # An "a" event without the weight (a replica of the previous version): counts once.
    m.syncs[1].receive("old", 0, [("a", "x", "e2", [], 0, False, "", 0)])
    assert b.index.load()["e2"] - a.index.load()["e2"] == b.policy.request_tokens


async def test_no_prompt_text_is_shared() -> None:
    m = Mesh(2)
    a = m.routers[0]
    d = await a.route(ids_req(DOC, "key-hash"))
    a.started("f1", d, key="key-hash")
    payload = m.queue[0]
    # Chunk hashes, the request's cache key and counts: never the tokens themselves.
    _, _, events = msgpack.unpackb(payload)
    (kind, rid, endpoint, hashes, uncached, watched, key, prompt_tokens, weight), = events
    assert (kind, rid, key, prompt_tokens, weight) == ("a", "f1", "key-hash", 2600, 1.0)
    assert len(hashes) == 10 and uncached == 2600 and not watched
